"""Llama, Mistral and Qwen2 decoders in Flax NNX, matching Hugging Face transformers 5.23.

The three families are one model with one variant argument, `DecoderConfig.model_type`: pre-norm blocks
(RMSNorm), rotary position embeddings, grouped-query attention and a SwiGLU MLP. They differ only in
which projections have biases (Qwen2: q/k/v; Llama: all four attention projections with
`attention_bias`, the MLP with `mlp_bias`) and in which layers attend within a sliding window
(Mistral: every layer when `sliding_window` is set; Qwen2: the layers its `layer_types` names).

Attribute names mirror the Hugging Face modules, so param paths read like the PyTorch state dict:
`model/layers/3/self_attn/q_proj/kernel` is `model.layers.3.self_attn.q_proj.weight` (transposed to
(in, out)). The architectures, and their param trees (X is Llama, Mistral or Qwen2):

  XForCausalLM                model/{embed_tokens,layers/{i}/...,norm}, lm_head/kernel (absent when
                              tie_word_embeddings: the head is embed_tokens)
  XForSequenceClassification  model/..., score/kernel (no bias), read at the last non-pad token
  XModel                      embed_tokens, layers/{i}/..., norm

Position ids are 0..L-1 whatever the padding, as in HF when none are given; padding is masked out of the
keys by `attention_mask` (left or right padding). Parameters are float32; `dtype` is the compute dtype.

Shapes: B batch, L sequence length, D hidden size, N query heads, K key/value heads, H head_dim,
C number of labels, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adarank_jax.models import pooling
from adarank_jax.models.activations import ACTIVATIONS

MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # model_type -> class prefix
HEADS = ("ForCausalLM", "ForSequenceClassification", "Model")
ARCHITECTURES = tuple(prefix + head for prefix in MODEL_TYPES.values() for head in HEADS)
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "llama3")
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class RopeParameters:
  """HF 5.x `rope_parameters` (what older config.json files call rope_theta + rope_scaling).

  Attributes:
    rope_type: 'default' or 'llama3' (Llama 3.1's frequency-dependent scaling).
    rope_theta: the base wavelength.
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: llama3's
      parameters; None for 'default'.
  """

  rope_type: str
  rope_theta: float
  factor: float | None = None
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_parameters.rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
    given = [f for f in _LLAMA3_FIELDS if getattr(self, f) is not None]
    wanted = list(_LLAMA3_FIELDS) if self.rope_type == "llama3" else []
    if given != wanted:
      raise ValueError(
        f"rope_parameters of rope_type {self.rope_type!r} need exactly the fields {wanted}; got {given}"
      )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of a Llama, Mistral or Qwen2 decoder and its head (HF field names).

  Attributes:
    architecture: one of ARCHITECTURES, of the family `model_type` names.
    model_type: 'llama', 'mistral' or 'qwen2' (the variant).
    head_dim: H; HF's default is hidden_size // num_attention_heads.
    attention_bias: biases on q/k/v/o (Llama only; Qwen2 always has q/k/v biases, see `qkv_bias`).
    mlp_bias: biases on gate/up/down (Llama only).
    tie_word_embeddings: the causal LM head is embed_tokens (no lm_head param).
    sliding_window: the window of 'sliding_attention' layers (a token sees itself and the
      sliding_window - 1 before it); None when no layer slides.
    layer_types: per layer, 'full_attention' or 'sliding_attention'.
    pad_token_id: the id pooling skips (sequence classification); None means the last position is
      pooled, which HF allows only for batch size 1.
    num_labels: score outputs C; None unless the architecture is a sequence classifier.
    dtype: compute dtype (params stay float32); 'float32' or 'bfloat16'.
  """

  architecture: str
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  hidden_act: str
  rms_norm_eps: float
  rope_parameters: RopeParameters
  attention_bias: bool
  mlp_bias: bool
  tie_word_embeddings: bool
  sliding_window: int | None
  layer_types: tuple[str, ...]
  pad_token_id: int | None
  num_labels: int | None
  dtype: str = "float32"

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not one of {list(MODEL_TYPES)}")
    family = tuple(MODEL_TYPES[self.model_type] + head for head in HEADS)
    if self.architecture not in family:
      raise ValueError(
        f"architecture {self.architecture!r} is not one of {family} (model_type {self.model_type!r})"
      )
    if self.model_type != "llama" and (self.attention_bias or self.mlp_bias):
      raise ValueError(
        f"attention_bias and mlp_bias are Llama fields; model_type {self.model_type!r} has neither"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads {self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads {self.num_key_value_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} is odd; rotary embeddings rotate pairs")
    if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
      raise ValueError(
        f"layer_types must name one of {LAYER_TYPES} for each of the {self.num_hidden_layers} layers; "
        f"got {self.layer_types!r}"
      )
    if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
      raise ValueError(f"sliding_attention layers need a positive sliding_window; got {self.sliding_window}")
    if self.architecture.endswith("ForSequenceClassification") != (self.num_labels is not None):
      raise ValueError(
        f"{self.architecture} needs num_labels set exactly when it has a score "
        f"head; got num_labels={self.num_labels}"
      )
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {self.dtype!r} is not 'float32' or 'bfloat16'")

  @property
  def qkv_bias(self) -> bool:
    """Whether q_proj, k_proj and v_proj have biases."""
    return self.attention_bias or self.model_type == "qwen2"


# ------------------------------------------------------------------------------------------------
# Rotary embeddings and masks: pure functions of the config and the inputs.


def rope_inv_freq(rope: RopeParameters, head_dim: int) -> np.ndarray:
  """(H // 2,) float32 inverse frequencies, computed as transformers does (in float32).

  'default': theta^(-2i / H). 'llama3' (transformers' `_compute_llama3_parameters`): wavelengths
  2 pi / f longer than original_max_position_embeddings / low_freq_factor are divided by `factor`,
  those shorter than original_max_position_embeddings / high_freq_factor are kept, and those between
  are interpolated smoothly.
  """
  exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(rope.rope_theta), exponents)).astype(np.float32)
  if rope.rope_type == "default":
    return inv_freq
  factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
  old_context = rope.original_max_position_embeddings
  wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > old_context / low, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
  smooth = ((old_context / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate(x: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding of x (B, L, heads, H) at positions 0..L-1 (HF's `apply_rotary_pos_emb`).

  The angles are float32; cos and sin are cast to x's dtype before they multiply x, as in HF.
  """
  angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]  # (1, L, 1, H)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention_masks(attention_mask: jax.Array, sliding_window: int | None) -> dict[str, jax.Array]:
  """Layer type -> (B, 1, L, L) bool mask, True where query q may attend to key k.

  'full_attention': k <= q and k is not padding. 'sliding_attention' (only when `sliding_window` is
  set): also k > q - sliding_window, HF's `sliding_window_overlay`.
  """
  length = attention_mask.shape[1]
  q, k = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  keys = attention_mask.astype(bool)[:, None, None, :]
  masks = {"full_attention": (k <= q)[None, None] & keys}
  if sliding_window is not None:
    masks["sliding_attention"] = masks["full_attention"] & (k > q - sliding_window)[None, None]
  return masks


# ------------------------------------------------------------------------------------------------
# Modules.


class DecoderAttention(nnx.Module):
  """Grouped-query self-attention with rotary q/k: N query heads share K key/value heads."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    d, h, dtype = config.hidden_size, config.head_dim, jnp.dtype(config.dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = (
      config.num_attention_heads,
      config.num_key_value_heads,
      h,
    )
    self.rope = config.rope_parameters
    linear = lambda d_in, d_out, bias: nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, rngs=rngs)
    self.q_proj = linear(d, self.num_heads * h, config.qkv_bias)
    self.k_proj = linear(d, self.num_kv_heads * h, config.qkv_bias)
    self.v_proj = linear(d, self.num_kv_heads * h, config.qkv_bias)
    self.o_proj = linear(self.num_heads * h, d, config.attention_bias)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: (B, L, D); mask: (B, 1, L, L) bool, True where attending is allowed."""
    b, length, _ = x.shape
    inv_freq = rope_inv_freq(self.rope, self.head_dim)
    q = rotate(self.q_proj(x).reshape(b, length, self.num_heads, self.head_dim), inv_freq)
    k = rotate(self.k_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim), inv_freq)
    v = self.v_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # scale H^-0.5; query head n reads kv head n // G
    return self.o_proj(out.reshape(b, length, self.num_heads * self.head_dim))


class DecoderMLP(nnx.Module):
  """SwiGLU: down_proj(act(gate_proj(x)) * up_proj(x))."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    d, width, dtype = config.hidden_size, config.intermediate_size, jnp.dtype(config.dtype)
    linear = lambda d_in, d_out: nnx.Linear(d_in, d_out, use_bias=config.mlp_bias, dtype=dtype, rngs=rngs)
    self.gate_proj = linear(d, width)
    self.up_proj = linear(d, width)
    self.down_proj = linear(width, d)
    self.act = config.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


def _rms_norm(config: DecoderConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
    config.hidden_size, epsilon=config.rms_norm_eps, dtype=jnp.dtype(config.dtype), rngs=rngs
  )


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

  def __init__(self, config: DecoderConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.layer_type = config.layer_types[layer_idx]
    self.self_attn = DecoderAttention(config, rngs=rngs)
    self.mlp = DecoderMLP(config, rngs=rngs)
    self.input_layernorm = _rms_norm(config, rngs)
    self.post_attention_layernorm = _rms_norm(config, rngs)

  def __call__(self, x: jax.Array, masks: dict[str, jax.Array]) -> jax.Array:
    """x: (B, L, D); masks: from `attention_masks`, the layer reads the one of its type."""
    x = x + self.self_attn(self.input_layernorm(x), masks[self.layer_type])
    return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nnx.Module):
  """The decoder body (HF LlamaModel, MistralModel, Qwen2Model); `__call__` returns hidden states after norm."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.sliding_window = config.sliding_window if "sliding_attention" in config.layer_types else None
    self.embed_tokens = nnx.Embed(
      config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype), rngs=rngs
    )
    self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
    self.norm = _rms_norm(config, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Last hidden states.

    Args:
      input_ids: (B, L) int token ids.
      attention_mask: (B, L), 1 (or True) for real tokens and 0 for padding.

    Returns:
      (B, L, D) hidden states after the final norm. Rows of padding positions are computed but
      meaningless (a left-padded position may attend to nothing).
    """
    masks = attention_masks(attention_mask, self.sliding_window)
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x, masks)
    return self.norm(x)

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, D) last hidden states; the same as `__call__` for the bare model."""
    return self(input_ids, attention_mask)


class DecoderForCausalLM(nnx.Module):
  """HF XForCausalLM: next-token logits from lm_head, or from embed_tokens when the embeddings are tied."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.tied = config.tie_word_embeddings
    self.model = DecoderModel(config, rngs=rngs)
    if not self.tied:
      self.lm_head = nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=jnp.dtype(config.dtype), rngs=rngs
      )

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, D) last hidden states, see `DecoderModel.__call__`."""
    return self.model(input_ids, attention_mask)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, V) next-token logits."""
    hidden = self.encode(input_ids, attention_mask)
    if self.tied:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)


class DecoderForSequenceClassification(nnx.Module):
  """HF XForSequenceClassification: score (no bias) at the last non-pad token."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.pad_token_id = config.pad_token_id
    self.model = DecoderModel(config, rngs=rngs)
    self.score = nnx.Linear(
      config.hidden_size, config.num_labels, use_bias=False, dtype=jnp.dtype(config.dtype), rngs=rngs
    )

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, D) last hidden states, see `DecoderModel.__call__`."""
    return self.model(input_ids, attention_mask)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, C) logits at the rightmost non-pad token (`pooling.last_non_pad_index`)."""
    hidden = self.encode(input_ids, attention_mask)
    return self.score(pooling.at_last_non_pad(hidden, input_ids, self.pad_token_id))


_CLASSES = {
  "ForCausalLM": DecoderForCausalLM,
  "ForSequenceClassification": DecoderForSequenceClassification,
  "Model": DecoderModel,
}


def build(config: DecoderConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The module of `config.architecture`, randomly initialised (use `nnx.eval_shape` for shapes only)."""
  head = config.architecture.removeprefix(MODEL_TYPES[config.model_type])
  return _CLASSES[head](config, rngs=rngs)
