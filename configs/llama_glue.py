"""AdaRank, a Llama sequence classifier (any size) merged over the 7 GLUE tasks (our extension: no paper numbers).

python -m adarank_jax.main --config configs/llama_glue.py --workdir runs/llama_glue \
    --config.model.pretrained=PRETRAINED_HF_DIR --config.model.finetuned='FINETUNED/{task}' \
    --config.data.data_dir=DATA_DIR

PRETRAINED_HF_DIR is LlamaForCausalLM, LlamaModel or a LlamaForSequenceClassification directory (sharded
safetensors read one tensor at a time); each FINETUNED/<task> a LlamaForSequenceClassification with
pad_token_id set. The hyperparameters are GPT-2's (configs/gpt2_glue.py), unconfirmed for decoders;
--config.model.dtype=bfloat16 computes in bfloat16 (parameters and factors stay float32).
"""

from configs import common


def get_config(arg=None):
  return common.decoder_experiment(arg, model="Llama")
