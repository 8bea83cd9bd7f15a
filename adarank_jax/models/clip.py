"""CLIP (OpenCLIP's standard ViT model) as Flax NNX modules.

Matches open_clip 3.3.0's `VisionTransformer`, `TextTransformer` and `CLIP`
with the default residual block: pre-LN blocks, multi-head attention with one
packed q|k|v input projection, a GELU or QuickGELU MLP. Attribute names
mirror OpenCLIP's so the param tree reads like its state dict, e.g.
"transformer/resblocks/3/attn/in_proj/kernel" (width, 3 * width).

Images are NHWC floats (already resized and normalised); tokens are int32
(N, context_length) ids from OpenCLIP's tokenizer. Parameters are float32;
`dtype` selects the compute dtype (float32 or bfloat16; layer norms and the
attention softmax always run in float32).

Configs are read from OpenCLIP's own model-config JSONs (`load_config`).
"""
import dataclasses
import difflib
import importlib.util
import json
import math
import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

CONFIG_PLACEHOLDER

_ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
            param_dtype: Any) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))


class Attention(nnx.Module):
  """Multi-head self-attention with a packed q|k|v projection.

  Same math as `torch.nn.MultiheadAttention` (batch_first, no dropout).
  """

  def __init__(self, width: int, heads: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f'Attention width {width} is not divisible by '
                       f'{heads} heads.')
    self.heads = heads
    self.dtype = dtype
    init = nnx.initializers.normal(width**-0.5)
    self.in_proj = nnx.Linear(width, 3 * width, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=init,
                              rngs=rngs)
    self.out_proj = nnx.Linear(width, width, dtype=dtype,
                               param_dtype=param_dtype, kernel_init=init,
                               rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Attends `x` (N, L, width) to itself; `mask` (L, L) bool, True = keep."""
    n, length, width = x.shape
    head_dim = width // self.heads
    qkv = self.in_proj(x).reshape(n, length, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, L, H, D) each
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('nhqk,nkhd->nqhd', weights, v)
    return self.out_proj(out.reshape(n, length, width))


class Mlp(nnx.Module):
  """c_fc -> activation -> c_proj."""

  def __init__(self, width: int, mlp_width: int, act: str, *, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    self.act = act
    self.c_fc = nnx.Linear(width, mlp_width, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=nnx.initializers.normal(
                               (2 * width)**-0.5),
                           rngs=rngs)
    self.c_proj = nnx.Linear(mlp_width, width, dtype=dtype,
                             param_dtype=param_dtype,
                             kernel_init=nnx.initializers.normal(
                                 mlp_width**-0.5),
                             rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(_ACTIVATIONS[self.act](self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, width: int, heads: int, mlp_width: int, act: str,
               ln_eps: float, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    norm = dict(epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs)
    self.ln_1 = nnx.LayerNorm(width, **norm)
    self.attn = Attention(width, heads, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
    self.ln_2 = nnx.LayerNorm(width, **norm)
    self.mlp = Mlp(width, mlp_width, act, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.ln_1(x), mask)
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
  """A stack of `ResidualAttentionBlock`s in `resblocks`."""

  def __init__(self, width: int, layers: int, heads: int, mlp_width: int,
               act: str, ln_eps: float, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.resblocks = nnx.List([
        ResidualAttentionBlock(width, heads, mlp_width, act, ln_eps,
                               dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
        for _ in range(layers)
    ])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    for block in self.resblocks:
      x = block(x, mask)
    return x


class VisionTransformer(nnx.Module):
  """OpenCLIP's image tower: patchify, class token, transformer, proj."""

  def __init__(self, config: VisionConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    width, patch = config.width, config.patch_size
    grid = config.image_size // patch
    scale = width**-0.5
    self.conv1 = nnx.Conv(3, width, (patch, patch), (patch, patch),
                          padding='VALID', use_bias=False, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.class_embedding = _normal(rngs, (width,), scale, param_dtype)
    self.positional_embedding = _normal(rngs, (grid * grid + 1, width), scale,
                                        param_dtype)
    norm = dict(epsilon=config.ln_eps, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs)
    self.ln_pre = nnx.LayerNorm(width, **norm)
    self.transformer = Transformer(width, config.layers, config.heads,
                                   config.mlp_width, config.act, config.ln_eps,
                                   dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
    self.ln_post = nnx.LayerNorm(width, **norm)
    if config.output_dim is not None:
      self.proj = _normal(rngs, (width, config.output_dim), scale, param_dtype)
    else:
      self.proj = None

  def __call__(self, images: jax.Array) -> jax.Array:
    """Image features.

    Args:
      images: (N, image_size, image_size, 3) float, normalised pixels.

    Returns:
      (N, output_dim) unnormalised features in the compute dtype, or
      (N, width) when `output_dim` is None.
    """
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f'VisionTransformer expects NHWC images of shape '
                       f'(N, {size}, {size}, 3); got {images.shape}.')
    x = self.conv1(images.astype(self.dtype))  # (N, grid, grid, width)
    n = x.shape[0]
    x = x.reshape(n, -1, x.shape[-1])  # (N, grid * grid, width)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype),
                           (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.positional_embedding[...].astype(x.dtype)
    x = self.ln_pre(x)
    x = self.transformer(x)
    pooled = self.ln_post(x[:, 0])
    if self.proj is None:
      return pooled
    return pooled @ self.proj[...].astype(pooled.dtype)


class TextTransformer(nnx.Module):
  """OpenCLIP's text tower: causal transformer pooled at the EOT token."""

  def __init__(self, config: TextConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    width = config.width
    self.token_embedding = nnx.Embed(
        config.vocab_size, width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.positional_embedding = _normal(rngs, (config.context_length, width),
                                        0.01, param_dtype)
    self.transformer = Transformer(width, config.layers, config.heads,
                                   config.mlp_width, config.act, config.ln_eps,
                                   dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
    self.ln_final = nnx.LayerNorm(width, epsilon=config.ln_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    if config.output_dim is not None:
      self.text_projection = _normal(rngs, (width, config.output_dim),
                                     width**-0.5, param_dtype)
    else:
      self.text_projection = None

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Text features.

    Args:
      tokens: (N, L) integer token ids, L <= context_length; each row's
        largest id marks its end-of-text token (CLIP's BPE convention).

    Returns:
      (N, output_dim) unnormalised features (N, width without projection).
    """
    context = self.config.context_length
    if tokens.ndim != 2 or tokens.shape[1] > context:
      raise ValueError(f'TextTransformer expects int tokens of shape (N, L) '
                       f'with L <= {context}; got {tokens.shape}.')
    length = tokens.shape[1]
    x = self.token_embedding(tokens)  # (N, L, width)
    x = x + self.positional_embedding[:length].astype(x.dtype)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    x = self.transformer(x, causal)
    x = self.ln_final(x)
    eot = jnp.argmax(tokens, axis=-1)
    pooled = x[jnp.arange(x.shape[0]), eot]
    if self.text_projection is None:
      return pooled
    return pooled @ self.text_projection[...].astype(pooled.dtype)


class CLIP(nnx.Module):
  """Image and text towers plus the contrastive `logit_scale`."""

  def __init__(self, config: CLIPConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.visual = VisionTransformer(config.vision, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.text = TextTransformer(config.text, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), param_dtype))

  def encode_image(self, images: jax.Array) -> jax.Array:
    """(N, H, W, 3) images -> (N, embed_dim) unnormalised features."""
    return self.visual(images)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """(N, L) token ids -> (N, embed_dim) unnormalised features."""
    return self.text(tokens)

  def __call__(self, images: jax.Array,
               tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image-to-text logits (N_img, N_txt) and their transpose."""
    image = self.encode_image(images).astype(jnp.float32)
    text = self.encode_text(tokens).astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    logits = jnp.exp(self.logit_scale[...]) * image @ text.T
    return logits, logits.T


def build(config: VisionConfig | CLIPConfig, *, dtype: Any = jnp.float32,
          rngs: nnx.Rngs) -> VisionTransformer | CLIP:
  """The module for `config`: a `VisionTransformer` or a full `CLIP`."""
  if isinstance(config, VisionConfig):
    return VisionTransformer(config, dtype=dtype, rngs=rngs)
  if isinstance(config, CLIPConfig):
    return CLIP(config, dtype=dtype, rngs=rngs)
  raise TypeError(f'Expected a VisionConfig or CLIPConfig; got '
                  f'{type(config).__name__}.')


def abstract_params(config: VisionConfig | CLIPConfig) -> dict[str, Any]:
  """Param tree of `build(config)` as `jax.ShapeDtypeStruct`s (no memory).

  Returns:
    Nested dict with the structure of `functional.split(build(config))[1]`.
  """
  model = nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))

