"""Bad inputs from the reliability issue: out-of-vocabulary token ids, integer weights, flipped checkpoint
bytes, a corrupted or half-built digits testbed cache, and the `python -m adarank_jax.experiment.reliability` table.

All unit-level with tiny inputs; no CLI run.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from adarank_jax.storage import checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _flip_a_byte(directory: Path, leaf_bytes: int) -> Path:
  """Flips one byte in the middle of the largest Orbax data file under `directory`: Orbax's compressed
  chunk then decodes, without complaint, into other numbers."""
  data = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
  target = max(data, key=lambda p: p.stat().st_size)
  assert target.stat().st_size > leaf_bytes // 4, target
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  target.write_bytes(bytes(raw))
  return target


def _state(step):
  return {
    "mask_logits": {"w": np.arange(1000, dtype=np.float32) * 1e-3 + step},
    "step": np.array(step, np.int32),
  }


# ----------------------------------------------------------------------------------- 4: flipped bytes
def test_flipped_bytes_in_a_training_checkpoint_are_detected(tmp_path):
  manager = checkpoint.Manager(tmp_path / "ckpts")
  manager.save(3, _state(3))
  manager.save(6, _state(6))
  _flip_a_byte(tmp_path / "ckpts" / "6", 4000)
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"ckpts/6: .*mask_logits/w"):
    manager.restore(6, _state(0), fallback=False)
  assert manager.latest_valid_step(_state(0)) == 3 and manager.latest_valid_step() == 3
  assert manager.latest_step() == 6
  with pytest.warns(UserWarning, match=r"ckpts/3 instead of .*ckpts/6"):
    restored = manager.restore(manager.latest_step(), _state(0))  # what loop.fit does
  assert int(restored["step"]) == 3
  np.testing.assert_array_equal(restored["mask_logits"]["w"], _state(3)["mask_logits"]["w"])
  assert manager.all_steps() == [3]  # the corrupt one went, so step 6 can be written again
  kept = tmp_path / "ckpts.corrupt" / "6"  # ... aside, not deleted: the evidence stays
  assert kept.is_dir() and sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) > 0
  manager.save(6, _state(6))
  assert int(manager.restore(6, _state(0))["step"]) == 6
  _flip_a_byte(tmp_path / "ckpts" / "6", 4000)  # corrupt again: kept beside the first, not over it
  with pytest.warns(UserWarning, match=r"moved to .*ckpts\.corrupt/6\.1;"):
    manager.restore(manager.latest_step(), _state(0))
  assert kept.is_dir() and (tmp_path / "ckpts.corrupt" / "6.1").is_dir() and manager.all_steps() == [3]
  manager.close()


@pytest.mark.parametrize("victim", ["_METADATA", "largest data file"])
def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, victim):
  manager = checkpoint.Manager(tmp_path / "ckpts")
  manager.save(3, _state(3))
  manager.save(6, _state(6))
  step_dir = tmp_path / "ckpts" / "6"
  if victim == "_METADATA":
    target = next(p for p in step_dir.rglob("_METADATA") if p.is_file())
  else:
    target = max(
      (p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size
    )
  target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # a write cut short
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"ckpts/6: checkpoint"):
    manager.restore(6, _state(0), fallback=False)
  with pytest.warns(UserWarning, match=r"ckpts/3 instead of .*ckpts/6"):
    restored = manager.restore(manager.latest_step(), _state(0))
  assert int(restored["step"]) == 3 and manager.all_steps() == [3]
  manager.close()


def test_a_full_disk_during_a_checkpoint_names_the_step_directory(tmp_path, monkeypatch):
  import errno

  import orbax.checkpoint as ocp

  manager = checkpoint.Manager(tmp_path / "ckpts")

  def full_disk(*args, **kwargs):  # what TensorStore reports when a write hits ENOSPC
    raise ValueError("Error writing local file: [OS error 28: No space left on device]")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(OSError, match=r"No space left on device.*disk full.*ckpts/6") as error:
    manager.save(6, _state(6))
  assert error.value.filename == str(tmp_path / "ckpts" / "6")
  monkeypatch.setattr(
    ocp.CheckpointManager,
    "save",
    lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
  )
  with pytest.raises(OSError, match="ckpts/6") as error:
    manager.save(6, _state(6))
  assert error.value.errno == errno.ENOSPC
  manager.close()


def test_corrupt_only_checkpoint_is_an_error_naming_it(tmp_path):
  manager = checkpoint.Manager(tmp_path / "ckpts")
  manager.save(3, _state(3))
  _flip_a_byte(tmp_path / "ckpts" / "3", 4000)
  with pytest.raises(
    checkpoint.CorruptCheckpointError, match=r"ckpts/3: checkpoint is corrupt.*mask_logits/w"
  ):
    manager.restore(3, _state(0))
  manager.close()


def test_flipped_bytes_in_a_saved_tree_are_detected(tmp_path):
  checkpoint.save_tree(tmp_path / "masks", _state(1))
  np.testing.assert_array_equal(
    checkpoint.load_tree(tmp_path / "masks")["mask_logits"]["w"], _state(1)["mask_logits"]["w"]
  )
  assert (tmp_path / "masks" / checkpoint.CHECKSUM_NAME).is_file()
  _flip_a_byte(tmp_path / "masks", 4000)
  for target in (None, _state(0)):
    with pytest.raises(
      checkpoint.CorruptCheckpointError, match=r"masks: checkpoint is corrupt.*mask_logits/w"
    ):
      checkpoint.load_tree(tmp_path / "masks", target)
  checkpoint.replace_tree(tmp_path / "masks", _state(2))  # replacing it writes a new checksum too
  assert int(checkpoint.load_tree(tmp_path / "masks")["step"]) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]


def test_trees_saved_without_a_checksum_still_load(tmp_path):
  checkpoint.save_tree(tmp_path / "old", _state(1))
  (tmp_path / "old" / checkpoint.CHECKSUM_NAME).unlink()  # as written before checksums existed
  assert int(checkpoint.load_tree(tmp_path / "old")["step"]) == 1


# ----------------------------------------------------------------------------------- 1: token ids
def _tiny_clip_config(tmp_path, vocab_size):
  config = json.loads((ROOT / "adarank_jax/digits/tiny_clip_quick.json").read_text())
  config["text_cfg"]["vocab_size"] = vocab_size
  path = tmp_path / f"tiny_clip_vocab{vocab_size}.json"
  path.write_text(json.dumps(config))
  return path


def test_token_ids_beyond_the_vocabulary_are_an_error_not_nan_heads(tmp_path):
  from flax import nnx

  from adarank_jax.experiment import loading
  from adarank_jax.interop import openclip_config
  from adarank_jax.models import clip, functional

  config_path = _tiny_clip_config(tmp_path, 128)
  config = openclip_config.load_config(config_path)
  _, full = functional.split(clip.build(config, rngs=nnx.Rngs(0)))
  cache = tmp_path / "heads"
  with pytest.raises(ValueError, match=r"tiny_clip_vocab128\.json.*max token id \d{5}.*vocab_size 128"):
    loading.zero_shot_heads(config, full, ["DigitsParity"], cache_dir=cache, source=str(config_path))
  assert not cache.exists() or not list(cache.iterdir())  # nothing cached


def test_zero_shot_head_checks_ids_against_the_vocabulary():
  from adarank_jax.models import heads

  tokenize = lambda texts: np.full((len(texts), 4), 49407, np.int32)
  with pytest.raises(ValueError, match=r"my-model: .*max token id 49407.*vocab_size 128"):
    heads.zero_shot_head(
      lambda t: np.ones((len(t), 3)), tokenize, ["a"], ["{}"], 0.0, vocab_size=128, source="my-model"
    )


def test_non_finite_heads_are_never_cached(tmp_path):
  from adarank_jax.models import heads

  tokenize = lambda texts: np.zeros((len(texts), 4), np.int32)
  kwargs = dict(key="k", tokenize_fn=tokenize, classnames=["a", "b"], templates=["{}"], logit_scale=0.0)
  with pytest.raises(ValueError, match="NaN or Inf"):
    heads.cached_zero_shot_head(tmp_path, encode_text_fn=lambda t: np.full((len(t), 3), np.nan), **kwargs)
  assert list(tmp_path.iterdir()) == []  # refused to write
  path = heads.head_cache_path(tmp_path, key="k", classnames=["a", "b"], templates=["{}"])
  np.save(path, np.full((2, 3), np.nan, np.float32))  # a NaN head cached by an older version
  with pytest.raises(ValueError, match="cached head .*NaN or Inf"):
    heads.cached_zero_shot_head(tmp_path, encode_text_fn=lambda t: np.ones((len(t), 3)), **kwargs)


# ----------------------------------------------------------------------------------- 3: integer weights
def _tiny_openclip_files(tmp_path, *, int_key=None, dtype=np.int64):
  """pretrained.safetensors and ft/Digits.safetensors of the quick tiny CLIP; `int_key` of the fine-tuned
  one holds integers."""
  from adarank_jax.core import tree_util
  from adarank_jax.interop import openclip, openclip_config, state_dict
  from adarank_jax.models import clip

  config_path = ROOT / "adarank_jax/digits/tiny_clip_quick.json"
  abstract = clip.abstract_params(openclip_config.load_config(config_path))
  rng = np.random.default_rng(0)
  tree = tree_util.unflatten(
    {k: rng.normal(size=v.shape).astype(np.float32) for k, v in tree_util.flatten(abstract).items()}
  )
  state = openclip.state_dict_from_tree(tree)
  state_dict.save_state_dict(state, tmp_path / "pretrained.safetensors")
  if int_key is not None:
    state[int_key] = np.round(state[int_key] * 10).astype(dtype)
  state_dict.save_state_dict(state, tmp_path / "ft" / "Digits.safetensors")
  return config_path


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_weights_are_rejected_by_the_loader_and_the_converter(tmp_path, dtype):
  from adarank_jax.core import tree_util
  from adarank_jax.interop import openclip, openclip_config

  key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
  config_path = _tiny_openclip_files(tmp_path, int_key=key, dtype=dtype)
  bad = tmp_path / "ft" / "Digits.safetensors"
  pattern = rf"{bad}: .*{key}: .*{np.dtype(dtype).name}.*floating"
  with pytest.raises(tree_util.StructureError, match=pattern):
    openclip.load_openclip(bad, openclip_config.load_config(config_path))  # as loading.load_clip calls it
  with pytest.raises(ValueError, match=pattern):
    openclip.convert_checkpoints(
      config_path, tmp_path / "pretrained.safetensors", {"Digits": bad}, tmp_path / "out"
    )
  assert not (tmp_path / "out").exists()
  openclip.load_openclip(  # floats pass
    tmp_path / "pretrained.safetensors", openclip_config.load_config(config_path), text=True
  )


def test_integer_weights_in_a_converted_tree_are_rejected(tmp_path):
  from adarank_jax.core import tree_util
  from adarank_jax.interop import converted, openclip, openclip_config

  config_path = _tiny_openclip_files(tmp_path)
  openclip.convert_checkpoints(
    config_path,
    tmp_path / "pretrained.safetensors",
    {"Digits": tmp_path / "ft" / "Digits.safetensors"},
    tmp_path / "out",
  )
  digits = converted.load(tmp_path / "out" / "Digits")
  tree = digits.tree
  tree["ln_pre"]["scale"] = np.ones_like(tree["ln_pre"]["scale"], np.int32)
  converted.save(
    tmp_path / "out" / "IntDigits", config_file=digits.config_file, config=digits.config, tree=tree
  )
  with pytest.raises(tree_util.StructureError, match=r"IntDigits: .*ln_pre/scale: .*int32"):
    openclip.load_openclip(tmp_path / "out" / "IntDigits", openclip_config.load_config(config_path))


def test_integer_weights_in_a_hugging_face_directory_are_rejected(tmp_path):
  import transformers

  from adarank_jax.core import tree_util
  from adarank_jax.interop import hf, state_dict

  config = transformers.RobertaConfig(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=20,
    type_vocab_size=1,
    pad_token_id=1,
    num_labels=2,
  )
  transformers.RobertaForSequenceClassification(config).save_pretrained(tmp_path / "src")
  config_dict, state = state_dict.load_hf_directory(tmp_path / "src")
  key = "roberta.encoder.layer.0.output.dense.weight"
  state[key] = np.zeros(state[key].shape, np.int64)
  state_dict.save_hf_directory(config_dict, state, tmp_path / "bad")
  with pytest.raises(tree_util.StructureError, match=rf"bad/model\.safetensors: .*{key}: .*int64"):
    hf.load_hf(tmp_path / "bad")
  hf.load_hf(tmp_path / "src")  # its int64 position_ids buffer (not a parameter) stays allowed


# ----------------------------------------------------------------------------------- 5, 8: testbed cache
@pytest.fixture
def fake_build(monkeypatch):
  """testbed._build_into writing small stand-in files (no training); counts the builds."""
  from adarank_jax.digits import testbed

  calls = []

  def build_into(out, names, schedule, seed):
    calls.append(out)
    (out / "model_config.json").write_text("{}")
    (out / "pretrained.safetensors").write_bytes(bytes(range(256)) * 4)
    (out / "finetuned").mkdir()
    for name in names:
      (out / "finetuned" / f"{name}.safetensors").write_bytes(name.encode() * 100)
    return {"seconds": {}}

  monkeypatch.setattr(testbed, "_build_into", build_into)
  return calls


def test_corrupted_testbed_file_is_detected_and_rebuilt(tmp_path, fake_build, capsys):
  from adarank_jax.digits import testbed

  bed = testbed.build(tmp_path, quick=True)
  manifest = json.loads((Path(bed.directory) / testbed.MANIFEST).read_text())
  assert set(manifest["sha256"]) == {
    "model_config.json",
    "pretrained.safetensors",
    *(f"finetuned/{t}.safetensors" for t in bed.tasks),
  }
  assert testbed.verify(bed.directory) == []
  testbed.build(tmp_path, quick=True)
  assert len(fake_build) == 1 and "reusing" in capsys.readouterr().out
  target = Path(bed.finetuned("DigitsMod3"))
  raw = bytearray(target.read_bytes())
  raw[10] ^= 0x01  # one bit
  target.write_bytes(bytes(raw))
  problems = testbed.verify(bed.directory)
  assert len(problems) == 1 and "finetuned/DigitsMod3.safetensors" in problems[0], problems
  assert testbed.build(tmp_path, quick=True) == bed
  out = capsys.readouterr().out
  assert f"{target}: sha256 differs" in out and "rebuilding" in out, out
  assert len(fake_build) == 2
  assert target.read_bytes() == b"DigitsMod3" * 100 and testbed.verify(bed.directory) == []
  assert sorted(os.listdir(tmp_path)) == [Path(bed.directory).name]  # no temporary or old directories


def test_half_built_testbed_directory_is_replaced(tmp_path, fake_build, capsys):
  from adarank_jax.digits import testbed

  located = testbed.locate(tmp_path, quick=True)
  directory = Path(located.directory)
  (directory / "finetuned").mkdir(parents=True)  # what a killed build (no testbed.json) left
  (directory / "pretrained.safetensors").write_bytes(b"half")
  (directory / "finetuned" / "Digits.safetensors").write_bytes(b"half")
  assert testbed.build(tmp_path, quick=True) == located  # was: OSError: Directory not empty
  assert f"{directory}: no {testbed.MANIFEST}" in capsys.readouterr().out
  assert testbed.verify(directory) == [] and len(fake_build) == 1
  assert Path(located.pretrained).read_bytes() == bytes(range(256)) * 4
  assert sorted(os.listdir(tmp_path)) == [directory.name]


# ----------------------------------------------------------------------------------- the script
def test_reliability_script_prints_a_passing_table(capsys):
  from adarank_jax.experiment import reliability

  assert reliability.main() == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[0] == "| case | expected | observed | pass |"
  rows = [line for line in lines[2:] if line.startswith("| ")]
  names = [row.split(" | ")[0][2:] for row in rows]
  for case in (
    "non-finite config values",
    "int weights in a checkpoint",
    "out-of-vocabulary token ids",
    "flipped checkpoint bytes",
    "truncated checkpoint _METADATA",
    "corrupted testbed cache file",
    "torn jsonl",
    "killed export temp file",
    "failed load then corrected rerun",
    "second lock on a workdir",
  ):
    assert case in names, case
  assert all(row.endswith("| yes |") for row in rows), out
  assert f"{len(rows)} of {len(rows)} cases pass" in out


def test_reliability_script_exits_non_zero_when_a_case_fails(monkeypatch, capsys):
  from adarank_jax.experiment import reliability

  def wrong(tmp):
    raise AssertionError("no error")

  monkeypatch.setattr(reliability, "CASES", (("broken case", "an error", wrong),))
  monkeypatch.setattr(reliability.run_cases, "__defaults__", (reliability.CASES,))
  assert reliability.main() == 1
  assert "| broken case | an error | AssertionError: no error | NO |" in capsys.readouterr().out
