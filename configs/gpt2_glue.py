"""AdaRank, GPT-2 merged over the 7 GLUE tasks (SPEC section 3: GPT-2 rows).

python -m adarank_jax.main --config configs/gpt2_glue.py --workdir runs/gpt2_glue \
    --config.model.pretrained=PRETRAINED_HF_DIR --config.model.finetuned='FINETUNED/{task}' \
    --config.data.data_dir=DATA_DIR
"""

from configs import common


def get_config(arg=None):
  return common.experiment(
      arg, family="gpt2", model="GPT-2", tasks=common.GLUE_7,
      batch_size=8, num_steps=5_000, eval_every=500,
      ta=(0.3, 1.0, 5e-5),    # (prior, initial rank ratio, lr) of AdaRank on TA
      cart=(1.3, 0.01, 5e-5),  # same, on CART
      eval_batch_size=64)
