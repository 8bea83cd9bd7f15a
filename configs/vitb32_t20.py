"""AdaRank, ViT-B-32 merged over the 20-task suite (docs/algorithm.md, section 3: B_T20).

python -m adarank_jax.main --config configs/vitb32_t20.py --workdir runs/vitb32_t20 \
    --config.model.pretrained=PRETRAINED.pt --config.model.finetuned='FINETUNED/{task}/finetuned.pt' \
    --config.data.data_dir=DATA_DIR
python -m adarank_jax.main --config configs/vitb32_t20.py:base=cart,baselines=true ...  # AdaRank on CART + baselines
"""

from configs import common


def get_config(arg=None):
  return common.experiment(
    arg,
    architecture="clip",
    model="ViT-B-32",
    tasks=common.TASKS_20,
    batch_size=16,
    num_steps=10_000,
    eval_every=500,
    ta=dict(prior=0.05, initial_rank_ratio=1.0, learning_rate=1e-3),  # AdaRank on TA
    cart=dict(prior=2.4, initial_rank_ratio=0.32, learning_rate=1e-3),  # AdaRank on CART
    cart_static=dict(scaling=1.9, rank_ratio=0.32),  # static CART: CART repo's ViT-b-32_20_CART.yaml
    eval_batch_size=128,
  )
