"""CLIP (OpenCLIP's standard ViT model) as Flax NNX modules and their configs.

Matches open_clip 3.3.0's `VisionTransformer`, `TextTransformer` and `CLIP` with the default residual block:
pre-LN blocks, multi-head attention with one packed q|k|v input projection, a GELU or QuickGELU MLP.
Attribute names mirror OpenCLIP's, so the param tree reads like its state dict, e.g.
"transformer/resblocks/3/attn/in_proj/kernel" of shape (width, 3 * width), columns q | k | v.

Images are NHWC floats (already resized and normalised); tokens are int (N, L) ids from OpenCLIP's tokenizer.
Parameters are `param_dtype` (float32); `dtype` is the compute dtype (float32 or bfloat16). Layer-norm
statistics and the attention softmax always run in float32. OpenCLIP's model-config JSONs are read by
`interop.openclip_config`, its state dicts by `interop.openclip`.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adarank_jax.models.activations import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Image tower. `output_dim` None: no `proj`, features have `width` dims. `act`: 'gelu' | 'quick_gelu'."""

  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_width: int
  output_dim: int | None
  act: str
  ln_eps: float = 1e-5

  def __post_init__(self):
    _check_tower(self)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text tower. `output_dim` None: no `text_projection`."""

  context_length: int
  vocab_size: int
  width: int
  layers: int
  heads: int
  mlp_width: int
  output_dim: int | None
  act: str
  ln_eps: float = 1e-5

  def __post_init__(self):
    _check_tower(self)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: VisionConfig
  text: TextConfig


def _check_tower(config: VisionConfig | TextConfig) -> None:
  name = type(config).__name__
  if config.act not in ACTIVATIONS:
    raise ValueError(f"{name}.act must be one of {sorted(ACTIVATIONS)}; got {config.act!r}.")
  if config.width % config.heads:
    raise ValueError(f"{name}.width {config.width} is not divisible by heads {config.heads}.")


# ------------------------------------------------------------------------------------------ modules


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, param_dtype: Any) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))


class Attention(nnx.Module):
  """Multi-head self-attention with one packed q|k|v projection; the math of torch's MultiheadAttention."""

  def __init__(self, width: int, heads: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.heads = heads
    self.dtype = dtype
    linear = dict(
      dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(width**-0.5), rngs=rngs
    )
    self.in_proj = nnx.Linear(width, 3 * width, **linear)
    self.out_proj = nnx.Linear(width, width, **linear)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: (N, L, width); mask: (L, L) bool, True where a query may attend to a key."""
    n, length, width = x.shape
    head_dim = width // self.heads
    qkv = self.in_proj(x).reshape(n, length, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, L, heads, head_dim) each
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    return self.out_proj(jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, width))


class Mlp(nnx.Module):
  """c_fc -> activation -> c_proj."""

  def __init__(self, width: int, mlp_width: int, act: str, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.act = act
    self.c_fc = nnx.Linear(
      width,
      mlp_width,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.initializers.normal((2 * width) ** -0.5),
      rngs=rngs,
    )
    self.c_proj = nnx.Linear(
      mlp_width,
      width,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.initializers.normal(mlp_width**-0.5),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, config: VisionConfig | TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    width = config.width
    norm = dict(epsilon=config.ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = nnx.LayerNorm(width, **norm)
    self.attn = Attention(width, config.heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(width, **norm)
    self.mlp = Mlp(width, config.mlp_width, config.act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.ln_1(x), mask)
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
  """`config.layers` residual blocks in `resblocks`."""

  def __init__(self, config: VisionConfig | TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.resblocks = nnx.List(
      [
        ResidualAttentionBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.layers)
      ]
    )

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    for block in self.resblocks:
      x = block(x, mask)
    return x


class VisionTransformer(nnx.Module):
  """OpenCLIP's image tower: patch conv, class token, pre-LN transformer, ln_post on the class token, proj."""

  def __init__(
    self, config: VisionConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.dtype = dtype
    width, patch = config.width, config.patch_size
    grid = config.image_size // patch
    norm = dict(epsilon=config.ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Holds the patch-embedding kernel (patch, patch, 3, width); `__call__` applies it as a matmul.
    self.conv1 = nnx.Conv(
      3,
      width,
      (patch, patch),
      (patch, patch),
      padding="VALID",
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.class_embedding = _normal(rngs, (width,), width**-0.5, param_dtype)
    self.positional_embedding = _normal(rngs, (grid * grid + 1, width), width**-0.5, param_dtype)
    self.ln_pre = nnx.LayerNorm(width, **norm)
    self.transformer = Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_post = nnx.LayerNorm(width, **norm)
    self.proj = (
      None
      if config.output_dim is None
      else _normal(rngs, (width, config.output_dim), width**-0.5, param_dtype)
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    """(N, image_size, image_size, 3) normalised pixels -> (N, output_dim) unnormalised features.

    Features are in the compute dtype, (N, width) when there is no `proj`.
    """
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(
        f"VisionTransformer expects NHWC images of shape (N, {size}, {size}, 3); got {images.shape}."
      )
    x = self._embed_patches(images.astype(self.dtype))  # (N, grid * grid, width), row-major like torch
    n, width = x.shape[0], x.shape[-1]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, width))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
    x = self.transformer(self.ln_pre(x))
    pooled = self.ln_post(x[:, 0])
    return pooled if self.proj is None else pooled @ self.proj[...].astype(pooled.dtype)

  def _embed_patches(self, images: jax.Array) -> jax.Array:
    """`conv1` (stride = kernel size, VALID) as one matmul of the flattened patches with its kernel.

    The same products and sums as the convolution, but XLA:CPU runs a convolution of this shape slowly and
    superlinearly in the batch (forward and kernel gradient: about 10x the matmul at 64 ViT-B/32 images).
    """
    patch = self.config.patch_size
    grid = self.config.image_size // patch
    n = images.shape[0]
    patches = images[:, : grid * patch, : grid * patch].reshape(n, grid, patch, grid, patch, 3)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, patch * patch * 3)
    kernel = self.conv1.kernel[...].astype(self.dtype)  # (patch, patch, 3, width): rows in the patches' order
    return patches @ kernel.reshape(patch * patch * 3, -1)


class TextTransformer(nnx.Module):
  """OpenCLIP's text tower: causal transformer, ln_final, pooled at the end-of-text token, text_projection."""

  def __init__(
    self, config: TextConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    width = config.width
    self.token_embedding = nnx.Embed(
      config.vocab_size,
      width,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    self.positional_embedding = _normal(rngs, (config.context_length, width), 0.01, param_dtype)
    self.transformer = Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_final = nnx.LayerNorm(
      width, epsilon=config.ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.text_projection = (
      None
      if config.output_dim is None
      else _normal(rngs, (width, config.output_dim), width**-0.5, param_dtype)
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """(N, L) int token ids, L <= context_length -> (N, output_dim) unnormalised features.

    Each row is pooled at its largest token id, the end-of-text token of CLIP's BPE tokenizer.
    """
    if tokens.ndim != 2 or tokens.shape[1] > self.config.context_length:
      raise ValueError(
        f"TextTransformer expects int tokens of shape (N, L) with L <= "
        f"{self.config.context_length}; got {tokens.shape}."
      )
    length = tokens.shape[1]
    x = self.token_embedding(tokens)  # (N, L, width)
    x = x + self.positional_embedding[:length].astype(x.dtype)
    x = self.ln_final(self.transformer(x, jnp.tril(jnp.ones((length, length), bool))))
    pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
    return pooled if self.text_projection is None else pooled @ self.text_projection[...].astype(pooled.dtype)


class CLIP(nnx.Module):
  """Image tower `visual`, text tower `text` and the contrastive temperature `logit_scale`."""

  def __init__(
    self, config: CLIPConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.visual = VisionTransformer(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text = TextTransformer(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), param_dtype))

  def encode_image(self, images: jax.Array) -> jax.Array:
    """(N, H, W, 3) images -> (N, embed_dim) unnormalised features."""
    return self.visual(images)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """(N, L) token ids -> (N, embed_dim) unnormalised features."""
    return self.text(tokens)

  def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image-text logits (N_images, N_texts) in float32, and their transpose (as OpenCLIP's get_logits)."""
    image = self.encode_image(images).astype(jnp.float32)
    text = self.encode_text(tokens).astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    logits = jnp.exp(self.logit_scale[...]) * image @ text.T
    return logits, logits.T


def build(
  config: VisionConfig | CLIPConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs
) -> VisionTransformer | CLIP:
  """The module for `config`: a `VisionTransformer` for a VisionConfig, a `CLIP` for a CLIPConfig."""
  if isinstance(config, VisionConfig):
    return VisionTransformer(config, dtype=dtype, rngs=rngs)
  if isinstance(config, CLIPConfig):
    return CLIP(config, dtype=dtype, rngs=rngs)
  raise TypeError(f"Expected a VisionConfig or CLIPConfig; got {type(config).__name__}.")


def abstract_params(config: VisionConfig | CLIPConfig) -> dict[str, Any]:
  """The param tree of `build(config)` as `jax.ShapeDtypeStruct`s, without allocating.

  Same structure as `functional.split(build(config))[1]` (and the trees of `interop.openclip`).
  """
  model = nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
