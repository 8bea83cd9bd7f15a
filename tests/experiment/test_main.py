"""The real CLI end to end on a tiny random CLIP: every method, a kill and --resume, export, bad input.

A run killed after a checkpoint and resumed with --resume must reach the same final masks and
coefficients as an uninterrupted run (bit for bit on CPU).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adarank_jax.core import tree_util
from adarank_jax.data import digits as digit_tasks
from adarank_jax.experiment import methods
from adarank_jax.models import clip, functional
from adarank_jax.storage import checkpoint

ROOT = Path(__file__).resolve().parents[2]
TASKS = digit_tasks.TASKS[:3]
TINY = {
  "embed_dim": 32,
  "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """A random tiny CLIP and three 'fine-tuned' ones (its image tower plus noise), as OpenCLIP files."""
  from flax import nnx

  from adarank_jax.interop import openclip, openclip_config

  root = tmp_path_factory.mktemp("ckpts")
  (root / "tiny.json").write_text(json.dumps(TINY))
  config = openclip_config.load_config(root / "tiny.json")
  _, pretrained = functional.split(clip.build(config, rngs=nnx.Rngs(0)))
  pretrained = {k: np.asarray(v) for k, v in tree_util.flatten(pretrained).items()}
  openclip.export_openclip(tree_util.unflatten(pretrained), root / "pretrained.safetensors")
  rng = np.random.default_rng(0)
  for task in TASKS:
    tuned = {
      k: v + (0.05 * rng.standard_normal(v.shape).astype(v.dtype) if k.startswith("visual/") else 0)
      for k, v in pretrained.items()
    }
    openclip.export_openclip(tree_util.unflatten(tuned), root / f"{task}.safetensors")
  return root


def _cli(checkpoints, workdir, *extra, steps=6, wait=True, env=None):
  args = [
    sys.executable,
    "-m",
    "adarank_jax.main",
    "--config",
    str(ROOT / "configs/demo.py") + ":quick=true",
    f"--workdir={workdir}",
    "--config.testbed.name=",
    f"--config.model.name={checkpoints / 'tiny.json'}",
    f"--config.model.pretrained={checkpoints / 'pretrained.safetensors'}",
    f"--config.model.finetuned={checkpoints / '{task}.safetensors'}",
    f"--config.tasks={TASKS!r}",
    f"--config.adarank.num_steps={steps}",
    "--config.adarank.checkpoint_every=2",
    "--config.adarank.log_every=1",
    "--config.adarank.eval_every=2",
    "--config.eval.max_examples=64",
    *extra,
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _masks(workdir, method="adarank_ta"):
  return tree_util.flatten(checkpoint.load_tree(workdir / method / "masks"))


def test_cli_runs_every_method_resumes_after_kill_and_exports(checkpoints, tmp_path):
  # Two independent runs compared bit for bit: the same step layout in both (the config's), not
  # one timed per run (tested below).
  fixed = "--config.adarank.layout=config"
  straight = _cli(checkpoints, tmp_path / "straight", "--export=safetensors", fixed)
  assert straight.returncode == 0, straight.stdout + straight.stderr
  results = json.loads((tmp_path / "straight/results.json").read_text())
  assert set(results["methods"]) == set(methods.METHODS) - {"individual"}  # every row of the table
  assert set(results["individual"]) == set(TASKS) and results["selection"] == "final step"
  for scores in results["methods"].values():
    assert set(scores) == set(TASKS) and all(0.0 <= s <= 1.0 for s in scores.values())
  for name in ("results.md", "metrics.jsonl", "adarank_ta/rank_heatmap.png", "adarank_cart/evals.jsonl"):
    assert (tmp_path / "straight" / name).stat().st_size > 0, name
  assert "| adarank_cart |" in (tmp_path / "straight/results.md").read_text()
  # Outputs are readable as an ordinary open() would leave them (the run inherits this umask).
  umask = os.umask(0o022)
  os.umask(umask)
  for name in ("results.json", "results.md", "config.json", "export/adarank_ta.safetensors"):
    assert (tmp_path / "straight" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

  # The export is an OpenCLIP state dict that open_clip itself loads (strict) into the same architecture.
  import open_clip
  import torch
  from safetensors.torch import load_file

  open_clip.add_model_config(checkpoints)
  model = open_clip.create_model("tiny", pretrained=None)
  model.load_state_dict(load_file(tmp_path / "straight/export/adarank_ta.safetensors"), strict=True)
  assert torch.isfinite(model.visual.proj).all()

  # Kill a second run (SIGKILL) once its step-2 checkpoint is on disk, then resume it: the two methods
  # compared (the static ones before them were run above).
  compared = ("adarank_ta", "adarank_cart")
  proc = _cli(checkpoints, tmp_path / "killed", fixed, f"--config.methods={compared!r}", wait=False)
  step_dir = tmp_path / "killed/adarank_ta/checkpoints/2"
  deadline = time.time() + 500
  while not step_dir.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert step_dir.exists(), proc.communicate()[0].decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "killed/results.json").exists()
  resumed = _cli(checkpoints, tmp_path / "killed", "--resume", fixed, f"--config.methods={compared!r}")
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  for method in compared:
    a, b = _masks(tmp_path / "straight", method), _masks(tmp_path / "killed", method)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{method} {key}")


def test_cli_fsdp_on_eight_devices_learns_what_one_device_learns(checkpoints, tmp_path):
  # The origin and the factor stacks split 4 ways over 'model', every batch 8 ways (2 x 4 devices).
  args = ("--config.adarank.layout=config", "--config.methods=('adarank_ta',)", "--export=safetensors")
  one = _cli(checkpoints, tmp_path / "one", *args)
  assert one.returncode == 0, one.stdout + one.stderr
  eight = _cli(
    checkpoints,
    tmp_path / "eight",
    *args,
    "--config.mesh.factor_placement=fsdp",
    "--config.mesh.model_devices=4",
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  )
  assert eight.returncode == 0, eight.stdout + eight.stderr
  assert "mesh: {'data': 2, 'model': 4} over 8 cpu device(s)" in eight.stdout
  a, b = _masks(tmp_path / "one"), _masks(tmp_path / "eight")
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  from safetensors.numpy import load_file

  merged_one = load_file(tmp_path / "one/export/adarank_ta.safetensors")
  merged_eight = load_file(tmp_path / "eight/export/adarank_ta.safetensors")
  for key, value in merged_one.items():
    np.testing.assert_allclose(merged_eight[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_cli_chooses_the_step_layout_stores_it_and_a_resumed_run_keeps_it(checkpoints, tmp_path):
  # adarank.layout='auto' (the default): the layout is timed at the first method's start, logged and
  # stored; a run killed after its first checkpoint resumes with the stored layout (no timing), and
  # ends with the masks of an uninterrupted run that uses that layout. The second method trains a
  # step of the same shapes, so it takes the first one's timing instead of timing again.
  only = "--config.methods=('adarank_ta',)"
  both = "--config.methods=('adarank_ta','adarank_cart')"
  proc = _cli(checkpoints, tmp_path / "auto", both, wait=False)
  stored, step_dir = tmp_path / "auto/adarank_ta/layout.json", tmp_path / "auto/adarank_ta/checkpoints/2"
  deadline = time.time() + 500
  while not step_dir.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert step_dir.exists(), proc.communicate()[0].decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  log = proc.communicate()[0].decode()
  record = json.loads(stored.read_text())
  chosen = record["layout"]
  assert len(record["timed"]) == 3 and all(t["step_s"] > 0 for t in record["timed"])
  fastest = min(record["timed"], key=lambda t: t["step_s"])
  assert chosen == {k: fastest[k] for k in chosen}
  assert chosen["cache_deltas"] is True  # the tiny cache fits
  assert record["machine"]["cpu"] and log.count("s a step") == 3
  resumed = _cli(checkpoints, tmp_path / "auto", both, "--resume")
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "chosen by an earlier run" in resumed.stdout and "s a step" not in resumed.stdout
  assert "(timed for adarank_ta, a step of the same shapes)" in resumed.stdout
  assert json.loads(stored.read_text())["layout"] == chosen
  cart = json.loads((tmp_path / "auto/adarank_cart/layout.json").read_text())
  assert cart["layout"] == chosen and cart["method"] == "adarank_ta" and cart["timed"] == record["timed"]
  fixed = [f"--config.adarank.{k}={v}" for k, v in chosen.items()]
  straight = _cli(checkpoints, tmp_path / "fixed", only, "--config.adarank.layout=config", *fixed)
  assert straight.returncode == 0, straight.stdout + straight.stderr
  assert not (tmp_path / "fixed/adarank_ta/layout.json").exists()
  a, b = _masks(tmp_path / "fixed"), _masks(tmp_path / "auto")
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_cli_validation_selection_survives_a_kill_between_evaluation_points(checkpoints, tmp_path):
  extra = (
    "--config.adarank.selection=validation",
    "--config.methods=('adamerging_task', 'adarank_ta')",
    "--config.adamerging.num_steps=6",
    "--config.adarank.learn=both",
    "--config.adarank.layout=config",  # two independent runs compared: one layout in both
  )
  straight = _cli(checkpoints, tmp_path / "straight", *extra)
  assert straight.returncode == 0, straight.stdout + straight.stderr
  results = json.loads((tmp_path / "straight/results.json").read_text())
  assert results["selection"].startswith(
    "best average accuracy over evaluation points on labelled validation splits"
  )
  assert "validation selection: step" in straight.stdout
  records = [json.loads(line) for line in (tmp_path / "straight/adarank_ta/evals.jsonl").open()]
  assert [r["step"] for r in records] == [0, 2, 4, 6]
  best = max(records, key=lambda r: r["validation_average"])  # the first of equal scores wins
  assert results["selected_steps"]["adarank_ta"] == best["step"]
  assert set(records[0]["validation"]) == set(TASKS)
  assert [p.name for p in (tmp_path / "straight/adarank_ta/selected").iterdir()] == [f"step_{best['step']}"]

  proc = _cli(checkpoints, tmp_path / "killed", *extra, wait=False)
  step_dir = tmp_path / "killed/adarank_ta/checkpoints/2"
  deadline = time.time() + 500
  while not step_dir.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert step_dir.exists(), proc.communicate()[0].decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = _cli(checkpoints, tmp_path / "killed", "--resume", *extra)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  again = json.loads((tmp_path / "killed/results.json").read_text())
  assert again["selected_steps"] == results["selected_steps"]
  assert again["methods"] == results["methods"]
  resumed_records = [json.loads(line) for line in (tmp_path / "killed/adarank_ta/evals.jsonl").open()]
  assert [r["step"] for r in resumed_records] == [0, 2, 4, 6]  # nothing lost, nothing twice
  for method in ("adamerging_task", "adarank_ta"):
    a, b = _masks(tmp_path / "straight", method), _masks(tmp_path / "killed", method)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{method} {key}")


def test_cli_bad_input_fails_before_compute(checkpoints, tmp_path):
  missing = _cli(checkpoints, tmp_path / "w", "--config.model.finetuned=/nonexistent/{task}.pt")
  assert missing.returncode != 0
  assert "3 fine-tuned checkpoint(s) missing" in missing.stderr
  assert f"/nonexistent/{TASKS[0]}.pt" in missing.stderr
  assert not (tmp_path / "w").exists()
  bad_ratio = _cli(checkpoints, tmp_path / "w", "--config.adarank.cart.initial_rank_ratio=0")
  assert bad_ratio.returncode != 0 and "adarank.cart.initial_rank_ratio=0" in bad_ratio.stderr


def test_cli_warns_of_a_zero_task_vector_and_of_a_batch_larger_than_a_split(checkpoints, tmp_path):
  import shutil

  tuned = tmp_path / "tuned"
  tuned.mkdir()
  shutil.copy(checkpoints / "pretrained.safetensors", tuned / f"{TASKS[0]}.safetensors")  # unchanged
  for task in TASKS[1:]:
    shutil.copy(checkpoints / f"{task}.safetensors", tuned / f"{task}.safetensors")
  run = _cli(
    checkpoints,
    tmp_path / "w",
    f"--config.model.finetuned={tuned / '{task}.safetensors'}",
    "--config.methods=('task_arithmetic',)",
    "--config.adarank.batch_size_per_task=100000",
  )
  assert run.returncode == 0, run.stdout + run.stderr
  out = run.stdout + run.stderr
  assert f"the fine-tuned checkpoint of task {TASKS[0]} equals the pretrained one" in out
  assert out.count("equals the pretrained one") == 1  # the other tasks' are fine-tuned
  assert "adarank.batch_size_per_task=100000 is larger than its split" in out
  assert all(f"task {task}: adarank.batch_size_per_task" in out for task in TASKS)


def test_cli_a_corrupt_data_file_is_one_warning_line_and_verbose_shows_the_detail(checkpoints, tmp_path):
  # A run killed once its step-4 checkpoint is on disk; every data file of that step is then cut to
  # half its length. The resumed run falls back to step 2 with one warning line, not the tracebacks
  # of the reads Orbax left in flight; with --verbose the reader's whole error follows that line.
  import shutil

  extra = ("--config.methods=('adarank_ta',)", "--config.adarank.layout=config")
  proc = _cli(checkpoints, tmp_path / "killed", *extra, wait=False)
  step_dir = tmp_path / "killed/adarank_ta/checkpoints/4"
  deadline = time.time() + 500
  while not (step_dir / "checksum.json").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert (step_dir / "checksum.json").exists(), proc.communicate()[0].decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  data_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  shutil.copytree(tmp_path / "killed", tmp_path / "verbose")
  for workdir, verbose in ((tmp_path / "killed", False), (tmp_path / "verbose", True)):
    resumed = _cli(checkpoints, workdir, "--resume", *extra, *(("--verbose",) if verbose else ()))
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    warned = [line for line in out.splitlines() if "checkpoint cannot be read" in line]
    assert len(warned) == 1, out
    kept = workdir / "adarank_ta/checkpoints.corrupt/4"
    assert kept.is_dir()  # (training then wrote a good step 4 again)
    assert f"instead of {workdir / 'adarank_ta/checkpoints/4'}, which was moved to {kept};" in warned[0]
    assert warned[0].startswith("warning: ") != verbose
    assert (f"reading {workdir / 'adarank_ta/checkpoints/4'} failed:" in out) == verbose
    # Without --verbose nothing else: no traceback of a late read, no abandoned asyncio task.
    assert ("Traceback" in out) == verbose
    if not verbose:
      assert "Event loop is closed" not in out and "Task exception was never retrieved" not in out
