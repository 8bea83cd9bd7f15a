"""AdaRank, RoBERTa-base merged over the 7 GLUE tasks (SPEC section 3: RoBERTa-base rows).

python -m adarank_jax.main --config configs/roberta_glue.py --workdir runs/roberta_glue \
    --config.model.pretrained=PRETRAINED_HF_DIR --config.model.finetuned='FINETUNED/{task}' \
    --config.data.data_dir=DATA_DIR
"""

from configs import common


def get_config(arg=None):
  return common.experiment(
      arg, family="roberta", model="RoBERTa-base", tasks=common.GLUE_7,
      batch_size=8, num_steps=5_000, eval_every=500,
      ta=(0.3, 1.0, 5e-5),    # (prior, initial rank ratio, lr) of AdaRank on TA
      cart=(1.6, 0.04, 1e-4),  # same, on CART
      eval_batch_size=64)
