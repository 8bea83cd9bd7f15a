"""Times the image tower's forward+backward on the AdaRank loss shape, in JAX or in torch (open_clip).

  python -m adarank_jax.benchmarks.tower --backend jax --layout per_task --tasks 8 --batch 16
  python -m adarank_jax.benchmarks.tower --backend torch --layout batched --tasks 8 --batch 4

The loss is sum over tasks t of entropy(softmax(100 * normalize(tower(images_t)) @ head_t)), differentiated
w.r.t. every weight of the tower. `--layout per_task` runs the tower once per task on its B images;
`--layout batched` runs it once on the T * B concatenated images and splits the features by task.
Weights are the tower's random init (seed 0), shared by both backends (torch gets them through
`interop.openclip.state_dict_from_tree`); images and heads are seeded random normals, so the printed
loss agrees between backends. Prints one JSON line: the compile time (JAX: trace, lower and compile),
the first call, the steady per-call wall times (min and median), their process CPU times (less sensitive
to other load on a shared machine), the CPU cores other processes kept busy meanwhile (Linux; a steady
time taken while that is well above 0 is slowed by them), the loss and the host peak RSS.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import time

import numpy as np

from adarank_jax.interop import openclip_config
from adarank_jax.models import clip

SCALE = 100.0  # CLIP's logit scale of the zero-shot heads


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
  parser.add_argument("--layout", choices=("per_task", "batched"), default="per_task")
  parser.add_argument("--arch", default="ViT-B-32", help="OpenCLIP model config name or JSON path")
  parser.add_argument("--tasks", type=int, default=8)
  parser.add_argument("--batch", type=int, default=16, help="images per task")
  parser.add_argument("--classes", type=int, default=10, help="classes of every random head")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first one")
  parser.add_argument(
    "--threads",
    type=int,
    default=None,
    help="torch intra-op threads (default: the CPU count); JAX uses its own pool",
  )
  return parser.parse_args(argv)


def _busy_cpu_s() -> float | None:
  """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _inputs(config: clip.VisionConfig, tasks: int, batch: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(tasks, batch, H, W, 3) images and (tasks, dim, classes) unit-column heads, float32."""
  rng = np.random.default_rng(0)
  size = config.image_size
  images = rng.standard_normal((tasks, batch, size, size, 3), dtype=np.float32)
  dim = config.output_dim or config.width
  heads = rng.standard_normal((tasks, dim, classes), dtype=np.float32)
  return images, heads / np.linalg.norm(heads, axis=1, keepdims=True)


def _jax_params(config: clip.VisionConfig):
  from flax import nnx

  from adarank_jax.models import functional

  return functional.split(clip.VisionTransformer(config, rngs=nnx.Rngs(0)))


def _jax_step(config: clip.VisionConfig, layout: str, images: np.ndarray, heads: np.ndarray):
  import jax
  import jax.numpy as jnp

  from adarank_jax.core import objectives
  from adarank_jax.models import functional

  graphdef, params = _jax_params(config)
  tower = functools.partial(functional.call, graphdef)
  tasks, batch = images.shape[:2]

  def loss_fn(params, images, heads):
    if layout == "batched":
      features = tower(params, images.reshape(tasks * batch, *images.shape[2:]))
      per_task = features.reshape(tasks, batch, -1)
    else:
      per_task = [tower(params, images[t]) for t in range(tasks)]
    total = 0.0
    for t in range(tasks):
      f = per_task[t]
      f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
      total = total + objectives.entropy(SCALE * f @ heads[t])
    return total

  args = jax.device_put((params, jnp.asarray(images), jnp.asarray(heads)))
  start = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss_fn)).lower(*args).compile()
  compile_s = time.perf_counter() - start

  def run():
    loss, grads = step(*args)
    jax.block_until_ready(grads)
    return float(loss)

  return run, compile_s


def _torch_step(
  config: clip.VisionConfig, arch: str, layout: str, images: np.ndarray, heads: np.ndarray, threads: int
):
  import open_clip
  import torch

  from adarank_jax.interop import openclip as openclip_interop

  torch.set_num_threads(threads)
  _, params = _jax_params(config)
  state = {
    k: torch.from_numpy(np.array(v))
    for k, v in openclip_interop.state_dict_from_tree(params, prefix="").items()
  }
  model = open_clip.create_model(arch, pretrained=None).visual.eval()
  model.load_state_dict(state)
  weights = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
  tasks, batch = images.shape[:2]
  nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 1, 4, 2, 3)))
  heads_t = torch.from_numpy(heads)

  def loss_fn():
    if layout == "batched":
      features = torch.func.functional_call(model, weights, (nchw.flatten(0, 1),))
      per_task = features.unflatten(0, (tasks, batch))
    else:
      per_task = [torch.func.functional_call(model, weights, (nchw[t],)) for t in range(tasks)]
    total = 0.0
    for t in range(tasks):
      f = torch.nn.functional.normalize(per_task[t], dim=-1)
      log_p = torch.log_softmax(SCALE * f @ heads_t[t], dim=-1)
      total = total + (-(log_p.exp() * log_p).sum(-1)).mean()
    return total

  def run():
    for w in weights.values():
      w.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.item()

  return run, None


def main(argv: list[str] | None = None) -> dict[str, object]:
  args = _parse_args(argv)
  config = openclip_config.load_config(args.arch).vision
  images, heads = _inputs(config, args.tasks, args.batch, args.classes)
  if args.backend == "jax":
    run, compile_s = _jax_step(config, args.layout, images, heads)
  else:
    threads = args.threads or os.cpu_count()
    run, compile_s = _torch_step(config, args.arch, args.layout, images, heads, threads)
  start = time.perf_counter()
  loss = run()
  first = time.perf_counter() - start
  times, cpu_times, other_load = [], [], []
  for _ in range(args.repeats):
    busy_start, start, cpu_start = _busy_cpu_s(), time.perf_counter(), time.process_time()
    run()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
    busy_end = _busy_cpu_s()
    if busy_start is not None and busy_end is not None:
      other_load.append(max(0.0, busy_end - busy_start - cpu_times[-1]) / times[-1])
  result = {
    "backend": args.backend,
    "layout": args.layout,
    "arch": args.arch,
    "tasks": args.tasks,
    "batch": args.batch,
    "compile_s": None if compile_s is None else round(compile_s, 3),
    "first_s": round(first, 3),
    "steady_min_s": round(min(times), 3) if times else None,
    "steady_median_s": round(statistics.median(times), 3) if times else None,
    "steady_s": [round(t, 3) for t in times],
    "steady_cpu_median_s": round(statistics.median(cpu_times), 3) if times else None,
    "other_load_cores": [round(v, 2) for v in other_load],
    "loss": round(loss, 6),
    "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
