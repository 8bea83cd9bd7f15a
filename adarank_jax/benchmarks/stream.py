"""Peak host memory of the streamed decomposition vs the all-in-memory one, on Qwen2-0.5B-shaped models.

  python -m adarank_jax.benchmarks.stream --dir /tmp/stream_bench
  python -m adarank_jax.benchmarks.stream --dir /tmp/stream_bench --layers 2 --vocab 4096   # a quick run

Writes a random model of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 key/value heads,
intermediate 4864, vocabulary 151936, tied embeddings; float32) and --tasks fine-tuned copies (every
weight plus Gaussian noise of std --noise) as sharded safetensors directories (`safetensors_dir.save_sharded`)
under --dir/<shape>/, reused by later runs of the same shape. Then each path runs in a process of its own,
so that their peaks don't mix:

  streamed   streaming.decompose_directories: one leaf at a time from the directories
  in_memory  safetensors_dir.load of the pretrained and every fine-tuned model, task_vectors.task_vectors,
             then decomposition.decompose (the fine-tuned trees dropped once the task vectors exist)

Both take task vectors from the pretrained model (Task Arithmetic), decompose the attention and MLP
kernels (`streaming.DECODER_DECOMPOSE`) at full rank in float32 and keep the other leaves as dense task
vectors. Printed: the machine and date, then per path its wall seconds (NaN/Inf checks included), the
process's peak RSS (VmHWM), its RSS before the work began (Python, JAX, transformers) and the bytes it returns (origin +
factors + dense task vectors). A path whose estimated peak exceeds --memory-fraction of MemAvailable is
skipped and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import transformers  # noqa: F401  (imported before the baseline RSS: the readers parse configs with it)

from adarank_jax.core import decomposition, layout, task_vectors, tree_util
from adarank_jax.interop import hf, safetensors_dir, streaming
from adarank_jax.interop import hf_config as config_lib

PATHS = ("streamed", "in_memory")
QWEN2_05B = dict(
  model_type="qwen2",
  architectures=["Qwen2ForCausalLM"],
  hidden_size=896,
  intermediate_size=4864,
  num_attention_heads=14,
  num_key_value_heads=2,
  max_position_embeddings=32768,
  rms_norm_eps=1e-6,
  rope_theta=1000000.0,
  tie_word_embeddings=True,
  hidden_act="silu",
  dtype="float32",
)
DONE = ".complete"  # written last: the directories of a shape are whole


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True, help="where the model directories are written (and reused)")
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--tasks", type=int, default=4)
  parser.add_argument("--noise", type=float, default=1e-3)
  parser.add_argument("--max-shard-size", default="500MB")
  parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of " + str(PATHS))
  parser.add_argument("--workers", type=int, default=None, help="SVD threads (default: the CPUs)")
  parser.add_argument(
    "--memory-fraction",
    type=float,
    default=0.8,
    help="skip a path whose estimated peak is above this fraction of MemAvailable (0 runs every path)",
  )
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one path, in this process
  return parser.parse_args(argv)


def hf_config(layers: int, vocab: int) -> dict[str, Any]:
  return {**QWEN2_05B, "num_hidden_layers": layers, "vocab_size": vocab}


def _status_gb(field: str) -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 2**20  # kB
  return float("nan")


def _mem_available_gb() -> float:
  with open("/proc/meminfo", encoding="ascii") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def _abstract(config: dict[str, Any]) -> dict[str, Any]:

  return hf.key_layout(config_lib.model_config(config))[0]


def estimate_gb(config: dict[str, Any], tasks: int) -> dict[str, float]:
  """Estimated peaks (GB) of the two paths: model, factors and dense task vectors, float32."""

  selected = [re.compile(p) for p in streaming.DECODER_DECOMPOSE]
  model = factors = dense = 0
  for path, leaf in _abstract(config).items():
    size = int(np.prod(leaf.shape))
    model += size
    if any(r.fullmatch(path) for r in selected):
      m, n = leaf.shape
      factors += min(m, n) * (m + n + 1)
    else:
      dense += size
  gb = lambda n: 4 * n / 2**30
  out = gb(tasks * (factors + dense))
  return {
    "model": gb(model),
    "outputs": gb(model) + out,
    "streamed": gb(model) + out + 1.0,  # + a few copies of the largest leaf, Python and JAX
    # the models and the task vectors, then the task vectors and the factors
    "in_memory": max(gb((2 * tasks + 1) * model), gb((tasks + 1) * model) + out) + 1.0,
  }


def write_models(
  root: Path, config: dict[str, Any], *, tasks: int, noise: float, max_shard_size: str
) -> None:
  """root/base and root/task{t}: the random pretrained model and its noisy copies (skipped if whole)."""

  if (root / DONE).is_file():
    print(f"reusing the models in {root}", flush=True)
    return
  begin = time.perf_counter()
  rng = np.random.default_rng(0)
  base = {}
  for path, leaf in _abstract(config).items():
    if path.endswith("/scale"):
      base[path] = np.ones(leaf.shape, np.float32)
    else:
      base[path] = rng.standard_normal(leaf.shape, np.float32) * np.float32(0.02)
  safetensors_dir.save_sharded(
    tree_util.unflatten(base), config, root / "base", max_shard_size=max_shard_size
  )
  for t in range(tasks):
    rng = np.random.default_rng(1 + t)
    tuned = {
      path: value + rng.standard_normal(value.shape, np.float32) * np.float32(noise)
      for path, value in base.items()
    }
    safetensors_dir.save_sharded(
      tree_util.unflatten(tuned), config, root / f"task{t}", max_shard_size=max_shard_size
    )
    del tuned
  (root / DONE).write_text("")
  print(
    f"wrote the pretrained model and {tasks} fine-tuned ones to {root} in {time.perf_counter() - begin:.0f} s"
  )


def _nbytes(tree: Any) -> int:

  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def run_one(args: argparse.Namespace, root: Path) -> dict[str, Any]:
  """Runs path `args.worker` in this process; its seconds, peak and baseline RSS, output bytes."""

  jax.numpy.zeros(1).block_until_ready()  # JAX's runtime and transformers (config parsing): the baseline
  base, tuned = root / "base", [root / f"task{t}" for t in range(args.tasks)]
  baseline = _status_gb("VmRSS")
  begin = time.perf_counter()
  if args.worker == "streamed":
    origin, factors = streaming.decompose_directories(base, tuned, workers=args.workers)
  else:
    pretrained = safetensors_dir.load(base)[1]
    finetuned = [safetensors_dir.load(d)[1] for d in tuned]
    origin, tau = task_vectors.task_vectors(pretrained, finetuned, origin="pretrained")
    del finetuned, pretrained
    select = tree_util.select(tau, streaming.DECODER_DECOMPOSE)
    factors = decomposition.decompose(tau, select, workers=args.workers)
    del tau
  jax.block_until_ready(factors)
  seconds = time.perf_counter() - begin
  return {
    "path": args.worker,
    "seconds": round(seconds, 1),
    "peak_rss_gb": round(_status_gb("VmHWM"), 2),
    "baseline_rss_gb": round(baseline, 2),
    "outputs_gb": round((_nbytes(origin) + _nbytes(factors)) / 2**30, 2),
  }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = _parse_args(argv)
  config = hf_config(args.layers, args.vocab)
  root = Path(args.dir) / f"qwen2-L{args.layers}-V{args.vocab}-T{args.tasks}-noise{args.noise:g}"
  if args.worker:
    result = run_one(args, root)
    print(json.dumps(result))
    return [result]
  paths = args.paths.split(",")
  unknown = sorted(set(paths) - set(PATHS))
  if unknown:
    raise SystemExit(f"unknown paths {unknown}; expected some of {PATHS}")
  estimate = estimate_gb(config, args.tasks)
  write_models(root, config, tasks=args.tasks, noise=args.noise, max_shard_size=args.max_shard_size)
  forwarded = [
    f"--dir={args.dir}",
    f"--layers={args.layers}",
    f"--vocab={args.vocab}",
    f"--tasks={args.tasks}",
    f"--noise={args.noise}",
    *([f"--workers={args.workers}"] if args.workers else []),
  ]
  results = []
  for path in paths:
    available = _mem_available_gb()
    if args.memory_fraction and estimate[path] > args.memory_fraction * available:
      note = f"skipped: estimated peak {estimate[path]:.1f} GB > {args.memory_fraction:g} x {available:.1f} GB available"
      print(f"{path}: {note}", flush=True)
      results.append({"path": path, "skipped": note})
      continue
    out = subprocess.run(
      [sys.executable, "-m", "adarank_jax.benchmarks.stream", f"--worker={path}", *forwarded],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    results.append(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(results[-1]), flush=True)
  print()
  machine = layout.machine()
  print(
    f"machine: {machine['cpu']} ({', '.join(machine['isa'])}), {len(os.sched_getaffinity(0))} CPUs, "
    f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GB RAM; "
    f"date {datetime.date.today().isoformat()}"
  )
  print(
    f"Qwen2-0.5B shape with {args.layers} layers, vocabulary {args.vocab}: {estimate['model']:.2f} GB per model "
    f"(float32), {args.tasks} tasks, full-rank float32 factors"
  )
  print("| path | seconds | peak RSS GB | baseline RSS GB | outputs GB | estimated peak GB |")
  print("|---|---|---|---|---|---|")
  for r in results:
    if "skipped" in r:
      print(f"| {r['path']} | {r['skipped']} | | | | {estimate[r['path']]:.1f} |")
    else:
      print(
        f"| {r['path']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['baseline_rss_gb']:.2f} | "
        f"{r['outputs_gb']:.2f} | {estimate[r['path']]:.1f} |"
      )
  return results


if __name__ == "__main__":
  main()
