import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adarank_jax.storage import checkpoint


def _tree():
  return {
    "blocks": {
      0: {"k": np.arange(6, dtype=np.float32).reshape(2, 3)},
      1: {"k": np.ones((2, 3), ml_dtypes.bfloat16)},
    },
    "step": np.array(7, np.int32),
  }


def test_save_load_tree(tmp_path):
  checkpoint.save_tree(tmp_path / "t", _tree())
  for restored in (checkpoint.load_tree(tmp_path / "t"), checkpoint.load_tree(tmp_path / "t", _tree())):
    assert set(restored["blocks"]) == {0, 1}
    np.testing.assert_array_equal(restored["blocks"][0]["k"], _tree()["blocks"][0]["k"])
    assert np.asarray(restored["blocks"][1]["k"]).dtype == ml_dtypes.bfloat16
    assert int(restored["step"]) == 7
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    checkpoint.save_tree(tmp_path / "t", _tree())
  with pytest.raises(FileNotFoundError, match="no saved tree"):
    checkpoint.load_tree(tmp_path / "absent")


def test_manager_keeps_newest(tmp_path):
  manager = checkpoint.Manager(tmp_path / "ckpts", max_to_keep=2)
  assert manager.latest_step() is None
  for step in range(3):
    tree = _tree()
    tree["step"] = np.array(step, np.int32)
    manager.save(step, tree)
  assert manager.all_steps() == [1, 2] and manager.latest_step() == 2
  assert int(manager.restore(2, _tree())["step"]) == 2
  manager.close()


def test_a_step_of_the_earlier_one_item_layout_is_refused_not_deleted(tmp_path):
  # What adarank_jax wrote before the input pipeline's state was saved beside the tree: Orbax's
  # single unnamed item.
  old = ocp.CheckpointManager(tmp_path / "ckpts", options=ocp.CheckpointManagerOptions(create=True))
  for step in (3, 6):
    old.save(step, args=ocp.args.StandardSave(_tree()))
  old.wait_until_finished()
  old.close()
  manager = checkpoint.Manager(tmp_path / "ckpts")
  assert manager.latest_step() == 6
  for read in (lambda: manager.restore(6, _tree()), lambda: manager.data(6), manager.latest_valid_step):
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"ckpts/6: written by an earlier"):
      read()
  assert manager.all_steps() == [3, 6]  # no fallback deleted anything
  manager.close()


def test_late_reads_of_a_failed_restore_are_counted_and_every_other_report_passes(monkeypatch, caplog):
  import logging
  import sys
  import types

  passed, excepted = [], []
  monkeypatch.setattr(sys, "unraisablehook", passed.append)
  monkeypatch.setattr(sys, "excepthook", lambda *exc: excepted.append(exc[1]))
  late = checkpoint._LateReads()
  late.install()
  late.install()  # once per process: the second call chains nothing more
  try:

    def report(error):
      return types.SimpleNamespace(
        exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=None
      )

    with caplog.at_level(logging.DEBUG, logger=checkpoint.__name__):
      for _ in range(3):
        sys.unraisablehook(report(RuntimeError("Event loop is closed")))
      other = report(RuntimeError("something else"))
      sys.unraisablehook(other)
      # A TensorStore thread's late read prints through sys.excepthook, not as unraisable.
      closed, uncaught = RuntimeError("Event loop is closed"), ValueError("a real error")
      sys.excepthook(RuntimeError, closed, None)
      sys.excepthook(ValueError, uncaught, None)
      abandoned = logging.LogRecord(
        "asyncio", logging.ERROR, "", 0, "Task exception was never retrieved", (), None
      )
      kept = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Executing <Task> took 1 s", (), None)
      assert not late._keep(abandoned) and late._keep(kept)
    assert late.count == 4 and passed == [other] and excepted == [uncaught]
    assert sum("hit the closed event loop" in r.getMessage() for r in caplog.records) == 4
    assert any("abandoned checkpoint read" in r.getMessage() for r in caplog.records)
  finally:
    logging.getLogger("asyncio").removeFilter(late._keep)
