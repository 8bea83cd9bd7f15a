"""OpenCLIP state dict <-> tree conversion, checkpoint validation, and the convert.openclip CLI."""

import json
import re

import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch

from adarank_jax.core import tree_util
from adarank_jax.interop import converted, openclip, openclip_config
from adarank_jax.interop import state_dict as state_dict_lib
from convert import openclip as cli

TINY_NAME = "adarank-test-tiny-vit"
TINY_CFG = {
  "embed_dim": 16,
  "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
  "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
  """Path of a tiny open_clip model-config JSON, registered with open_clip under TINY_NAME."""
  path = tmp_path_factory.mktemp("configs") / f"{TINY_NAME}.json"
  path.write_text(json.dumps(TINY_CFG))
  open_clip.add_model_config(path)
  return path


def tiny_model(seed):
  torch.manual_seed(seed)
  return open_clip.create_model(TINY_NAME, pretrained=None).eval()


def numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def assert_bit_identical(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    assert actual[key].shape == value.shape, key
    assert actual[key].tobytes() == np.ascontiguousarray(value).tobytes(), key


def visual_only(state):
  return {k: v for k, v in state.items() if k.startswith("visual.")}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_vit_b32_round_trip_is_bit_identical(tmp_path, suffix):
  torch.manual_seed(0)
  model = open_clip.create_model("ViT-B-32", pretrained=None)
  path = tmp_path / f"b32{suffix}"
  if suffix == ".pt":
    torch.save(model.state_dict(), path)
  else:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  expected = numpy_state(model)
  del model
  config = openclip_config.load_config("ViT-B-32")
  loaded = state_dict_lib.load_state_dict(path)
  tree = openclip.tree_from_state_dict(loaded, config, source=str(path))
  assert tree["visual"]["transformer"]["resblocks"][11]["attn"]["in_proj"]["kernel"].shape == (768, 2304)
  assert tree["text"]["token_embedding"]["embedding"].shape == (49408, 512)
  assert_bit_identical(openclip.state_dict_from_tree(tree), expected)
  # The image tower alone, from the same file.
  vision = openclip.load_openclip(path, config)
  tree_util.check_structure(
    {k: v.shape for k, v in tree_util.flatten(tree["visual"]).items()},
    tree_util.flatten(vision),
    source="vision tree",
  )
  assert_bit_identical(openclip.state_dict_from_tree(vision), visual_only(expected))
  path.unlink()


def test_wrapped_checkpoint_round_trip(tmp_path, tiny_config):
  model = tiny_model(0)
  path = tmp_path / "wrapped.pt"
  torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, path)
  tree = openclip.load_openclip(path, openclip_config.load_config(tiny_config), text=True)
  assert_bit_identical(openclip.state_dict_from_tree(tree), numpy_state(model))


def test_image_tower_alone_with_and_without_prefix(tmp_path, tiny_config):
  model = tiny_model(0)
  prefixed, bare = tmp_path / "visual.safetensors", tmp_path / "bare.pt"
  safetensors.torch.save_file(
    {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}, prefixed
  )
  torch.save(model.visual.state_dict(), bare)
  from_prefixed = openclip.load_openclip(prefixed, openclip_config.load_config(tiny_config))
  from_bare = openclip.load_openclip(bare, openclip_config.load_config(tiny_config))
  assert_bit_identical(tree_util.flatten(from_bare), tree_util.flatten(from_prefixed))
  assert_bit_identical(openclip.state_dict_from_tree(from_prefixed), visual_only(numpy_state(model)))
  assert_bit_identical(openclip.state_dict_from_tree(from_bare, prefix=""), numpy_state(model.visual))
  with pytest.raises(ValueError, match=r"prefix='' applies to VisionTransformer trees"):
    openclip.state_dict_from_tree({"visual": from_prefixed}, prefix="")


def test_image_encoder_checkpoint_with_leftover_text_keys(tmp_path, tiny_config):
  """Task Arithmetic's ImageEncoder keeps CLIP's text keys except `transformer.*`, under 'model.'."""
  model = tiny_model(0)
  state = {"model." + k: v for k, v in model.state_dict().items() if not k.startswith("transformer.")}
  path = tmp_path / "image_encoder.pt"
  torch.save(state, path)
  tree = openclip.load_openclip(path, openclip_config.load_config(tiny_config))
  assert "visual" not in tree and "token_embedding" not in tree
  assert_bit_identical(openclip.state_dict_from_tree(tree), visual_only(numpy_state(model)))
  with pytest.raises(tree_util.StructureError, match=r"image_encoder\.pt.*missing keys.*transformer\."):
    openclip.load_openclip(path, openclip_config.load_config(tiny_config), text=True)


def test_pickled_module_needs_run_pickled_code(tmp_path, tiny_config):
  model = tiny_model(0)
  path = tmp_path / "module.pt"
  torch.save(model, path)
  with pytest.raises(state_dict_lib.CheckpointError, match=r"module\.pt.*run_pickled_code"):
    openclip.load_openclip(path, openclip_config.load_config(tiny_config))
  tree = openclip.load_openclip(
    path, openclip_config.load_config(tiny_config), text=True, run_pickled_code=True
  )
  assert_bit_identical(openclip.state_dict_from_tree(tree), numpy_state(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_round_trip_keeps_dtype_and_bits(tmp_path, tiny_config, dtype):
  model = tiny_model(0).to(dtype)
  path = tmp_path / "low.safetensors"
  safetensors.torch.save_file(model.state_dict(), path)
  tree = openclip.load_openclip(path, openclip_config.load_config(tiny_config), text=True)
  exported = openclip.state_dict_from_tree(tree)
  for key, value in model.state_dict().items():
    assert exported[key].dtype.name == str(dtype).removeprefix("torch."), key
    assert exported[key].tobytes() == value.contiguous().view(torch.int16).numpy().tobytes(), key


# ---------------------------------------------------------------- bad inputs


def _save_visual(state, path):
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda s: s.pop("visual.ln_post.bias"), r"missing keys \(1\): visual\.ln_post\.bias"),
    (
      lambda s: s.update({"visual.extra.weight": np.zeros(3, np.float32)}),
      r"unexpected keys \(1\): visual\.extra\.weight",
    ),
    (
      lambda s: s.update({"visual.proj": np.zeros((64, 17), np.float32)}),
      r"visual\.proj: expected shape \(64, 16\), got \(64, 17\)",
    ),
    (
      lambda s: s["visual.transformer.resblocks.1.mlp.c_fc.weight"].__setitem__((3, 4), np.nan),
      r"NaN or Inf values in visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight",
    ),
    (
      lambda s: s["visual.class_embedding"].__setitem__(0, -np.inf),
      r"NaN or Inf values in visual\.class_embedding",
    ),
  ],
  ids=["missing", "unexpected", "shape", "nan", "inf"],
)
def test_bad_checkpoint_errors_name_file_and_key(tmp_path, tiny_config, edit, message):
  state = visual_only(numpy_state(tiny_model(0)))
  edit(state)
  path = tmp_path / "bad_ckpt.pt"
  _save_visual(state, path)
  with pytest.raises(ValueError, match=rf"{path}(.|\n)*{message}"):
    openclip.load_openclip(path, openclip_config.load_config(tiny_config))


def test_architecture_mismatch_b16_weights_for_b32_config(tmp_path):
  torch.manual_seed(0)
  visual = open_clip.create_model("ViT-B-16", pretrained=None).visual
  path = tmp_path / "vit_b16_finetuned.safetensors"
  safetensors.torch.save_file({"visual." + k: v.contiguous() for k, v in visual.state_dict().items()}, path)
  with pytest.raises(tree_util.StructureError) as info:
    openclip.load_openclip(path, openclip_config.load_config("ViT-B-32"))
  message = str(info.value)
  assert str(path) in message
  assert "visual.conv1.weight: expected shape (768, 3, 32, 32), got (768, 3, 16, 16)" in message
  assert "visual.positional_embedding: expected shape (50, 768), got (197, 768)" in message
  assert "does not match the expected OpenCLIP architecture" in message
  path.unlink()


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
def test_unreadable_file(tmp_path, tiny_config, name):
  path = tmp_path / name
  path.write_bytes(b"definitely not a checkpoint" * 10)
  with pytest.raises(state_dict_lib.CheckpointError, match=rf"{path}: unreadable"):
    openclip.load_openclip(path, openclip_config.load_config(tiny_config))


def test_find_checkpoints_layouts_and_errors(tmp_path):
  (tmp_path / "ft").mkdir()
  (tmp_path / "ft" / "dtd.safetensors").write_bytes(b"")
  (tmp_path / "ft" / "README.md").write_text("not a checkpoint")
  (tmp_path / "ft" / "EuroSAT").mkdir()
  (tmp_path / "ft" / "EuroSAT" / "finetuned.pt").write_bytes(b"")
  (tmp_path / "ft" / "EuroSAT" / "zeroshot.pt").write_bytes(b"")
  (tmp_path / "mnist.bin").write_bytes(b"")
  found = openclip.find_checkpoints([tmp_path / "ft", tmp_path / "mnist.bin"])
  assert found == {
    "EuroSAT": tmp_path / "ft" / "EuroSAT" / "finetuned.pt",
    "dtd": tmp_path / "ft" / "dtd.safetensors",
    "mnist": tmp_path / "mnist.bin",
  }
  (tmp_path / "ft" / "EuroSAT" / "finetuned.pt").unlink()
  (tmp_path / "ft" / "EuroSAT" / "other.pt").write_bytes(b"")
  with pytest.raises(ValueError, match=r"EuroSAT: expected one checkpoint file"):
    openclip.find_checkpoints([tmp_path / "ft"])
  with pytest.raises(ValueError, match=r"share a task name.*mnist"):
    openclip.find_checkpoints([tmp_path / "mnist.bin", tmp_path / "mnist.bin"])
  with pytest.raises(ValueError, match=r"nope: no such checkpoint"):
    openclip.find_checkpoints([tmp_path / "nope"])


# ---------------------------------------------------------------- CLI


@pytest.fixture
def checkpoints(tmp_path, tiny_config):
  """A pretrained tiny CLIP and three fine-tuned ones in the layouts the CLI accepts."""
  models = {name: tiny_model(seed) for seed, name in enumerate(["pretrained", "dtd", "eurosat", "mnist"])}
  torch.save(models["pretrained"].state_dict(), tmp_path / "zeroshot.pt")
  ft = tmp_path / "finetuned"
  ft.mkdir()
  safetensors.torch.save_file(visual_only(models["dtd"].state_dict()), ft / "dtd.safetensors")
  (ft / "eurosat").mkdir()
  torch.save(models["eurosat"].state_dict(), ft / "eurosat" / "finetuned.pt")
  torch.save(models["pretrained"].state_dict(), ft / "eurosat" / "zeroshot.pt")
  torch.save(
    {"state_dict": {"module." + k: v for k, v in models["mnist"].state_dict().items()}}, ft / "mnist.pt"
  )
  return models


def test_cli_converts_and_exports(tmp_path, tiny_config, checkpoints, capsys):
  out = tmp_path / "trees"
  rc = cli.main(
    [
      "--config",
      str(tiny_config),
      "--pretrained",
      str(tmp_path / "zeroshot.pt"),
      "--finetuned",
      str(tmp_path / "finetuned"),
      "--out",
      str(out),
      "--with-text",
    ]
  )
  assert rc == 0, capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == ["dtd", "eurosat", "mnist", "pretrained", "pretrained_clip"]
  for name, model in checkpoints.items():
    tree = converted.load(out / name).tree
    assert_bit_identical(openclip.state_dict_from_tree(tree), visual_only(numpy_state(model)))
  full = converted.load(out / "pretrained_clip").tree
  assert_bit_identical(openclip.state_dict_from_tree(full), numpy_state(checkpoints["pretrained"]))

  exported = tmp_path / "dtd_export.pt"
  assert cli.main(["--export", str(out / "dtd"), "--out", str(exported)]) == 0
  restored = tiny_model(123)
  missing, unexpected = restored.load_state_dict(torch.load(exported), strict=False)
  assert not unexpected and all(not k.startswith("visual.") for k in missing)
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    np.testing.assert_array_equal(restored.encode_image(images), checkpoints["dtd"].encode_image(images))


@pytest.mark.parametrize(
  "corrupt, message",
  [
    ("nan", r"mnist\.pt: NaN or Inf values in visual\.ln_pre\.weight"),
    ("arch", r"dtd\.safetensors: .*visual\.proj: expected shape \(64, 16\), got \(64, 8\)"),
    ("pickle", r"finetuned\.pt: this file is not a plain state dict.*--run-pickled-code"),
  ],
  ids=["nan", "arch", "pickle"],
)
def test_cli_writes_nothing_when_any_input_is_bad(
  tmp_path, tiny_config, checkpoints, capsys, corrupt, message
):
  ft = tmp_path / "finetuned"
  if corrupt == "nan":
    state = checkpoints["mnist"].state_dict()
    state["visual.ln_pre.weight"][5] = float("nan")
    torch.save(state, ft / "mnist.pt")
  elif corrupt == "arch":
    state = visual_only(checkpoints["dtd"].state_dict())
    state["visual.proj"] = state["visual.proj"][:, :8].contiguous()
    safetensors.torch.save_file(state, ft / "dtd.safetensors")
  else:
    torch.save(checkpoints["eurosat"], ft / "eurosat" / "finetuned.pt")
  out = tmp_path / "trees"
  rc = cli.main(
    [
      "--config",
      str(tiny_config),
      "--pretrained",
      str(tmp_path / "zeroshot.pt"),
      "--finetuned",
      str(ft),
      "--out",
      str(out),
    ]
  )
  err = capsys.readouterr().err
  assert rc == 1
  assert "nothing was written" in err
  assert re.search(message, err, flags=re.S), err
  assert not out.exists() or not any(out.iterdir())
