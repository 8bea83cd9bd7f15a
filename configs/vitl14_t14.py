"""AdaRank, ViT-L-14 merged over the 14-task suite (docs/algorithm.md, section 3: L_T14).

python -m adarank_jax.main --config configs/vitl14_t14.py --workdir runs/vitl14_t14 \
    --config.model.pretrained=PRETRAINED.pt --config.model.finetuned='FINETUNED/{task}/finetuned.pt' \
    --config.data.data_dir=DATA_DIR
python -m adarank_jax.main --config configs/vitl14_t14.py:base=cart,baselines=true ...  # AdaRank on CART + baselines
"""

from configs import common


def get_config(arg=None):
  return common.experiment(
    arg,
    architecture="clip",
    model="ViT-L-14",
    tasks=common.TASKS_14,
    batch_size=2,
    num_steps=100_000,
    eval_every=1000,
    ta=dict(prior=0.3, initial_rank_ratio=1.0, learning_rate=1e-3),  # AdaRank on TA
    cart=dict(prior=1.25, initial_rank_ratio=0.16, learning_rate=1e-3),  # AdaRank on CART
    cart_static=None,  # the CART repo has no ViT-L/14 config: static CART uses the defaults
    eval_batch_size=32,
  )
