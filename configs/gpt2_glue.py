"""AdaRank, GPT-2 merged over the 7 GLUE tasks (docs/algorithm.md, section 3: GPT-2 rows).

python -m adarank_jax.main --config configs/gpt2_glue.py --workdir runs/gpt2_glue \
    --config.model.pretrained=PRETRAINED_HF_DIR --config.model.finetuned='FINETUNED/{task}' \
    --config.data.data_dir=DATA_DIR
"""

from configs import common


def get_config(arg=None):
  return common.experiment(
    arg,
    architecture="gpt2",
    model="GPT-2",
    tasks=common.GLUE_7,
    batch_size=8,
    num_steps=5_000,
    eval_every=500,
    ta=dict(prior=0.3, initial_rank_ratio=1.0, learning_rate=5e-5),  # AdaRank on TA
    cart=dict(prior=1.3, initial_rank_ratio=0.01, learning_rate=5e-5),  # AdaRank on CART
    eval_batch_size=64,
  )
