"""CLIP (OpenCLIP's standard ViT model) as Flax NNX modules, configured from OpenCLIP's own JSONs.

Matches open_clip 3.3.0's `VisionTransformer`, `TextTransformer` and `CLIP` with the default residual block:
pre-LN blocks, multi-head attention with one packed q|k|v input projection, a GELU or QuickGELU MLP.
Attribute names mirror OpenCLIP's, so the param tree reads like its state dict, e.g.
"transformer/resblocks/3/attn/in_proj/kernel" of shape (width, 3 * width), columns q | k | v.

Images are NHWC floats (already resized and normalised); tokens are int (N, L) ids from OpenCLIP's tokenizer.
Parameters are `param_dtype` (float32); `dtype` is the compute dtype (float32 or bfloat16). Layer-norm
statistics and the attention softmax always run in float32.
"""

import dataclasses
import difflib
import importlib.util
import json
import math
import os
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


# ------------------------------------------------------------------------------------------ OpenCLIP configs

# open_clip 3.3.0's dataclass defaults (CLIPVisionCfg / CLIPTextCfg) of the fields read here.
_VISION_DEFAULTS = dict(
  image_size=224, patch_size=16, width=768, layers=12, head_width=64, mlp_ratio=4.0, norm_kwargs=None
)
_TEXT_DEFAULTS = dict(
  context_length=77,
  vocab_size=49408,
  width=512,
  heads=8,
  layers=12,
  mlp_ratio=4.0,
  norm_kwargs=None,
  proj_type="linear",
)
# Options whose other values select another architecture: option -> the values of the standard ViT CLIP.
_BLOCK_FIXED = dict(
  ls_init_value=(None,),
  output_tokens=(False,),
  act_kwargs=(None,),
  block_type=(None, "default"),
  qk_norm=(False,),
  scaled_cosine_attn=(False,),
  scale_heads=(False,),
  scale_attn_inner=(False,),
  scale_attn=(False,),
  scale_fc=(False,),
  final_ln_after_pool=(False,),
)
_VISION_FIXED = dict(
  _BLOCK_FIXED,
  attentional_pool=(False,),
  no_ln_pre=(False,),
  pos_embed_type=("learnable", "sin_cos_2d"),
  pool_type=("tok",),
  timm_model_name=(None,),
)
_TEXT_FIXED = dict(
  _BLOCK_FIXED,
  embed_cls=(False,),
  no_causal_mask=(False,),
  pool_type=("argmax",),
  proj_bias=(False,),
  hf_model_name=(None,),
  hf_tokenizer_name=(None, ""),
  tokenizer_kwargs=(None, {}, {"clean": "lower"}),
)  # data/clip_tokenizer.py is CLIP's BPE
_TOP_FIXED = dict(
  custom_text=(False,), init_logit_bias=(None,), multimodal_cfg=(None,), nonscalar_logit_scale=(False,)
)
# Options without effect on inference weights or outputs (training-only, tokenizer, or unused with the above).
_VISION_IGNORED = {
  "patch_dropout",
  "attn_pooler_queries",
  "attn_pooler_heads",
  "timm_model_pretrained",
  "timm_pool",
  "timm_proj",
  "timm_proj_bias",
  "timm_drop",
  "timm_drop_path",
}
_TEXT_IGNORED = {
  "tokenizer_mode",
  "pad_id",
  "eos_id",
  "hf_model_pretrained",
  "hf_proj_type",
  "hf_pooler_type",
}
_TOP_IGNORED = {"init_logit_scale"}


def _unsupported(cfg: dict, prefix: str, read: set[str], fixed: dict, ignored: set[str]) -> list[str]:
  """Descriptions of the options in `cfg` this port does not implement."""
  problems = []
  for key, value in cfg.items():
    if key in fixed:
      if value not in fixed[key]:
        problems.append(f"{prefix}{key}={value!r} (supported: {' or '.join(map(repr, fixed[key]))})")
    elif key not in read and key not in ignored:
      problems.append(f"{prefix}{key} (unknown option)")
  return problems


def _square(value: Any, key: str, problems: list[str]) -> int:
  if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
    value = value[0]
  if not isinstance(value, int):
    problems.append(f"{key}={value!r} (supported: an int, i.e. square)")
    return 1
  return value


def _ln_eps(norm_kwargs: dict | None, key: str, problems: list[str]) -> float:
  if norm_kwargs is None:
    return 1e-5
  if set(norm_kwargs) != {"eps"}:
    problems.append(f'{key}={norm_kwargs!r} (supported: None or {{"eps": x}})')
    return 1e-5
  return float(norm_kwargs["eps"])


def config_from_dict(raw: dict, *, source: str) -> CLIPConfig:
  """Parses an OpenCLIP model config (or an HF-hub open_clip_config.json with `model_cfg`).

  Raises:
    ValueError naming `source`: missing sections, or every option of a non-standard architecture.
  """
  cfg = {"quick_gelu": False, **(raw["model_cfg"] if "model_cfg" in raw else raw)}
  missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
  if missing:
    raise ValueError(f"{source}: not an OpenCLIP model config; missing keys {missing}.")
  vision = {**_VISION_DEFAULTS, **cfg["vision_cfg"]}
  text = {**_TEXT_DEFAULTS, **cfg["text_cfg"]}
  problems = (
    _unsupported(cfg, "", {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}, _TOP_FIXED, _TOP_IGNORED)
    + _unsupported(vision, "vision_cfg.", set(_VISION_DEFAULTS), _VISION_FIXED, _VISION_IGNORED)
    + _unsupported(text, "text_cfg.", set(_TEXT_DEFAULTS), _TEXT_FIXED, _TEXT_IGNORED)
  )
  if not isinstance(vision["layers"], int):
    problems.append(
      f"vision_cfg.layers={vision['layers']!r} (a list selects the ModifiedResNet tower; supported: an int)"
    )
  if text["proj_type"] not in ("linear", "none"):
    problems.append(f'text_cfg.proj_type={text["proj_type"]!r} (supported: "linear" or "none")')
  image_size = _square(vision["image_size"], "vision_cfg.image_size", problems)
  patch_size = _square(vision["patch_size"], "vision_cfg.patch_size", problems)
  vision_eps = _ln_eps(vision["norm_kwargs"], "vision_cfg.norm_kwargs", problems)
  text_eps = _ln_eps(text["norm_kwargs"], "text_cfg.norm_kwargs", problems)
  if problems:
    raise ValueError(
      f"{source}: unsupported OpenCLIP config; this port implements only the standard "
      f"ViT CLIP (pre-LN blocks, class-token pooling, causal text tower pooled at argmax). "
      f"Unsupported: {'; '.join(problems)}."
    )
  act = "quick_gelu" if cfg["quick_gelu"] else "gelu"
  return CLIPConfig(
    vision=VisionConfig(
      image_size=image_size,
      patch_size=patch_size,
      width=vision["width"],
      layers=vision["layers"],
      heads=vision["width"] // vision["head_width"],
      mlp_width=int(vision["width"] * vision["mlp_ratio"]),
      output_dim=cfg["embed_dim"],
      act=act,
      ln_eps=vision_eps,
    ),
    text=TextConfig(
      context_length=text["context_length"],
      vocab_size=text["vocab_size"],
      width=text["width"],
      layers=text["layers"],
      heads=text["heads"],
      mlp_width=int(text["width"] * text["mlp_ratio"]),
      output_dim=None if text["proj_type"] == "none" else cfg["embed_dim"],
      act=act,
      ln_eps=text_eps,
    ),
  )


def openclip_config_dir() -> str:
  """open_clip's bundled model_configs folder, located without importing open_clip (or torch)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
      "open_clip is not installed, so its model configs cannot be found by name; "
      "pass the path of a model-config JSON instead."
    )
  return os.path.join(spec.submodule_search_locations[0], "model_configs")


def load_config(name_or_path: str | os.PathLike) -> CLIPConfig:
  """Reads an OpenCLIP model config by name ('ViT-B-32', 'ViT-L-14-quickgelu') or JSON path.

  Raises:
    ValueError: unknown name (with close matches), unreadable file, or a non-standard architecture
      (timm/HF towers, SigLIP, CoCa, CLIPA, layer scale, ...), listing every unsupported option.
  """
  name = os.fspath(name_or_path)
  if name.endswith(".json") or os.path.isfile(name):
    path = name
  else:
    config_dir = openclip_config_dir()
    path = os.path.join(config_dir, f"{name}.json")
    if not os.path.isfile(path):
      known = sorted(f[: -len(".json")] for f in os.listdir(config_dir) if f.endswith(".json"))
      raise ValueError(
        f"Unknown OpenCLIP model config {name!r}; close matches: "
        f"{difflib.get_close_matches(name, known)}; all names: the JSONs in {config_dir}."
      )
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the OpenCLIP model config: {e}") from e
  return config_from_dict(raw, source=path)


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
