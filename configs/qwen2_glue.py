"""AdaRank, a Qwen2 sequence classifier (any size) merged over the 7 GLUE tasks (our extension: no paper numbers).

python -m adarank_jax.main --config configs/qwen2_glue.py --workdir runs/qwen2_glue \
    --config.model.pretrained=PRETRAINED_HF_DIR --config.model.finetuned='FINETUNED/{task}' \
    --config.data.data_dir=DATA_DIR

PRETRAINED_HF_DIR is Qwen2ForCausalLM, Qwen2Model or a Qwen2ForSequenceClassification directory (sharded
safetensors read one tensor at a time); each FINETUNED/<task> a Qwen2ForSequenceClassification with
pad_token_id set. The hyperparameters are GPT-2's (configs/gpt2_glue.py), unconfirmed for decoders;
--config.model.dtype=bfloat16 computes in bfloat16 (parameters and factors stay float32).
"""

from configs import common


def get_config(arg=None):
  return common.decoder_experiment(arg, model="Qwen2")
