"""Runs that span processes: 2 processes x 4 CPU devices (jax.distributed over localhost, CPU collectives)
run the real CLI on the quick digits config and reach the scores (exactly) and masks (to float32 rounding)
of 1 process x 8 devices: with the factors sharded on the task axis, killed together after a checkpoint and
resumed; and with replicated factors, where each process's input pipeline reads half of every batch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from adarank_jax.storage import checkpoint

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("task_arithmetic", "adamerging_task", "adarank_ta")


def _args(workdir, *extra, placement="task", methods=METHODS):
  return [
    sys.executable,
    "-m",
    "adarank_jax.main",
    "--config",
    "configs/demo.py:quick=true",
    f"--workdir={workdir}",
    f"--config.methods={methods!r}",
    f"--config.mesh.factor_placement={placement}",
    "--config.adarank.num_steps=12",
    "--config.adarank.checkpoint_every=3",
    "--config.export=",
    *extra,
  ]


def _env(cache, devices):
  return {
    **os.environ,
    "ADARANK_JAX_CACHE": str(cache),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
  }


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_two(workdir, cache, *extra, placement="task", methods=METHODS):
  """Both processes of one run (each its own command, as on two hosts): [(process, log file)]."""
  port = _free_port()
  launched = []
  for i in range(2):
    log = workdir.parent / f"{workdir.name}.{i}.{len(list(workdir.parent.glob('*.log')))}.log"
    with open(log, "w") as out:
      args = _args(
        workdir,
        "--config.mesh.multi_host=true",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *extra,
        placement=placement,
        methods=methods,
      )
      launched.append((subprocess.Popen(args, cwd=ROOT, env=_env(cache, 4), stdout=out, stderr=out), log))
  return launched


def _wait(launched, timeout=900):
  outputs = []
  for process, log in launched:
    process.wait(timeout=timeout)
    outputs.append(log.read_text())
    assert process.returncode == 0, outputs[-1][-4000:]
  return outputs


def _masks(outputs):
  return checkpoint.load_tree(outputs / "adarank_ta" / "masks")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The quick digits testbed's cache, built by the first run that needs it."""
  return tmp_path_factory.mktemp("testbed")


def _single(workdir, cache, placement, *extra, methods=METHODS):
  """The reference: one process of 8 devices."""
  single = subprocess.run(
    _args(workdir, *extra, placement=placement, methods=methods),
    cwd=ROOT,
    env=_env(cache, 8),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert single.returncode == 0, single.stdout[-4000:] + single.stderr[-4000:]
  return single.stdout


def _assert_same_scores(reference, workdir, methods=METHODS):
  """Both processes' scores of `methods` equal the reference's exactly."""
  expected = json.loads((reference / "results.json").read_text())
  for outputs_dir in (workdir, workdir / "processes" / "1"):  # process 0's reports and process 1's
    got = json.loads((outputs_dir / "results.json").read_text())
    assert set(got["methods"]) == set(methods)
    for method in methods:
      for task, score in expected["methods"][method].items():
        assert got["methods"][method][task] == score, (method, task)


def _assert_same_run(reference, workdir, methods=METHODS):
  """Both processes' results equal the reference's exactly; the same components kept, the logits and
  coefficients within the rounding of gloo's sums."""
  _assert_same_scores(reference, workdir, methods)
  reference, masks = _masks(reference), _masks(workdir)
  assert jax.tree.structure(reference) == jax.tree.structure(masks)
  for a, b in zip(jax.tree.leaves(reference["mask_logits"]), jax.tree.leaves(masks["mask_logits"])):
    np.testing.assert_array_equal(a > 0, b > 0)  # the same components kept
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(masks)):
    # gloo's cross-process sums add in an order of their own (1 ulp apart from the one process's), and
    # 12 Adam steps carry that to a few 1e-6 relative in the coefficients (CI saw 2.9e-6 and 5e-6).
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


# The step's layout is pinned to the config's, as in the other resume tests; the auto layout across
# processes is run by the replicated test below.
PINNED = ("--config.adarank.layout=config",)


def test_two_processes_killed_and_resumed_equal_one_process_of_eight_devices(tmp_path, cache):
  single = _single(tmp_path / "single", cache, "task", *PINNED)
  assert "mesh: {'data': 1, 'task': 8} over 8 cpu device(s)" in single

  workdir = tmp_path / "two"
  first = _launch_two(workdir, cache, *PINNED)
  step_3 = workdir / "adarank_ta" / "checkpoints" / "3"
  deadline = time.time() + 900
  while not (step_3 / checkpoint.CHECKSUM_NAME).exists():
    running = [p.poll() is None for p, _ in first]
    assert time.time() < deadline and all(running), [log.read_text()[-3000:] for _, log in first]
    time.sleep(0.05)
  for p, _ in first:  # both hosts go down together, mid-way through AdaRank's 12 steps
    p.send_signal(signal.SIGKILL)
  for p, _ in first:
    p.wait()
  saved = checkpoint.Manager(workdir / "adarank_ta" / "checkpoints").all_steps()
  assert saved and max(saved) < 12 and not (workdir / "results.json").exists(), saved

  outputs = _wait(_launch_two(workdir, cache, "--resume", *PINNED))
  # The factors are split over all 8 devices; every process reads whole batches (the 'data' axis is 1).
  assert "mesh: {'data': 1, 'task': 8} over 8 cpu device(s)" in outputs[0]
  assert "process 1 of 2 reads part 1 of 1 of every batch" in outputs[1]
  _assert_same_run(tmp_path / "single", workdir)


def test_each_process_reads_its_part_of_every_batch(tmp_path, cache):
  """Replicated factors: every batch is split over 8 devices, 4 per process, so each process's pipeline
  reads its half of every adaptation and evaluation batch. AdaRank's step layout is timed ('auto') by
  process 0 for both (AdaMerging's step, trained in the test above, is left out: its timing across
  processes is the same code and a minute of this machine)."""
  replicated = ("task_arithmetic", "adarank_ta")
  single = _single(tmp_path / "single", cache, "replicated", methods=replicated)
  assert "mesh: {'data': 8} over 8 cpu device(s)" in single
  workdir = tmp_path / "two"
  outputs = _wait(_launch_two(workdir, cache, placement="replicated", methods=replicated))
  for i, log in enumerate(outputs):
    assert f"process {i} of 2 reads part {i + 1} of 2 of every batch" in log
    assert "step layout: " in log and "s a step" in log[: log.index("step layout: ")]
  _assert_same_run(tmp_path / "single", workdir, replicated)
  # Starting over in the same workdir: process 0 clears it while process 1 waits, then both run again
  # (one static method: the clearing is what is checked, the training was checked above).
  (workdir / "processes" / "1" / "stale.txt").write_text("from the first run")
  again = ("task_arithmetic",)
  _wait(_launch_two(workdir, cache, "--overwrite", placement="replicated", methods=again))
  assert not (workdir / "processes" / "1" / "stale.txt").exists()
  assert not (workdir / "adarank_ta").exists()  # the first run's method folders are gone too
  _assert_same_scores(tmp_path / "single", workdir, methods=again)


_PLACE = """
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from adarank_jax.core import train
factors = {"a": np.ones((2, 3), np.float32), "b": np.full((2, 3), float(sys.argv[3]), np.float32)}
placed = train.place_frozen(({"w": np.zeros(3, np.float32)}, factors), train.make_mesh(task=2), factor_placement="task")
print("placed", float(jax.jit(lambda f: f["b"].sum())(placed[1])))
"""


def test_factors_that_differ_between_processes_are_refused(tmp_path):
  """Each host decomposes on its own: placing values that differ between hosts is an error naming them,
  not a silent mix of each host's shards."""
  for values, ok in (((0.5, 0.5), True), ((0.5, 0.25), False)):
    port = _free_port()
    runs = [
      subprocess.Popen(
        [sys.executable, "-c", _PLACE, f"localhost:{port}", str(i), str(values[i])],
        cwd=ROOT,
        env=_env(tmp_path, 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i in (0, 1)
    ]
    outputs = [(run.communicate(timeout=300)[0], run.returncode) for run in runs]
    for log, code in outputs:
      if ok:
        assert code == 0 and "placed 3.0" in log, log[-3000:]
      else:
        assert code != 0 and "1 of 3 arrays differ between the 2 processes (e.g. 1/b)" in log, log[-3000:]
