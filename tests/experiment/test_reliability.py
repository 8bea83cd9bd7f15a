"""Issue #11, "no silent garbage": bad numbers, torn files, killed and concurrent runs, clear errors.

Mostly unit-level; two real CLI runs of configs/demo.py:quick=true (one finished run, then a resume of it
with more steps after simulating a kill) are shared by the tests of the module-scoped fixture.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adarank_jax.experiment import report, validate
from adarank_jax.interop import state_dict as sd_io
from adarank_jax.storage import checkpoint, files
from configs import common

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs/demo.py") + ":quick=true"


# ----------------------------------------------------------------------------------- 2: config numbers
def _problems(**overrides):
  config = common.base()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(validate.ConfigError) as info:
    validate.validate(config)  # the empty paths are problems too: the error lists everything at once
  return str(info.value)


def test_validate_rejects_non_finite_floats():
  message = _problems(
    **{
      "adarank.ta.prior": float("nan"),
      "adarank.cart.learning_rate": float("inf"),
      "adarank.mask_temperature": float("inf"),
      "merge.ties.scaling": float("-inf"),
    }
  )
  assert "adarank.ta.prior=nan: expected a finite number" in message
  assert "adarank.cart.learning_rate=inf: expected a finite number" in message
  assert "adarank.mask_temperature=inf: expected a finite number" in message
  assert "merge.ties.scaling=-inf: expected a finite number" in message
  assert "adarank.ta.prior" not in _problems()  # the defaults are fine


def test_markdown_never_shows_normalized_scores_of_non_finite_numbers():
  results = report.new_results(name="n", tasks=["a", "b"], model="m", selection=report.SELECTION_FINAL)
  results["individual"] = {"a": float("nan"), "b": 0.8}
  results["methods"]["ta"] = {"a": 0.5, "b": float("inf")}
  results["methods"]["ok"] = {"a": 0.5, "b": 0.4}
  table = report.markdown_table(results)
  assert "nan" not in table.lower() and "inf" not in table.lower(), table
  assert "| ok | 50.0 | 40.0 | 45.0 | 50.0 |" in table  # the finite ratio (b) still counts


# ----------------------------------------------------------------------------------- 6: masks replaced
def test_replace_tree_replaces_a_saved_tree(tmp_path):
  path = tmp_path / "masks"
  checkpoint.replace_tree(path, {"w": np.zeros(3, np.float32)})
  checkpoint.replace_tree(path, {"w": np.ones(3, np.float32)})
  np.testing.assert_array_equal(checkpoint.load_tree(path)["w"], np.ones(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]  # no temp or old dirs left


# ----------------------------------------------------------------------------------- 7: workdir lock
def test_second_lock_on_a_workdir_fails_naming_the_holder(tmp_path):
  with files.WorkdirLock(tmp_path / "w"):
    assert (tmp_path / "w" / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(files.WorkdirBusyError, match=rf"pid {os.getpid()}\b"):
      files.WorkdirLock(tmp_path / "w").acquire()
  files.WorkdirLock(tmp_path / "w").acquire().release()  # free again once released


# ----------------------------------------------------------------------------------- 9: torn records
def test_torn_last_jsonl_record_is_dropped_with_a_warning(tmp_path):
  path = tmp_path / "evals.jsonl"
  path.write_text('{"step": 2, "average": 0.5}\n{"step": 4, "aver')
  with pytest.warns(UserWarning, match="evals.jsonl: dropped a torn last record"):
    assert report.read_jsonl(path) == [{"step": 2, "average": 0.5}]
  path.write_text('{"step": 2, "average": 0.5}\n{"step": 4, "aver\n{"step": 6, "average": 0.7}\n')
  with pytest.raises(ValueError, match="evals.jsonl: line 2"):
    report.read_jsonl(path)


def test_append_after_a_torn_record_keeps_the_file_readable(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  with pytest.warns(UserWarning, match="metrics.jsonl"):
    report.write_jsonl(path, {"step": 2, "loss": 0.5})
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
    {"step": 1, "loss": 1.0},
    {"step": 2, "loss": 0.5},
  ]


def test_best_evaluation_tolerates_a_torn_evals_file(tmp_path):
  from adarank_jax.experiment import run

  path = tmp_path / "evals.jsonl"
  path.write_text('{"step": 2, "scores": {}, "average": 0.5}\n{"step": 4, "scores"')
  with pytest.warns(UserWarning, match="evals.jsonl"):
    assert run._best_evaluation(path, "average")["step"] == 2


def test_corrupt_json_files_are_named(tmp_path):
  results = tmp_path / "results.json"
  results.write_text('{"name": "x", "mod')
  with pytest.raises(ValueError, match=r"results\.json: truncated or corrupt JSON"):
    report.read_results_json(results)
  (tmp_path / "config.json").write_text('{"name": ')
  with pytest.raises(validate.ConfigError, match=r"config\.json: cannot read the saved config"):
    validate.check_workdir(common.base(), tmp_path, resume=False, overwrite=False)


# ----------------------------------------------------------------------------------- 10: atomic writes
def test_write_atomic_leaves_no_temp_and_names_the_path_on_enospc(tmp_path, monkeypatch):
  target = tmp_path / "results.json"
  files.write_atomic(target, "old\n")

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(files.os, "fsync", full)
  with pytest.raises(OSError, match="No space left") as info:
    files.write_atomic(target, "new\n")
  assert info.value.filename == str(target)
  assert target.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path):
  stale = [
    tmp_path / ".results.json.x1y2.tmp",
    tmp_path / "cache" / "heads_a.npy.tmp1234",
    tmp_path / "adarank_ta" / ".masks.abc.tmp",
  ]
  for path in stale[:2]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("half")
  stale[2].mkdir(parents=True)
  keep = [tmp_path / "results.json", tmp_path / "cache" / "heads_a.npy"]
  for path in keep:
    path.write_text("whole")
  assert sorted(files.remove_stale_temps(tmp_path)) == sorted(stale)
  assert all(not p.exists() for p in stale) and all(p.exists() for p in keep)


def test_run_modules_write_files_only_through_the_helper():
  for name in (
    "main.py",
    "experiment/run.py",
    "experiment/report.py",
    "experiment/validate.py",
    "storage/checkpoint.py",
  ):
    source = (ROOT / "adarank_jax" / name).read_text()
    for hand_rolled in (".write_text(", "os.replace(", "os.rename(", "mkstemp("):
      assert hand_rolled not in source, f"{name} writes with {hand_rolled}"


# ----------------------------------------------------------------------------------- 15: messages
def test_pickle_refusal_names_the_switch_of_each_entry_point(tmp_path):
  import torch

  path = tmp_path / "module.pt"
  torch.save(torch.nn.Linear(2, 2), path)
  with pytest.raises(sd_io.CheckpointError) as info:
    sd_io.load_state_dict(path)
  assert "--config.model.run_pickled_code=true (python -m adarank_jax.main)" in str(info.value)
  assert "--run-pickled-code (python -m convert.openclip)" in str(info.value)


@pytest.mark.parametrize("content", [b"a text file, not a checkpoint\n", b"garbage", b""])
def test_not_a_checkpoint_says_so(tmp_path, content):
  path = tmp_path / "not_a_checkpoint.pt"
  path.write_bytes(content)
  with pytest.raises(sd_io.CheckpointError, match="not a PyTorch/safetensors checkpoint") as info:
    sd_io.load_state_dict(path)
  assert "IndexError" not in str(info.value) and "pop from empty list" not in str(info.value)


# ----------------------------------------------------------------------------------- the CLI in process
def _main(capsys, *args, env=None, monkeypatch=None):
  """main.main with these flags, in this process; returns (exit status, stderr)."""
  from absl import flags

  from adarank_jax import main

  argv = ["adarank_jax.main", f"--config={DEMO}", *args]
  saved_argv = sys.argv
  sys.argv = argv  # ml_collections reads the --config.x overrides from sys.argv
  try:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # a previous call's overrides
      delattr(flags.FLAGS, name)
    flags.FLAGS(argv)
  finally:
    sys.argv = saved_argv
  if env and monkeypatch:
    for key, value in env.items():
      monkeypatch.setenv(key, value)
  capsys.readouterr()
  status = main.main([])
  return status, capsys.readouterr().err


def _garbage_checkpoints(tmp_path):
  """Files that pass validation (they exist) and fail loading (they are not checkpoints)."""
  from adarank_jax.data import digits as digit_tasks

  ckpts = tmp_path / "ckpts"
  ckpts.mkdir()
  (ckpts / "pretrained.pt").write_bytes(b"a text file")
  for task in digit_tasks.TASKS:
    (ckpts / f"{task}.pt").write_bytes(b"a text file")
  return [
    f"--config.model.pretrained={ckpts / 'pretrained.pt'}",
    f"--config.model.finetuned={ckpts / '{task}.pt'}",
    "--config.testbed.name=",
    "--config.methods=('zero_shot',)",
    "--config.model.name=ViT-B-32",
  ]


def test_failed_load_writes_no_config_and_is_one_error_line(tmp_path, capsys):
  workdir = tmp_path / "w"
  status, err = _main(capsys, f"--workdir={workdir}", *_garbage_checkpoints(tmp_path))
  assert status == 1
  assert "error: " in err and "Traceback" not in err, err
  assert "not a PyTorch/safetensors checkpoint" in err
  assert not (workdir / "config.json").exists()
  assert validate.check_workdir(common.base(), workdir, resume=False, overwrite=False) is False


def test_bad_numbers_fail_before_anything_is_written(tmp_path, capsys):
  workdir = tmp_path / "w"
  status, err = _main(
    capsys,
    f"--workdir={workdir}",
    "--config.adarank.ta.prior=nan",
    "--config.adarank.mask_temperature=inf",
    *_garbage_checkpoints(tmp_path),
  )
  assert status == 1 and "adarank.ta.prior=nan" in err and "mask_temperature=inf" in err
  assert "Traceback" not in err and not workdir.exists()


def test_workdir_errors_name_the_path(tmp_path, capsys, monkeypatch):
  checkpoints = _garbage_checkpoints(tmp_path)
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  status, err = _main(capsys, f"--workdir={a_file}", *checkpoints)
  assert status == 1 and f"error: {a_file}: the workdir is a file" in err and "Traceback" not in err
  status, err = _main(capsys, f"--workdir={a_file}", "--verbose", *checkpoints)
  assert status == 1 and "Traceback" in err and f"error: {a_file}" in err

  read_only = tmp_path / "read_only"
  read_only.mkdir()
  real_open = os.open

  def refuse(path, *args, **kwargs):  # what a read-only directory does (the tests may run as root)
    if str(path).startswith(str(read_only)):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(files.os, "open", refuse)
  status, err = _main(capsys, f"--workdir={read_only}", *checkpoints)
  monkeypatch.undo()
  assert status == 1 and f"error: {read_only / '.lock'}: Permission denied" in err, err


def test_second_run_on_a_workdir_stops_naming_the_holder(tmp_path, capsys):
  workdir = tmp_path / "w"
  with files.WorkdirLock(workdir):
    status, err = _main(capsys, f"--workdir={workdir}", *_garbage_checkpoints(tmp_path))
  assert status == 1 and f"another run (pid {os.getpid()})" in err, err
  assert not (workdir / "config.json").exists()


# ----------------------------------------------------------------------------------- real CLI runs
def _cli(workdir, *extra):
  args = [
    sys.executable,
    "-m",
    "adarank_jax.main",
    f"--config={DEMO}",
    f"--workdir={workdir}",
    "--config.methods=('adarank_ta',)",
    "--export=",
    *extra,
  ]
  result = subprocess.run(
    args,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """A finished quick demo run (6 steps), a simulated kill (records after its last checkpoint, torn last
  records, a temp file), then --resume with num_steps raised to 9."""
  workdir = tmp_path_factory.mktemp("demo") / "w"
  _cli(workdir)
  first_masks = checkpoint.load_tree(workdir / "adarank_ta" / "masks")
  first_metrics = files.read_jsonl(workdir / "metrics.jsonl")
  first_evals = files.read_jsonl(workdir / "adarank_ta" / "evals.jsonl")
  # What a run killed after its step-6 checkpoint, at step 8, would have left on top:
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 7, "wall_time": 0.0, "adarank_ta/loss": 123.0}) + "\n")
    f.write('{"step": 8, "wall_time": 0.0, "adarank_ta/lo')
  with open(workdir / "adarank_ta" / "evals.jsonl", "a") as f:
    f.write(json.dumps({"step": 8, "scores": {}, "average": 0.0}) + "\n")
    f.write('{"step": 9, "sco')
  (workdir / ".results.json.k1ll3d.tmp").write_text("{half")
  _cli(workdir, "--resume", "--config.adarank.num_steps=9")
  return {
    "workdir": workdir,
    "first_masks": first_masks,
    "first_metrics": first_metrics,
    "first_evals": first_evals,
  }


def test_resume_with_more_steps_replaces_the_masks(resumed):
  from adarank_jax.core import tree_util

  workdir = resumed["workdir"]
  assert report.read_results_json(workdir / "results.json")["steps"] == {"adarank_ta": 9}
  new = tree_util.flatten(checkpoint.load_tree(workdir / "adarank_ta" / "masks"))
  old = tree_util.flatten(resumed["first_masks"])
  assert new.keys() == old.keys()
  assert any(not np.array_equal(new[k], old[k]) for k in new), "masks/ still holds the 6-step run"


def test_resume_logs_every_record_once(resumed):
  workdir = resumed["workdir"]
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], tuple(sorted(k for k in r if k != "wall_time"))) for r in metrics]
  assert len(keys) == len(set(keys)), "duplicate metric records"
  assert not any(r.get("adarank_ta/loss") == 123.0 for r in metrics)  # the killed run's step 7 went
  assert [r["step"] for r in metrics if "adarank_ta/loss" in r] == [3, 6, 9]
  evals = [json.loads(line) for line in (workdir / "adarank_ta" / "evals.jsonl").read_text().splitlines()]
  assert [r["step"] for r in evals] == [r["step"] for r in resumed["first_evals"]]


def test_resume_removes_the_temp_files_of_the_killed_run(resumed):
  assert not (resumed["workdir"] / ".results.json.k1ll3d.tmp").exists()
  assert not list(resumed["workdir"].rglob("*.tmp"))


# ----------------------------------------------------------------------------------- 13: checks first
def test_bad_values_fail_before_the_testbed_is_built(tmp_path, capsys, monkeypatch):
  cache = tmp_path / "cache"
  status, err = _main(
    capsys,
    f"--workdir={tmp_path / 'w'}",
    "--config.adarank.num_steps=0",
    env={"ADARANK_JAX_CACHE": str(cache)},
    monkeypatch=monkeypatch,
  )
  assert status == 1 and "adarank.num_steps=0" in err, err
  assert not cache.exists() or not any(cache.iterdir())  # no testbed was built for a bad config


def test_every_missing_data_set_is_listed_before_any_checkpoint_is_loaded(tmp_path, capsys):
  status, err = _main(
    capsys,
    f"--workdir={tmp_path / 'w'}",
    *_garbage_checkpoints(tmp_path),
    "--config.tasks=('Cars','DTD','MNIST')",
    f"--config.data.data_dir={tmp_path / 'no_data'}",
  )
  assert status == 1 and "3 of 3 data sets cannot be read" in err, err
  assert all(task in err for task in ("Cars", "DTD", "MNIST"))
  assert "not a PyTorch/safetensors checkpoint" not in err  # the checkpoints were not opened yet


def test_every_bad_checkpoint_is_listed(tmp_path, capsys):
  status, err = _main(capsys, f"--workdir={tmp_path / 'w'}", *_garbage_checkpoints(tmp_path))
  assert status == 1 and "9 of 9 checkpoints cannot be used" in err, err
  assert "pretrained.pt" in err and "DigitsMod3.pt" in err
  assert not (tmp_path / "w").exists()  # a refused run leaves no workdir behind


def test_a_refused_run_keeps_a_workdir_that_holds_anything(tmp_path, capsys):
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "notes.txt").write_text("mine")
  status, _ = _main(capsys, f"--workdir={tmp_path / 'w'}", *_garbage_checkpoints(tmp_path))
  assert status == 1 and (tmp_path / "w" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_end_with_the_mode_an_ordinary_open_gives(tmp_path, umask):
  previous = os.umask(umask)
  try:
    files.write_atomic(tmp_path / "text.json", "{}\n")
    files.write_atomic(tmp_path / "written_by.bin", lambda p: Path(p).write_bytes(b"x"))
    files.write_json(tmp_path / "deeper/new/value.json", [1])

    def fill(directory):
      directory.mkdir()
      (directory / "inside.txt").write_text("x")

    files.replace_dir(tmp_path / "tree", fill)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference
      f.write("x")
    (tmp_path / "plain_dir").mkdir()
  finally:
    os.umask(previous)
  expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
  assert expected == 0o666 & ~umask
  for name in ("text.json", "written_by.bin", "deeper/new/value.json", "tree/inside.txt"):
    assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
  for name in ("deeper", "deeper/new", "tree"):
    assert (tmp_path / name).stat().st_mode & 0o777 == (tmp_path / "plain_dir").stat().st_mode & 0o777, name
