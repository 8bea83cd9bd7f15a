"""Times the one-off SVD of a ViT's attention/MLP task vectors: host LAPACK, XLA, torch.

  python -m adarank_jax.benchmarks.svd --tasks 2 --repeats 3
  python -m adarank_jax.benchmarks.svd --tasks 8 --repeats 1 --methods host_stream --dtype bfloat16

Random Gaussian task vectors with the shapes of a CLIP ViT image tower (Flax (in, out) kernels):
per layer in_proj (w, 3w), out_proj (w, w), c_fc (w, 4w), c_proj (4w, w); w=768, 12 layers is
ViT-B/32 and ViT-B/16. Every (method, repeat) runs in a fresh process, so that its peak RSS is its
own; the methods take turns. Printed per method: wall seconds of the decomposition (first call,
compile included; the min and median over repeats), the process's peak RSS and that peak minus
the RSS once the task vectors exist (for host_stream: while a single task's vectors exist).

Methods:
  host         decomposition.decompose(method='host'): scipy gesdd per matrix, thread pool
  host1        the same with one worker thread
  host_stream  decomposition.decompose_streaming(method='host'), task vectors made task by task
               (their generation time is not counted)
  xla          decomposition.decompose(method='xla'): one jitted vmapped jnp.linalg.svd per shape
  torch        torch.linalg.svd(full_matrices=False) of each (T, m, n) stack (torch threads:
               --torch-threads), the batched call of the reference code
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

METHODS = ("host", "host1", "host_stream", "xla", "torch")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=2)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + str(METHODS))
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="storage dtype of the factors (host and xla)",
  )
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, in this process
  return parser.parse_args(argv)


def shapes(layers: int, width: int) -> dict[str, tuple[int, int]]:
  """Flat path -> (m, n) of every decomposed kernel of a CLIP ViT image tower."""
  per_layer = {
    "attn/in_proj/kernel": (width, 3 * width),
    "attn/out_proj/kernel": (width, width),
    "mlp/c_fc/kernel": (width, 4 * width),
    "mlp/c_proj/kernel": (4 * width, width),
  }
  return {
    f"transformer/resblocks/{i}/{name}": shape for i in range(layers) for name, shape in per_layer.items()
  }


def _task(layout: dict[str, tuple[int, int]], t: int) -> dict[str, np.ndarray]:
  """Task t's task vectors (Gaussian, std 1e-3), the same in every process."""
  rng = np.random.default_rng(t)
  return {path: rng.standard_normal(shape, np.float32) * np.float32(1e-3) for path, shape in layout.items()}


def _rss_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _run_one(args: argparse.Namespace) -> dict[str, object]:
  """Times one decomposition by `args.worker` in this process."""
  method = args.worker
  layout = shapes(args.layers, args.width)
  if method == "torch":
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(args.torch_threads)
  else:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from adarank_jax.core import decomposition, tree_util

    dtype = jnp.dtype(args.dtype)
  generated = 0.0

  def stream() -> Iterator[dict[str, object]]:
    nonlocal generated
    for t in range(args.tasks):
      begin = time.perf_counter()
      task = tree_util.unflatten(_task(layout, t))
      generated += time.perf_counter() - begin
      yield task
      del task

  if method == "host_stream":
    data_gb = _rss_gb()  # nothing but one task at a time
    select = tree_util.unflatten({path: True for path in layout})
    begin = time.perf_counter()
    factors = decomposition.decompose_streaming(
      select, stream(), num_tasks=args.tasks, dtype=dtype, method="host"
    )
    jax.block_until_ready(factors)
    seconds = time.perf_counter() - begin - generated
  else:
    tasks = [_task(layout, t) for t in range(args.tasks)]
    tau = {path: np.stack([task[path] for task in tasks]) for path in layout}
    del tasks
    data_gb = _rss_gb()
    begin = time.perf_counter()
    if method == "torch":
      factors = {path: torch.linalg.svd(torch.from_numpy(x), full_matrices=False) for path, x in tau.items()}
    else:
      tree = tree_util.unflatten(tau)
      select = jax.tree.map(lambda _: True, tree)
      name, workers = {"host": ("host", None), "host1": ("host", 1), "xla": ("xla", None)}[method]
      factors = decomposition.decompose(tree, select, dtype=dtype, method=name, workers=workers)
      jax.block_until_ready(factors)
    seconds = time.perf_counter() - begin
  peak = _peak_gb()
  return {
    "method": method,
    "seconds": round(seconds, 2),
    "peak_rss_gb": round(peak, 3),
    "data_rss_gb": round(data_gb, 3),
    "peak_minus_data_gb": round(peak - data_gb, 3),
  }


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
  args = _parse_args(argv)
  if args.worker:
    result = _run_one(args)
    print(json.dumps(result))
    return {args.worker: [result]}
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; expected some of {METHODS}")
  layout = shapes(args.layers, args.width)
  print(
    f"{len(layout)} matrices x {args.tasks} tasks, width {args.width}; cpus "
    f"{len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f}; factors {args.dtype}"
  )
  runs: dict[str, list[dict[str, object]]] = {m: [] for m in methods}
  forwarded = [
    f"--{k}={v}"
    for k, v in (
      ("tasks", args.tasks),
      ("layers", args.layers),
      ("width", args.width),
      ("dtype", args.dtype),
      ("torch-threads", args.torch_threads),
    )
  ]
  for repeat in range(args.repeats):
    for method in methods:  # the methods take turns, so a busy spell hits all of them
      out = subprocess.run(
        [sys.executable, "-m", "adarank_jax.benchmarks.svd", f"--worker={method}", *forwarded],
        check=True,
        capture_output=True,
        text=True,
      ).stdout
      run = json.loads(out.strip().splitlines()[-1])
      run["load"] = round(os.getloadavg()[0], 1)
      runs[method].append(run)
      print(f"  repeat {repeat}: {json.dumps(run)}", flush=True)
  print(f"{'method':<12} {'min s':>8} {'median s':>9} {'peak RSS GB':>12} {'peak-data GB':>13}")
  for method, results in runs.items():
    seconds = [r["seconds"] for r in results]
    print(
      f"{method:<12} {min(seconds):8.2f} {statistics.median(seconds):9.2f} "
      f"{max(r['peak_rss_gb'] for r in results):12.2f} "
      f"{max(r['peak_minus_data_gb'] for r in results):13.2f}"
    )
  return runs


if __name__ == "__main__":
  main()
