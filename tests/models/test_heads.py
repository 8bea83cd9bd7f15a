"""Tests for adarank_jax.models.heads: zero-shot heads (fake encoder, tiny real CLIP text tower), cache."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adarank_jax.data import clip_tokenizer
from adarank_jax.interop import openclip as openclip_interop
from adarank_jax.interop import openclip_config
from adarank_jax.models import clip, functional, heads

_VOCAB = {w: i + 1 for i, w in enumerate("a photo of the cat dog car red blue big small {} . ,".split())}


def _fake_tokenize(texts):
  """Word ids padded to 8 columns."""
  rows = [[_VOCAB[w] for w in t.replace(".", " .").split()] for t in texts]
  return np.asarray([r + [0] * (8 - len(r)) for r in rows], np.int32)


_TABLE = np.random.default_rng(0).normal(size=(len(_VOCAB) + 1, 5)).astype(np.float32)


def _fake_encode(tokens):
  """Sum of per-word random vectors, times a per-row scale that normalisation must remove."""
  tokens = np.asarray(tokens)
  return _TABLE[tokens].sum(axis=1) * (1.0 + tokens.sum(axis=1, keepdims=True))


def _naive_head(classnames, templates, logit_scale):
  rows = []
  for name in classnames:
    embeddings = _fake_encode(_fake_tokenize([t.format(name) for t in templates]))
    embeddings = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    mean = embeddings.mean(axis=0)
    rows.append(mean / np.linalg.norm(mean))
  return np.stack(rows) * math.exp(logit_scale)


CLASSES = ("cat", "dog", "red car")
TEMPLATES = ("a photo of a {}.", "a photo of the big {}.", "the small {}")


@pytest.mark.parametrize("batch_size", [1, 4, 256])
def test_head_matches_the_reference_recipe(batch_size):
  calls = []

  def encode(tokens):
    calls.append(tokens.shape[0])
    return _fake_encode(tokens)

  head = heads.zero_shot_head(
    encode, _fake_tokenize, CLASSES, TEMPLATES, logit_scale=math.log(100), batch_size=batch_size
  )
  assert head.shape == (3, 5) and head.dtype == np.float32
  np.testing.assert_allclose(head, _naive_head(CLASSES, TEMPLATES, math.log(100)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(head, axis=-1), 100.0, rtol=1e-5)
  assert set(calls) == {batch_size}  # fixed-size calls: a jitted encoder compiles once


def test_classify_normalises_features():
  head = heads.zero_shot_head(_fake_encode, _fake_tokenize, CLASSES, TEMPLATES, logit_scale=math.log(100))
  features = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
  logits = heads.classify(jnp.asarray(features), jnp.asarray(head))
  expected = (features / np.linalg.norm(features, axis=-1, keepdims=True)) @ head.T
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(heads.classify(jnp.asarray(7 * features), jnp.asarray(head))),
    np.asarray(logits),
    rtol=1e-5,
    atol=1e-5,
  )


def test_cache_builds_once_and_keys_on_model_and_text(tmp_path):
  builds = []

  def encode(tokens):
    builds.append(1)
    return _fake_encode(tokens)

  kwargs = dict(
    encode_text_fn=encode, tokenize_fn=_fake_tokenize, classnames=CLASSES, logit_scale=math.log(100)
  )
  first = heads.cached_zero_shot_head(tmp_path, key="abc_Toy", templates=TEMPLATES, **kwargs)
  count = len(builds)
  again = heads.cached_zero_shot_head(tmp_path, key="abc_Toy", templates=TEMPLATES, **kwargs)
  assert len(builds) == count and np.array_equal(first, again)
  heads.cached_zero_shot_head(tmp_path, key="abc_Toy", templates=TEMPLATES[:2], **kwargs)
  heads.cached_zero_shot_head(tmp_path, key="xyz_Toy", templates=TEMPLATES, **kwargs)
  assert len(builds) == 3 * count
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 3
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
  path = heads.head_cache_path(tmp_path, key="abc_Toy", classnames=CLASSES, templates=TEMPLATES)
  np.save(path, np.zeros((2, 5), np.float32))
  with pytest.raises(ValueError, match=r"cached head has dtype float32 shape \(2, 5\).*Delete the file"):
    heads.cached_zero_shot_head(tmp_path, key="abc_Toy", templates=TEMPLATES, **kwargs)
  uncached = heads.cached_zero_shot_head(None, key="abc_Toy", templates=TEMPLATES, **kwargs)
  np.testing.assert_array_equal(uncached, first)


def test_fingerprint_sees_values_and_structure():
  tree = {"a": {"w": np.ones((2, 3), np.float32)}, "logit_scale": np.float32(4.6)}
  same = {"logit_scale": np.float32(4.6), "a": {"w": np.ones((2, 3), np.float32)}}
  assert heads.fingerprint(tree) == heads.fingerprint(same)
  changed = {"a": {"w": np.ones((2, 3), np.float32) * 1.0001}, "logit_scale": np.float32(4.6)}
  assert heads.fingerprint(changed) != heads.fingerprint(tree)
  assert heads.fingerprint(
    {"a": {"w": np.ones((3, 2), np.float32)}, "logit_scale": np.float32(4.6)}
  ) != heads.fingerprint(tree)


_TINY = {
  "embed_dim": 16,
  "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def test_tiny_real_clip_text_tower_matches_open_clip_head():
  """Our head from the converted JAX text tower vs Task Arithmetic's build_classification_head in torch."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = open_clip.model.CLIP(_TINY["embed_dim"], _TINY["vision_cfg"], _TINY["text_cfg"]).eval()
  with torch.no_grad():
    model.logit_scale.fill_(math.log(100.0))
  classnames, templates = ("airplane", "bird", "ship"), ("a photo of a {}.", "a blurry photo of the {}.")
  with torch.no_grad():  # the reference recipe, step by step
    rows = []
    for name in classnames:
      embeddings = model.encode_text(open_clip.tokenize([t.format(name) for t in templates]))
      embeddings /= embeddings.norm(dim=-1, keepdim=True)
      embeddings = embeddings.mean(dim=0, keepdim=True)
      embeddings /= embeddings.norm()
      rows.append(embeddings)
    reference = (torch.cat(rows) * model.logit_scale.exp()).numpy()

  config = openclip_config.config_from_dict(_TINY, source="tiny")
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  tree = openclip_interop.tree_from_state_dict(state, config, source="tiny")
  graphdef, _ = functional.split(nnx.eval_shape(lambda: clip.CLIP(config, rngs=nnx.Rngs(0))))
  encode = jax.jit(lambda tokens: functional.call(graphdef, tree, tokens, method="encode_text"))
  head = heads.zero_shot_head(
    encode,
    clip_tokenizer.Tokenizer(),
    classnames,
    templates,
    logit_scale=float(tree["logit_scale"]),
    batch_size=4,
  )
  max_diff = float(np.abs(head - reference).max())
  scale = np.abs(reference).max()
  print(f"tiny CLIP head: max |ours - open_clip| = {max_diff:.3g} (entries up to {scale:.3g})")
  assert head.shape == (3, 16)
  np.testing.assert_allclose(head, reference, rtol=1e-4, atol=1e-4)
