"""CLIP NNX model: functional API, configs, param-tree layout, and parity with OpenCLIP 3.3.0."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adarank_jax.core import tree_util
from adarank_jax.interop import openclip as openclip_interop
from adarank_jax.interop import openclip_config
from adarank_jax.models import clip, functional

TINY_VISION = clip.VisionConfig(
  image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_width=256, output_dim=16, act="gelu"
)


# ---------------------------------------------------------------- functional API


def test_call_is_jittable_and_does_not_retrace_for_new_params():
  model = clip.VisionTransformer(TINY_VISION, rngs=nnx.Rngs(0))
  graphdef, params = functional.split(model)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  traces = []

  @jax.jit
  def apply(p, x):
    traces.append(1)
    return functional.call(graphdef, p, x)

  out = apply(params, images)
  np.testing.assert_allclose(out, model(images), rtol=1e-5, atol=1e-5)
  params2 = jax.tree.map(lambda a: a * 1.5, params)
  out2 = apply(params2, images)
  assert len(traces) == 1
  assert not np.allclose(out, out2)
  # Rebuilding from params2 equals a module that holds params2.
  nnx.update(model, params2)
  np.testing.assert_allclose(out2, model(images), rtol=1e-5, atol=1e-5)


def test_call_other_method_and_grad():
  config = clip.CLIPConfig(
    vision=TINY_VISION,
    text=clip.TextConfig(
      context_length=8,
      vocab_size=50,
      width=32,
      layers=1,
      heads=2,
      mlp_width=64,
      output_dim=16,
      act="quick_gelu",
    ),
  )
  graphdef, params = functional.split(clip.CLIP(config, rngs=nnx.Rngs(0)))
  tokens = jnp.array([[3, 7, 49, 0, 0, 0, 0, 0], [5, 49, 0, 0, 0, 0, 0, 0]], jnp.int32)
  feats = jax.jit(lambda p, t: functional.call(graphdef, p, t, method="encode_text"))(params, tokens)
  assert feats.shape == (2, 16)
  grads = jax.jit(jax.grad(lambda p: functional.call(graphdef, p, tokens, method="encode_text").sum()))(
    params
  )
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert np.abs(grads["text"]["text_projection"]).sum() > 0
  assert np.abs(grads["visual"]["proj"]).sum() == 0  # the image tower is not used


def test_split_rejects_non_param_state():
  with pytest.raises(ValueError, match=r"Dropout.*non-Param state.*rngs"):
    functional.split(nnx.Dropout(0.1, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------- param tree layout


def test_vision_tree_paths_and_shapes_follow_the_contract():
  shapes = {k: v.shape for k, v in tree_util.flatten(clip.abstract_params(TINY_VISION)).items()}
  block = {
    "ln_1/scale": (64,),
    "ln_1/bias": (64,),
    "attn/in_proj/kernel": (64, 192),
    "attn/in_proj/bias": (192,),
    "attn/out_proj/kernel": (64, 64),
    "attn/out_proj/bias": (64,),
    "ln_2/scale": (64,),
    "ln_2/bias": (64,),
    "mlp/c_fc/kernel": (64, 256),
    "mlp/c_fc/bias": (256,),
    "mlp/c_proj/kernel": (256, 64),
    "mlp/c_proj/bias": (64,),
  }
  expected = {
    "conv1/kernel": (8, 8, 3, 64),
    "class_embedding": (64,),
    "positional_embedding": (17, 64),
    "ln_pre/scale": (64,),
    "ln_pre/bias": (64,),
    "ln_post/scale": (64,),
    "ln_post/bias": (64,),
    "proj": (64, 16),
    **{f"transformer/resblocks/{i}/{k}": s for i in range(2) for k, s in block.items()},
  }
  assert shapes == expected
  # List items are int keys, as tree_util.unflatten produces.
  assert list(clip.abstract_params(TINY_VISION)["transformer"]["resblocks"]) == [0, 1]


def test_no_output_dim_means_no_proj():
  config = dataclasses.replace(TINY_VISION, output_dim=None)
  model = clip.VisionTransformer(config, rngs=nnx.Rngs(0))
  assert "proj" not in functional.split(model)[1]
  assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 64)


def test_wrong_image_shape_is_a_clear_error():
  model = clip.VisionTransformer(TINY_VISION, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\).*\(1, 3, 32, 32\)"):
    model(jnp.zeros((1, 3, 32, 32)))


# ---------------------------------------------------------------- configs


def test_load_config_reads_openclip_jsons():
  b32 = openclip_config.load_config("ViT-B-32")
  assert b32.vision == clip.VisionConfig(
    image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_width=3072, output_dim=512, act="gelu"
  )
  assert b32.text == clip.TextConfig(
    context_length=77,
    vocab_size=49408,
    width=512,
    layers=12,
    heads=8,
    mlp_width=2048,
    output_dim=512,
    act="gelu",
  )
  l14 = openclip_config.load_config("ViT-L-14-quickgelu")
  assert (l14.vision.width, l14.vision.heads, l14.vision.layers, l14.vision.patch_size) == (1024, 16, 24, 14)
  assert l14.vision.act == l14.text.act == "quick_gelu"
  assert openclip_config.load_config("ViT-B-16").vision.patch_size == 16
  g14 = openclip_config.load_config("ViT-g-14")  # head_width 88, mlp_ratio 4.3637
  assert (g14.vision.heads, g14.vision.mlp_width) == (1408 // 88, int(1408 * 4.3637))


def test_load_config_from_path_with_norm_eps(tmp_path):
  raw = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {
      "image_size": 32,
      "patch_size": 8,
      "width": 64,
      "layers": 2,
      "head_width": 16,
      "norm_kwargs": {"eps": 1e-6},
    },
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
  }
  path = tmp_path / "tiny.json"
  path.write_text(json.dumps(raw))
  config = openclip_config.load_config(path)
  assert config.vision == clip.VisionConfig(32, 8, 64, 2, 4, 256, 16, "quick_gelu", 1e-6)
  assert config.text.ln_eps == 1e-5 and config.text.act == "quick_gelu"


@pytest.mark.parametrize(
  "name, problem",
  [
    ("ViT-B-16-SigLIP", r"init_logit_bias=-10.*timm_model_name"),
    ("RN50", r"vision_cfg\.layers=\[3, 4, 6, 3\].*ModifiedResNet"),
    ("coca_ViT-B-32", r"multimodal_cfg.*attentional_pool=True.*embed_cls=True"),
    ("ViT-L-14-CLIPA", r"no_ln_pre=True.*pool_type=.avg.*no_causal_mask=True"),
    ("ViT-M-16-alt", r"ls_init_value=0\.0001"),
    ("roberta-ViT-B-32", r"hf_model_name=.roberta-base"),
    ("EVA02-B-16", r"custom_text=True.*timm_model_name"),
    (
      "ViT-L-14-worldwide",
      r"hf_tokenizer_name='google/mt5-base'.*tokenizer_kwargs=\{'clean': 'canonicalize'\}",
    ),
  ],
)
def test_load_config_rejects_nonstandard_architectures(name, problem):
  with pytest.raises(ValueError, match=rf"{name}\.json: unsupported OpenCLIP config.*{problem}"):
    openclip_config.load_config(name)


def test_load_config_unknown_name_suggests_close_matches():
  with pytest.raises(ValueError, match=r"Unknown OpenCLIP model config 'ViT-B-33'.*'ViT-B-32'"):
    openclip_config.load_config("ViT-B-33")


# ---------------------------------------------------------------- parity with OpenCLIP


def _reference(name, batch):
  """OpenCLIP features of a random-init model and its converted tree."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = open_clip.create_model(name, pretrained=None).eval()
  config = openclip_config.load_config(name)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  tree = openclip_interop.tree_from_state_dict(state, config, source=name)
  size = config.vision.image_size
  images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
  texts = ["a photo of a cat", "a satellite image of a forest", "the number 7", "a diagram"][:batch]
  tokens = open_clip.get_tokenizer(name)(texts)
  with torch.no_grad():
    ref_image = model.encode_image(images).numpy()
    ref_text = model.encode_text(tokens).numpy()
  return dict(
    config=config,
    tree=tree,
    images=images.numpy().transpose(0, 2, 3, 1),
    tokens=tokens.numpy().astype(np.int32),
    ref_image=ref_image,
    ref_text=ref_text,
  )


def _features(ref, dtype=jnp.float32):
  model = nnx.eval_shape(lambda: clip.CLIP(ref["config"], dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, _ = functional.split(model)
  image = functional.call(graphdef, ref["tree"], jnp.asarray(ref["images"]), method="encode_image")
  text = functional.call(graphdef, ref["tree"], jnp.asarray(ref["tokens"]), method="encode_text")
  return np.asarray(image, np.float32), np.asarray(text, np.float32)


def _max_diff_and_scale(ours, ref):
  assert ours.shape == ref.shape
  return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


@pytest.fixture(scope="module")
def b32():
  return _reference("ViT-B-32", batch=4)


@pytest.mark.parametrize("name, batch", [("ViT-B-32", 4), ("ViT-L-14", 2), ("ViT-B-32-quickgelu", 2)])
def test_float32_parity_with_openclip(name, batch, b32, record_property):
  ref = b32 if name == "ViT-B-32" else _reference(name, batch)
  image, text = _features(ref)
  for kind, ours, theirs in [("image", image, ref["ref_image"]), ("text", text, ref["ref_text"])]:
    diff, scale = _max_diff_and_scale(ours, theirs)
    record_property(f"{name}/{kind}", f"max abs diff {diff:.3g}, scale {scale:.3g}")
    print(f"{name} {kind}: max abs diff {diff:.3g}, max |ref| {scale:.3g}")
    assert diff <= 1e-4 * scale, (kind, diff, scale)


def test_bfloat16_compute_is_close(b32):
  image, text = _features(b32, dtype=jnp.bfloat16)
  for ours, theirs in [(image, b32["ref_image"]), (text, b32["ref_text"])]:
    diff, scale = _max_diff_and_scale(ours, theirs)
    assert diff <= 0.05 * scale  # measured: ~0.012 * scale
    cosine = np.sum(ours * theirs, -1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.min() > 0.999  # measured: 0.9999


def test_clip_logits_match_openclip_normalised_features(b32):
  model = nnx.eval_shape(lambda: clip.CLIP(b32["config"], rngs=nnx.Rngs(0)))
  graphdef, _ = functional.split(model)
  logits, logits_t = functional.call(
    graphdef, b32["tree"], jnp.asarray(b32["images"]), jnp.asarray(b32["tokens"])
  )
  image = b32["ref_image"] / np.linalg.norm(b32["ref_image"], axis=-1, keepdims=True)
  text = b32["ref_text"] / np.linalg.norm(b32["ref_text"], axis=-1, keepdims=True)
  expected = np.exp(b32["tree"]["logit_scale"]) * image @ text.T
  np.testing.assert_allclose(logits, expected, atol=1e-3)
  np.testing.assert_array_equal(logits_t, np.asarray(logits).T)
