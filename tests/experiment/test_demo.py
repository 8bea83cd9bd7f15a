"""The README's first command, in its CI-sized variant: configs/demo.py:quick=true through the real CLI.

Builds the quick digits testbed from scratch in a temporary cache, then runs every method. Checks the files a
user gets, not accuracies (the quick testbed's models are barely trained).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from adarank_jax.data import digits as digit_tasks

ROOT = Path(__file__).resolve().parents[2]
METHODS = (
  "zero_shot",
  "weight_averaging",
  "task_arithmetic",
  "ties",
  "cart",
  "tsv_m",
  "iso_c",
  "iso_cts",
  "adamerging_task",
  "adamerging_layer",
  "adarank_ta",
  "adarank_cart",
  "adarank_tsv_m",
  "adarank_iso_cts",
)


def test_demo_quick_writes_every_result(tmp_path):
  env = {**os.environ, "ADARANK_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "adarank_jax.main",
      "--config",
      "configs/demo.py:quick=true",
      f"--workdir={workdir}",
    ],  # the demo config exports every merged model by itself
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"Digits testbed: building {tmp_path / 'cache'}" in proc.stdout  # the cache path is printed

  results = json.loads((workdir / "results.json").read_text())
  assert tuple(results["tasks"]) == digit_tasks.TASKS and len(results["tasks"]) >= 8
  assert tuple(results["methods"]) == METHODS
  assert set(results["individual"]) == set(digit_tasks.TASKS)
  for scores in [results["individual"], *results["methods"].values()]:
    assert all(0.0 <= scores[t] <= 1.0 for t in digit_tasks.TASKS)
  table = (workdir / "results.md").read_text()
  assert all(f"| {m} |" in table for m in METHODS) and "Norm. avg." in table
  assert "| adarank_cart |" in proc.stdout  # the table is printed too
  for method in METHODS[METHODS.index("adamerging_task") :]:
    assert (workdir / method / "masks").is_dir()
    assert (workdir / "export" / f"{method}.safetensors").stat().st_size > 0
    if method.startswith("adarank"):
      assert (workdir / method / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert results["steps"] == {
    "adamerging_task": 6,
    "adamerging_layer": 6,
    "adarank_ta": 6,
    "adarank_cart": 6,
    "adarank_tsv_m": 6,
    "adarank_iso_cts": 6,
  }
  assert (workdir / "metrics.jsonl").read_text().count("\n") > 0
