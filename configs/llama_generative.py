"""AdaRank merging Llama causal LMs (any size) whole, on each task's unlabeled prompts (our extension: no paper numbers).

python -m adarank_jax.main --config configs/llama_generative.py --workdir runs/llama_generative \
    --config.model.pretrained=PRETRAINED_HF_DIR --config.model.finetuned='FINETUNED/{task}' \
    --config.tasks="('code', 'math')" --config.data.prompts='PROMPTS/{task}.jsonl' \
    [--config.data.eval_prompts='PROMPTS/{task}_heldout.jsonl'] [--config.data.prompt_field=text]

PRETRAINED_HF_DIR and each FINETUNED/<task> are LlamaForCausalLM directories (sharded safetensors read one tensor
at a time). Each task's prompts are a .jsonl file (the prompt under data.prompt_field) or a .txt file (one
prompt per line), tokenized with the pretrained directory's tokenizer (or data.tokenizer) to
data.max_length tokens. The objective is the mean next-token entropy of the merged model on them; the run
reports each task's perplexity and next-token entropy on data.eval_prompts ('' = the same prompts) and
exports the merged model as one LlamaForCausalLM directory (--export=hf). The hyperparameters are the
decoder classifiers' (configs/llama_glue.py), unconfirmed here.
"""

from configs import common


def get_config(arg=None):
  return common.generative_experiment(arg, model="Llama")
