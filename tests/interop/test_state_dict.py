import json

import ml_dtypes
import numpy as np
import pytest
import torch

from adarank_jax.interop import state_dict as sd_io


def _state():
  rng = np.random.default_rng(0)
  return {
    "visual.w": rng.normal(size=(4, 3)).astype(np.float32),
    "visual.b": rng.normal(size=(3,)).astype(ml_dtypes.bfloat16),
    "visual.step": np.arange(3, dtype=np.int64),
    "visual.scale": np.array(4.6, np.float32),
  }  # 0-d, like CLIP's logit_scale


def _assert_bit_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_save_load_bit_exact(tmp_path, suffix):
  path = tmp_path / f"ckpt{suffix}"
  sd_io.save_state_dict(_state(), path)
  _assert_bit_equal(sd_io.load_state_dict(path), _state())
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_wrapped_and_prefixed(tmp_path):
  tensors = {k: sd_io._to_torch(v) for k, v in _state().items()}
  path = tmp_path / "wrapped.pt"
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tensors.items()}}, path)
  _assert_bit_equal(sd_io.load_state_dict(path), _state())


def test_pickled_module_needs_flag(tmp_path):
  path = tmp_path / "module.pt"
  torch.save(torch.nn.Linear(3, 2), path)
  with pytest.raises(sd_io.CheckpointError, match=r"module\.pt.*run_pickled_code=True"):
    sd_io.load_state_dict(path)
  loaded = sd_io.load_state_dict(path, run_pickled_code=True)
  assert set(loaded) == {"weight", "bias"} and loaded["weight"].shape == (2, 3)


def test_bad_files_are_named(tmp_path):
  with pytest.raises(sd_io.CheckpointError, match="missing.pt: no such file"):
    sd_io.load_state_dict(tmp_path / "missing.pt")
  (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(sd_io.CheckpointError, match="garbage.pt: unreadable torch checkpoint"):
    sd_io.load_state_dict(tmp_path / "garbage.pt")
  (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
  with pytest.raises(sd_io.CheckpointError, match="garbage.safetensors: unreadable safetensors"):
    sd_io.load_state_dict(tmp_path / "garbage.safetensors")
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(sd_io.CheckpointError, match="weights.npz: unknown checkpoint format"):
    sd_io.load_state_dict(tmp_path / "weights.npz")
  torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nostate.pt")
  with pytest.raises(sd_io.CheckpointError, match="nostate.pt: not a state dict"):
    sd_io.load_state_dict(tmp_path / "nostate.pt")


def test_hf_directory_round_trip_and_shards(tmp_path):
  state = {k: v for k, v in _state().items()}
  sd_io.save_hf_directory({"model_type": "x"}, state, tmp_path / "m")
  config, loaded = sd_io.load_hf_directory(tmp_path / "m")
  assert config == {"model_type": "x"}
  _assert_bit_equal(loaded, state)
  # overwrite in place, then a sharded layout
  sd_io.save_hf_directory({"model_type": "y"}, state, tmp_path / "m")
  assert sd_io.load_hf_directory(tmp_path / "m")[0] == {"model_type": "y"}
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  (shard_dir / "config.json").write_text("{}")
  sd_io.save_state_dict({"visual.w": state["visual.w"]}, shard_dir / "a.safetensors")
  sd_io.save_state_dict({"visual.b": state["visual.b"]}, shard_dir / "b.safetensors")
  (shard_dir / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"visual.w": "a.safetensors", "visual.b": "b.safetensors"}})
  )
  assert set(sd_io.load_hf_directory(shard_dir)[1]) == {"visual.w", "visual.b"}


def test_hf_directory_errors(tmp_path):
  with pytest.raises(sd_io.CheckpointError, match="no config.json"):
    sd_io.load_hf_directory(tmp_path)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(sd_io.CheckpointError, match="no weights found"):
    sd_io.load_hf_directory(tmp_path)
