"""Runs read converted trees (convert.openclip / convert.hf output) exactly like the original checkpoints."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from adarank_jax import tree_util
from adarank_jax.interop import converted, hf, openclip, openclip_config
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
