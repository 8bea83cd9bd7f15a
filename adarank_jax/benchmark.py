"""Times the one-off decomposition and the jitted AdaRank step on random CLIP image towers.

  python -m adarank_jax.benchmark --arch ViT-B-32 --tasks 8 --steps 5 --batch 16

Pretrained weights are a random init, each "fine-tuned" model adds small Gaussian noise, heads are
random unit vectors and the images random normal pixels: the cost, not the accuracy, is measured.
Prints the machine, the decomposition time (first call, compile included), the first step
(compile included), steady-state steps/s, host peak RSS and device peak memory where available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adarank_jax import decomposition, task_vectors, train, tree_util
from adarank_jax.models import clip, functional

# The SVD rule of the official code (SPEC section 1) on the Flax image-tower layout.
SVD_PATTERNS = (r'transformer/resblocks/\d+/attn/(in_proj|out_proj)/kernel',
                r'transformer/resblocks/\d+/mlp/(c_fc|c_proj)/kernel')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='ViT-B-32', help='OpenCLIP model config name or JSON path')
  parser.add_argument('--tasks', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5, help='timed steps after the compiling one')
  parser.add_argument('--batch', type=int, default=16, help='images per task per step')
  parser.add_argument('--classes', type=int, default=10, help='classes of every random head')
  parser.add_argument('--origin', choices=task_vectors.ORIGINS, default='pretrained')
  parser.add_argument('--initial-rank-ratio', type=float, default=1.0)
  parser.add_argument('--factor-dtype', choices=sorted(DTYPES), default='float32')
  parser.add_argument('--compute-dtype', choices=sorted(DTYPES), default='float32')
  parser.add_argument('--mesh-task', type=int, default=1,
                      help="size of the mesh's 'task' axis (factors split over it); used when "
                           'more than one device is visible')
  parser.add_argument('--noise', type=float, default=1e-3, help='std of the fine-tuning noise')
  return parser.parse_args(argv)


def _machine() -> dict[str, object]:
  device = jax.devices()[0]
  return {'platform': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
          'host': platform.machine(), 'jax': jax.__version__}


def _peak_memory() -> dict[str, float | None]:
  host_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
  stats = jax.devices()[0].memory_stats() or {}
  device = stats.get('peak_bytes_in_use')
  return {'host_peak_rss_gb': round(host_gb, 3),
          'device_peak_gb': None if device is None else round(device / 2**30, 3)}


def main(argv: list[str] | None = None) -> dict[str, object]:
  args = _parse_args(argv)
  result: dict[str, object] = {'args': vars(args), 'machine': _machine()}
  print('machine:', json.dumps(result['machine']))

  # Random pretrained tower and T noisy "fine-tuned" copies (host numpy).
  vision = clip.load_config(args.arch).vision
  model = clip.VisionTransformer(vision, dtype=DTYPES[args.compute_dtype], rngs=nnx.Rngs(0))
  graphdef, pretrained = functional.split(model)
  pretrained = jax.tree.map(np.asarray, pretrained)
  rng = np.random.default_rng(0)
  finetuned = [jax.tree.map(lambda x: x + args.noise * rng.standard_normal(x.shape, np.float32),
                            pretrained) for _ in range(args.tasks)]
  num_params = sum(x.size for x in jax.tree.leaves(pretrained))
  print(f'{args.arch}: {num_params / 1e6:.1f}M params, {args.tasks} tasks')

  start = time.perf_counter()
  origin, tau = task_vectors.task_vectors(pretrained, finetuned, origin=args.origin)
  jax.block_until_ready(tau)
  result['task_vectors_s'] = time.perf_counter() - start
  del finetuned
  start = time.perf_counter()
  factors = decomposition.decompose(tau, tree_util.select(tau, SVD_PATTERNS),
                                    dtype=DTYPES[args.factor_dtype])
  jax.block_until_ready(factors)
  result['decompose_s'] = time.perf_counter() - start
  del tau
  print(f"task vectors {result['task_vectors_s']:.2f} s, decomposition {result['decompose_s']:.2f} s"
        ' (first call, compile included)')

  # Random unit-norm heads, scaled like CLIP's logit scale (100).
  features = vision.output_dim or vision.width
  heads = [jnp.asarray(h / np.linalg.norm(h, axis=0), jnp.float32)
           for h in rng.standard_normal((args.tasks, features, args.classes), np.float32)]

  def task_logits_fn(params, t, images):
    feats = functional.call(graphdef, params, images).astype(jnp.float32)
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    return 100.0 * feats @ heads[t]

  optimizer = train.make_optimizer(1e-3)
  state = train.init_state(factors, optimizer=optimizer, num_tasks=args.tasks,
                           initial_rank_ratio=args.initial_rank_ratio, prior=0.3)
  frozen = (origin, factors)
  keys = jax.random.split(jax.random.key(1), args.tasks)
  size = vision.image_size
  batches = tuple(jax.random.normal(k, (args.batch, size, size, 3)) for k in keys)
  mesh = None
  if jax.device_count() > 1:
    mesh = train.make_mesh(task=args.mesh_task)
    placement = 'task' if args.mesh_task > 1 else 'replicated'
    frozen = train.place_frozen(frozen, mesh, factor_placement=placement)
    state, batches = train.place_state(state, mesh), train.place_batches(batches, mesh)
  step = train.make_train_step(task_logits_fn=task_logits_fn, optimizer=optimizer,
                               temperature=10.0, num_tasks=args.tasks, mesh=mesh)

  start = time.perf_counter()
  state, metrics = step(frozen, state, batches)
  jax.block_until_ready(metrics)
  result['first_step_s'] = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(frozen, state, batches)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start
  result['steps_per_s'] = args.steps / elapsed if args.steps else None
  result['loss'] = float(metrics['loss'])
  result.update(_peak_memory())
  print(f"first step {result['first_step_s']:.2f} s (compile included); "
        f"{args.steps} steps in {elapsed:.2f} s = {result['steps_per_s'] or 0:.3f} steps/s; "
        f"loss {result['loss']:.4f}")
  print(f"peak memory: host RSS {result['host_peak_rss_gb']} GB, "
        f"device {result['device_peak_gb']} GB")
  print('result:', json.dumps(result))
  return result


if __name__ == '__main__':
  main()
