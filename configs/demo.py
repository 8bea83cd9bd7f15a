"""The embedded default: AdaRank and every baseline on the digits testbed, on a laptop CPU.

python -m adarank_jax.main --config configs/demo.py                # about 3 minutes the first time
python -m adarank_jax.main --config configs/demo.py:quick=true     # CI smoke run: under a minute from scratch
python -m adarank_jax.main --config configs/demo.py:selection=validation  # steps chosen on validation splits

The testbed (a tiny OpenCLIP-architecture CLIP pre-trained on sklearn's 8x8 digits, and one fine-tuned
image tower per digits task, saved as OpenCLIP state dicts) is built on the first run and cached; its
directory is printed ($ADARANK_JAX_CACHE, else ~/.cache/adarank_jax). From there the run is the same code
path as configs/vitl14_t14.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, quick=False, seed=0, selection="final")
  config = common.base()
  config.name = "digits_demo_quick" if arg.quick else "digits_demo"
  if arg.selection != "final":
    config.name += f"_{arg.selection}"
  config.adarank.selection = arg.selection  # final | validation | oracle (README: both tables)
  config.architecture = "clip"
  # The run builds (or reuses) the testbed and takes the model config and checkpoints from it.
  config.testbed.update(name="digits", quick=arg.quick, seed=arg.seed)
  config.model.name = ""  # the testbed's own (adarank_jax/digits/tiny_clip*.json)
  config.tasks = common.DIGITS_8
  config.methods = common.BASELINES + tuple(f"adarank_{base}" for base in common.BASES)  # all 15
  # The ViT-B/32 8-task values of docs/algorithm.md, section 3 (TA: prior 0.3, all components on;
  # CART: prior 2.3, top 16%), and the CART repo's static CART for 8 tasks (lambda 2.0, rank 12%). Nothing tuned here.
  config.adarank.ta.update(prior=0.3, initial_rank_ratio=1.0, learning_rate=1e-3)
  config.adarank.cart.update(prior=2.3, initial_rank_ratio=0.16, learning_rate=1e-3)
  config.merge.cart.update(scaling=2.0, rank_ratio=0.12)
  config.adarank.num_steps = 500
  config.adamerging.num_steps = 500  # AdaMerging's own schedule (also its official step count)
  config.adarank.batch_size_per_task = 16
  config.adarank.eval_every = 250
  config.adarank.log_every = 50
  config.adarank.checkpoint_every = 250
  config.eval.batch_size = 256
  config.export = "safetensors"  # every merged model, as an OpenCLIP state dict open_clip loads
  if arg.quick:
    config.adarank.update(num_steps=6, eval_every=6, log_every=3, checkpoint_every=3)
    config.adamerging.num_steps = 6
    config.eval.update(batch_size=128, max_examples=128)
  return config
