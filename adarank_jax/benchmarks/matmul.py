"""Achieved GFLOP/s of the AdaRank step's float32 matmul shapes in XLA:CPU and in torch, side by side.

  python -m adarank_jax.benchmarks.matmul --arch ViT-B-32 --tasks 8 --batch 4
  python -m adarank_jax.benchmarks.matmul --width 768 --tasks 8 --tokens 200 --repeats 5

Tells "the kernels are slower" apart from "the program does other work": where both backends reach the
same GFLOP/s on these shapes, a gap between the two steps comes from what the programs do, not from
the matmul kernels. The shapes are those of one transformer block of a ViT of width w (every block has
the same), T tasks at full rank r = w, N = batch * tokens rows per task:

  rebuild <kernel>     the sum over tasks of (U_t * s_t) @ Vt_t as one product: (m, T*r) x (T*r, n)
  rebuild-grad <k.>    the mask's gradient, U^T @ G for all tasks at once: (T*r, m) x (m, n)
  tower <kernel>       one task's activations through the kernel: (N, m) x (m, n)
  tower-dx <kernel>    their backward to the input: (N, n) x (n, m)
  tower-dw <kernel>    the kernel's gradient: (m, N) x (N, n)

for the block's kernels in_proj (w, 3w), out_proj (w, w), c_fc (w, 4w), c_proj (4w, w). Each backend
runs in its own process (`--worker`), on seeded random inputs; a product's time is the median of
`--repeats` calls after a first one (JAX: one jitted `a @ b` per shape, compiled ahead; torch:
`torch.matmul` with `--torch-threads` intra-op threads, default the CPU count). Prints the machine
line, a table of GFLOP/s per shape and backend with their ratio, and one line `result: {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

BACKENDS = ("jax", "torch")


def shapes(*, width: int, tasks: int, tokens: int) -> dict[str, tuple[int, int, int]]:
  """{name: (m, k, n)} of the products listed in the module docstring, for one block."""
  w, t, n_rows = width, tasks, tokens
  kernels = {"in_proj": (w, 3 * w), "out_proj": (w, w), "c_fc": (w, 4 * w), "c_proj": (4 * w, w)}
  table: dict[str, tuple[int, int, int]] = {}
  for name, (m, n) in kernels.items():
    rank = min(m, n)
    table[f"rebuild {name}"] = (m, t * rank, n)
    table[f"rebuild-grad {name}"] = (t * rank, m, n)
    table[f"tower {name}"] = (n_rows, m, n)
    table[f"tower-dx {name}"] = (n_rows, n, m)
    table[f"tower-dw {name}"] = (m, n_rows, n)
  return table


def _operands(m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)


def _median_seconds(call, operands, repeats: int) -> float:
  """Median wall seconds of `call(*operands)` (which waits for its result) over `repeats` calls."""
  call(*operands)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call(*operands)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_products(
  backend: str, table: dict[str, tuple[int, int, int]], *, repeats: int, torch_threads: int
) -> dict[str, dict[str, float]]:
  """{name: {seconds, gflops, checksum}} of each product of `table` on `backend`, in this process.
  The checksum (the product's sum over its first row) lets the caller see both backends computed
  the same product."""
  results = {}
  if backend == "torch":
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(torch_threads)
  else:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  for i, (name, (m, k, n)) in enumerate(table.items()):
    a, b = _operands(m, k, n, seed=i)
    if backend == "torch":
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      with torch.no_grad():
        out = torch.matmul(ta, tb)
        seconds = _median_seconds(torch.matmul, (ta, tb), repeats)
      first_row = out[0].numpy()
    else:
      ja, jb = jax.device_put(a), jax.device_put(b)
      product = jax.jit(jnp.matmul).lower(ja, jb).compile()
      out = product(ja, jb)
      seconds = _median_seconds(lambda x, y, f=product: f(x, y).block_until_ready(), (ja, jb), repeats)
      first_row = np.asarray(out[0])
    results[name] = {
      "seconds": seconds,
      "gflops": 2 * m * k * n / seconds / 1e9,
      "checksum": float(np.sum(first_row, dtype=np.float64)),
    }
  return results


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default=None, help="OpenCLIP config name or JSON path: its width and tokens")
  parser.add_argument("--width", type=int, default=768, help="the block's width w (without --arch)")
  parser.add_argument("--tokens", type=int, default=None, help="rows N per task (default: batch * tokens)")
  parser.add_argument("--tasks", type=int, default=8)
  parser.add_argument("--batch", type=int, default=4, help="images per task (with --arch)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first one")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  parser.add_argument("--worker", choices=BACKENDS, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.arch is not None:
    from adarank_jax.interop import openclip_config  # pylint: disable=import-outside-toplevel

    vision = openclip_config.load_config(args.arch).vision
    args.width = vision.width
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2 + 1
    args.tokens = args.tokens or args.batch * tokens_per_image
  if args.tokens is None:
    parser.error("--tokens is needed without --arch")
  return args


def _worker_argv(args: argparse.Namespace, backend: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "adarank_jax.benchmarks.matmul",
    f"--worker={backend}",
    f"--width={args.width}",
    f"--tokens={args.tokens}",
    f"--tasks={args.tasks}",
    f"--repeats={args.repeats}",
    f"--torch-threads={args.torch_threads}",
  ]


def main(argv: list[str] | None = None) -> dict[str, object]:
  args = _parse_args(argv)
  table = shapes(width=args.width, tasks=args.tasks, tokens=args.tokens)
  if args.worker:
    results = time_products(args.worker, table, repeats=args.repeats, torch_threads=args.torch_threads)
    print(json.dumps(results))
    return results
  from adarank_jax.core import layout  # pylint: disable=import-outside-toplevel

  machine = layout.machine()
  print("machine:", json.dumps(machine))
  print(
    f"width {args.width}, {args.tasks} tasks, {args.tokens} rows per task; torch threads {args.torch_threads}"
  )
  sides = {}
  for backend in BACKENDS:  # each in its own process: neither's thread pool idles beside the other's
    out = subprocess.run(_worker_argv(args, backend), check=True, capture_output=True, text=True).stdout
    sides[backend] = json.loads(out.strip().splitlines()[-1])
  print("| product | (m, k, n) | XLA:CPU GFLOP/s | torch GFLOP/s | XLA / torch |")
  print("|---|---|---:|---:|---:|")
  rows = []
  for name, (m, k, n) in table.items():
    jax_side, torch_side = sides["jax"][name], sides["torch"][name]
    ratio = jax_side["gflops"] / torch_side["gflops"]
    print(
      f"| {name} | ({m}, {k}, {n}) | {jax_side['gflops']:.0f} | {torch_side['gflops']:.0f} | {ratio:.2f} |"
    )
    rows.append({"name": name, "shape": [m, k, n], "jax": jax_side, "torch": torch_side, "ratio": ratio})
  result = {"args": vars(args), "machine": machine, "rows": rows}
  print("result:", json.dumps(result))
  return result


if __name__ == "__main__":
  main()
