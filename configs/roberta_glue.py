"""AdaRank, RoBERTa-base merged over the 7 GLUE tasks (docs/algorithm.md, section 3: RoBERTa-base rows).

python -m adarank_jax.main --config configs/roberta_glue.py --workdir runs/roberta_glue \
    --config.model.pretrained=PRETRAINED_HF_DIR --config.model.finetuned='FINETUNED/{task}' \
    --config.data.data_dir=DATA_DIR
"""

from configs import common


def get_config(arg=None):
  return common.experiment(
    arg,
    architecture="roberta",
    model="RoBERTa-base",
    tasks=common.GLUE_7,
    batch_size=8,
    num_steps=5_000,
    eval_every=500,
    ta=dict(prior=0.3, initial_rank_ratio=1.0, learning_rate=5e-5),  # AdaRank on TA
    cart=dict(prior=1.6, initial_rank_ratio=0.04, learning_rate=1e-4),  # AdaRank on CART
    eval_batch_size=64,
  )
