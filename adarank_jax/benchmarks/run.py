"""Peak host memory and wall time of a whole run: the CLI on a ViT-B/32-sized random image tower.

  python -m adarank_jax.benchmarks.run
  python -m adarank_jax.benchmarks.run --baseline=DIR   # DIR: a checkout of another revision

Writes a random CLIP whose image tower has ViT-B/32's shape (12 blocks, width 768, patch 32, 224 px; the
text tower is tiny, it only builds the zero-shot heads) and one 'fine-tuned' copy per digits task (the
tower plus noise) as OpenCLIP safetensors, then runs `python -m adarank_jax.main` on them (the digits
tasks, --methods, --steps training steps) as a child process of this one, from this checkout and, with
--baseline, from DIR (e.g. `git worktree add DIR REV`). Printed for each: the child's peak resident memory
(`os.wait4`, Linux's ru_maxrss), its wall time, and whether both wrote the same scores. Memory depends on
the allocator, the thread count and the jax version: another machine prints other numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from flax import nnx

from adarank_jax.core import tree_util
from adarank_jax.data import digits
from adarank_jax.interop import openclip, openclip_config
from adarank_jax.models import clip, functional

_BASELINE = flags.DEFINE_string("baseline", "", "A checkout of another revision to run as well.")
_METHODS = flags.DEFINE_list("methods", ["individual", "adarank_ta"], "config.methods of the run.")
_STEPS = flags.DEFINE_integer("steps", 2, "Training steps of each trained method.")
_CONFIG = {
  "embed_dim": 512,
  "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _write_checkpoints(root: Path) -> None:
  (root / "model.json").write_text(json.dumps(_CONFIG))
  _, tree = functional.split(clip.build(openclip_config.load_config(root / "model.json"), rngs=nnx.Rngs(0)))
  pretrained = {k: np.asarray(v) for k, v in tree_util.flatten(tree).items()}
  openclip.export_openclip(tree_util.unflatten(pretrained), root / "pretrained.safetensors")
  rng = np.random.default_rng(0)
  for task in digits.TASKS:
    tuned = {
      k: v + (0.01 * rng.standard_normal(v.shape).astype(v.dtype) if k.startswith("visual/") else 0)
      for k, v in pretrained.items()
    }
    openclip.export_openclip(tree_util.unflatten(tuned), root / f"{task}.safetensors")


def _run(source: Path, checkpoints: Path, workdir: Path) -> tuple[float, float, dict]:
  """(peak resident GiB, wall seconds, results.json) of one CLI run from the checkout `source`."""
  args = [
    sys.executable,
    "-m",
    "adarank_jax.main",
    "--config=configs/demo.py:quick=true",
    f"--workdir={workdir}",
    "--config.testbed.name=",
    f"--config.model.name={checkpoints / 'model.json'}",
    f"--config.model.pretrained={checkpoints / 'pretrained.safetensors'}",
    f"--config.model.finetuned={checkpoints / '{task}.safetensors'}",
    f"--config.tasks={tuple(digits.TASKS)!r}",
    f"--config.methods={tuple(_METHODS.value)!r}",
    f"--config.adarank.num_steps={_STEPS.value}",
    f"--config.adamerging.num_steps={_STEPS.value}",
    "--config.adarank.log_every=1",
    f"--config.adarank.eval_every={_STEPS.value}",
    f"--config.adarank.checkpoint_every={_STEPS.value}",
    "--config.adarank.batch_size_per_task=2",
    "--config.eval.max_examples=16",
    "--config.eval.batch_size=16",
  ]
  env = {**os.environ, "ADARANK_JAX_CACHE": str(workdir.parent / "cache")}
  begin = time.perf_counter()
  child = subprocess.Popen(args, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  stderr = child.stderr.read()
  _, status, usage = os.wait4(child.pid, 0)
  seconds = time.perf_counter() - begin
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode:
    raise RuntimeError(f"the run from {source} failed:\n{stderr.decode()[-3000:]}")
  return usage.ru_maxrss / 2**20, seconds, json.loads((workdir / "results.json").read_text())


def main(argv) -> None:
  del argv
  sources = {"this checkout": Path(__file__).resolve().parents[2]}
  if _BASELINE.value:
    sources[f"baseline {_BASELINE.value}"] = Path(_BASELINE.value).resolve()
  with tempfile.TemporaryDirectory() as tmp:
    checkpoints = Path(tmp) / "checkpoints"
    checkpoints.mkdir()
    _write_checkpoints(checkpoints)
    print(f"{len(digits.TASKS)} tasks, methods {', '.join(_METHODS.value)}, {_STEPS.value} steps")
    print(f"{'source':50} {'peak memory GiB':>15} {'wall s':>8}")
    scores = []
    for i, (label, source) in enumerate(sources.items()):
      peak, seconds, results = _run(source, checkpoints, Path(tmp) / f"run{i}")
      scores.append((results["methods"], results["individual"]))
      print(f"{label:50} {peak:15.2f} {seconds:8.1f}", flush=True)
    if len(scores) > 1:
      print(f"same scores: {'yes' if scores[0] == scores[1] else 'NO'}")


if __name__ == "__main__":
  app.run(main)
