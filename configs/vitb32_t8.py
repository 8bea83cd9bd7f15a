"""AdaRank, ViT-B-32 merged over the 8-task suite (docs/algorithm.md, section 3: B_T8).

python -m adarank_jax.main --config configs/vitb32_t8.py --workdir runs/vitb32_t8 \
    --config.model.pretrained=PRETRAINED.pt --config.model.finetuned='FINETUNED/{task}/finetuned.pt' \
    --config.data.data_dir=DATA_DIR
python -m adarank_jax.main --config configs/vitb32_t8.py:base=cart,baselines=true ...  # AdaRank on CART + baselines
"""

from configs import common


def get_config(arg=None):
  return common.experiment(
    arg,
    architecture="clip",
    model="ViT-B-32",
    tasks=common.TASKS_8,
    batch_size=16,
    num_steps=10_000,
    eval_every=500,
    ta=dict(prior=0.3, initial_rank_ratio=1.0, learning_rate=1e-3),  # AdaRank on TA
    cart=dict(prior=2.3, initial_rank_ratio=0.16, learning_rate=1e-3),  # AdaRank on CART
    cart_static=dict(scaling=2.0, rank_ratio=0.12),  # static CART: CART repo's ViT-b-32_8_CART.yaml
    eval_batch_size=128,
  )
