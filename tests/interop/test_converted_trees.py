"""Runs read converted trees (convert.openclip / convert.hf output) exactly like the original checkpoints."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from adarank_jax.core import tree_util
from adarank_jax.interop import converted, hf, openclip, openclip_config, state_dict
from adarank_jax.models import clip, functional

TINY = {
  "embed_dim": 16,
  "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
  "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def _bit_equal(a, b):
  a, b = tree_util.flatten(a), tree_util.flatten(b)
  assert a.keys() == b.keys()
  for key in a:
    assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key


def _shifted(tree, value):
  return tree_util.unflatten({k: np.asarray(v) + value for k, v in tree_util.flatten(tree).items()})


def test_openclip_trees_load_like_files(tmp_path):
  (tmp_path / "tiny.json").write_text(json.dumps(TINY))
  config = openclip_config.load_config(tmp_path / "tiny.json")
  _, tree = functional.split(clip.build(config, rngs=nnx.Rngs(0)))
  openclip.export_openclip(tree, tmp_path / "pre.safetensors")
  tuned = {**tree, "visual": _shifted(tree["visual"], 0.01)}
  openclip.export_openclip(tuned, tmp_path / "Cars.safetensors")
  openclip.convert_checkpoints(
    tmp_path / "tiny.json",
    tmp_path / "pre.safetensors",
    {"Cars": tmp_path / "Cars.safetensors"},
    tmp_path / "trees",
    with_text=True,
  )
  model = config  # parsed once
  _bit_equal(
    openclip.load_openclip(tmp_path / "trees/pretrained_clip", model, text=True),
    openclip.load_openclip(tmp_path / "pre.safetensors", model, text=True),
  )
  _bit_equal(
    openclip.load_openclip(tmp_path / "trees/Cars", model),
    openclip.load_openclip(tmp_path / "Cars.safetensors", model),
  )
  with pytest.raises(tree_util.StructureError, match=r"trees/pretrained: an image tower alone.*--with-text"):
    openclip.load_openclip(tmp_path / "trees/pretrained", model, text=True)
  # A converted tree is checked like a file: a wrong architecture names the directory and the key.
  cars = converted.load(tmp_path / "trees/Cars")
  assert cars.config_file == converted.OPENCLIP_CONFIG and cars.config == TINY
  bad = tree_util.flatten(cars.tree)
  bad["proj"] = np.zeros((3, 3), np.float32)
  converted.save(
    tmp_path / "trees/Bad", config_file=cars.config_file, config=cars.config, tree=tree_util.unflatten(bad)
  )
  with pytest.raises(tree_util.StructureError, match=r"trees/Bad: .*proj: expected shape \(16, 16\)"):
    openclip.load_openclip(tmp_path / "trees/Bad", model)


def test_hf_converted_directories_load_like_hf_directories(tmp_path):
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    num_labels=3,
  )
  transformers.BertModel(config).save_pretrained(tmp_path / "pre")
  transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "tuned" / "mnli")
  hf.convert(tmp_path / "pre", [tmp_path / "tuned" / "mnli"], tmp_path / "trees")
  for name, original in (("pretrained", "pre"), ("mnli", "tuned/mnli")):
    ours_config, ours = hf.load_hf(tmp_path / "trees" / name)
    ref_config, ref = hf.load_hf(tmp_path / original)
    assert ours_config == ref_config
    _bit_equal(ours, ref)


def test_one_converted_format_for_clip_and_lm(tmp_path):
  """convert.openclip and convert.hf write the same form, read by the one `converted.load`; each format's
  loader checks the tree against the config stored with it and refuses the other format's directories."""
  (tmp_path / "tiny.json").write_text(json.dumps(TINY))
  config = openclip_config.load_config(tmp_path / "tiny.json")
  _, tree = functional.split(clip.build(config, rngs=nnx.Rngs(0)))
  openclip.export_openclip(tree, tmp_path / "pre.safetensors")
  openclip.convert_checkpoints(
    tmp_path / "tiny.json", tmp_path / "pre.safetensors", {}, tmp_path / "clip", with_text=True
  )
  torch.manual_seed(0)
  bert = transformers.BertConfig(
    vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
  )
  transformers.BertModel(bert).save_pretrained(tmp_path / "pre")
  transformers.BertForSequenceClassification(bert).save_pretrained(tmp_path / "tuned" / "cola")
  hf.convert(tmp_path / "pre", [tmp_path / "tuned" / "cola"], tmp_path / "lm")

  clip_dir, lm_dir = tmp_path / "clip" / "pretrained_clip", tmp_path / "lm" / "cola"
  for directory, config_file in ((clip_dir, "open_clip_config.json"), (lm_dir, "config.json")):
    assert sorted(p.name for p in directory.iterdir()) == sorted([config_file, converted.PARAMS])
  from_clip, from_lm = converted.load(clip_dir), converted.load(lm_dir)
  assert (from_clip.config_file, from_clip.config) == (converted.OPENCLIP_CONFIG, TINY)
  assert from_lm.config_file == converted.HF_CONFIG
  assert from_lm.config == json.loads((tmp_path / "tuned" / "cola" / "config.json").read_text())
  _bit_equal(from_clip.tree, openclip.load_openclip(tmp_path / "pre.safetensors", config, text=True))
  _bit_equal(from_lm.tree, hf.load_hf(tmp_path / "tuned" / "cola")[1])
  _bit_equal(openclip.load_converted(clip_dir)[1], from_clip.tree)
  _bit_equal(hf.load_converted(lm_dir)[1], from_lm.tree)

  with pytest.raises(state_dict.CheckpointError, match=r"lm/cola: a converted model with config\.json"):
    openclip.load_converted(lm_dir)
  with pytest.raises(state_dict.CheckpointError, match=r"pretrained_clip: a converted model with open_clip"):
    hf.load_converted(clip_dir)
  with pytest.raises(state_dict.CheckpointError, match=r"tuned: not a converted model directory"):
    converted.load(tmp_path / "tuned")
  with pytest.raises(FileExistsError, match="already exists"):
    converted.save(lm_dir, config_file=converted.HF_CONFIG, config={}, tree={})
  # The model config travels with the tree: another architecture of the same shapes is refused.
  quick = {**TINY, "quick_gelu": True}
  (tmp_path / "quick.json").write_text(json.dumps(quick))
  other = openclip_config.load_config(tmp_path / "quick.json")
  with pytest.raises(tree_util.StructureError, match=r"pretrained: converted with another model config"):
    openclip.load_openclip(tmp_path / "clip" / "pretrained", other)
