"""GPT-2 in Flax NNX, matching Hugging Face transformers 5.23.

Attribute names mirror the Hugging Face modules, so param paths read like the
PyTorch state dict: `transformer/h/3/attn/c_attn/kernel` is
`transformer.h.3.attn.c_attn.weight`. HF's Conv1D already stores (in, out)
weights, so kernels are the HF tensors as they are; `c_attn` stays one packed
(D, 3D) q|k|v matrix. The architectures, and their param trees:

  GPT2ForSequenceClassification  transformer/{wte,wpe,h/{i}/...,ln_f}, score/kernel (no bias)
  GPT2LMHeadModel                transformer/... (the LM head is tied to wte)
  GPT2Model                      wte, wpe, h/{i}/..., ln_f

Shapes: B batch, L sequence length, D hidden size, C number of labels, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from adarank_jax.models import pooling
from adarank_jax.models.activations import ACTIVATIONS

ARCHITECTURES = ("GPT2ForSequenceClassification", "GPT2LMHeadModel", "GPT2Model")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Hyper-parameters of GPT-2 (HF field names).

  Attributes:
    architecture: one of ARCHITECTURES.
    n_inner: MLP width; None means 4 * n_embd, as in HF.
    pad_token_id: the id pooling skips (sequence classification); None means the
      last position is pooled, which HF allows only for batch size 1.
    num_labels: score outputs C; None unless the architecture is a classifier.
    dtype: compute dtype (params stay float32); 'float32' or 'bfloat16'.
  """

  architecture: str
  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  n_inner: int | None
  activation_function: str
  layer_norm_epsilon: float
  scale_attn_weights: bool
  scale_attn_by_inverse_layer_idx: bool
  pad_token_id: int | None
  num_labels: int | None
  dtype: str = "float32"

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
    if self.activation_function not in ACTIVATIONS:
      raise ValueError(
        f"activation_function {self.activation_function!r} is not one of {sorted(ACTIVATIONS)}"
      )
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
    if (self.architecture == "GPT2ForSequenceClassification") != (self.num_labels is not None):
      raise ValueError(
        f"{self.architecture} needs num_labels set exactly when it has a score "
        f"head; got num_labels={self.num_labels}"
      )
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {self.dtype!r} is not 'float32' or 'bfloat16'")

  @property
  def mlp_width(self) -> int:
    return 4 * self.n_embd if self.n_inner is None else self.n_inner


class GPT2Attention(nnx.Module):
  """Causal multi-head attention with a packed (D, 3D) q|k|v projection."""

  def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
    d, dtype = config.n_embd, jnp.dtype(config.dtype)
    self.num_heads = config.n_head
    scale = (d // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
      scale /= float(layer_idx + 1)
    self.scale = scale
    self.c_attn = nnx.Linear(d, 3 * d, dtype=dtype, rngs=rngs)
    self.c_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: (B, L, D); mask: (B, 1, L, L) bool, True where attending is allowed."""
    b, length, d = x.shape
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    heads = lambda t: t.reshape(b, length, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), mask=mask, scale=self.scale)
    return self.c_proj(out.reshape(b, length, d))


class GPT2MLP(nnx.Module):
  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.c_fc = nnx.Linear(config.n_embd, config.mlp_width, dtype=dtype, rngs=rngs)
    self.c_proj = nnx.Linear(config.mlp_width, config.n_embd, dtype=dtype, rngs=rngs)
    self.act = config.activation_function

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


class GPT2Block(nnx.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
    d, eps, dtype = config.n_embd, config.layer_norm_epsilon, jnp.dtype(config.dtype)
    self.ln_1 = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
    self.attn = GPT2Attention(config, layer_idx, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
    self.mlp = GPT2MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x), mask)
    return x + self.mlp(self.ln_2(x))


class GPT2Model(nnx.Module):
  """The transformer body (HF GPT2Model); `__call__` returns last hidden states after ln_f."""

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    d, dtype = config.n_embd, jnp.dtype(config.dtype)
    self.wte = nnx.Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
    self.wpe = nnx.Embed(config.n_positions, d, dtype=dtype, rngs=rngs)
    self.h = nnx.List([GPT2Block(config, i, rngs=rngs) for i in range(config.n_layer)])
    self.ln_f = nnx.LayerNorm(d, epsilon=config.layer_norm_epsilon, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Last hidden states.

    Args:
      input_ids: (B, L) int token ids.
      attention_mask: (B, L), 1 (or True) for real tokens and 0 for padding.

    Returns:
      (B, L, D) hidden states after ln_f. Positions are 0..L-1 whatever the
      padding, as in HF when no position ids are given.
    """
    length = input_ids.shape[1]
    if length > self.wpe.num_embeddings:
      raise ValueError(
        f"sequence length {length} exceeds the {self.wpe.num_embeddings} positions of the model"
      )
    x = self.wte(input_ids) + self.wpe(jnp.arange(length))[None]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    for block in self.h:
      x = block(x, mask)
    return self.ln_f(x)

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, D) last hidden states; the same as `__call__` for the bare model."""
    return self(input_ids, attention_mask)


class GPT2ForSequenceClassification(nnx.Module):
  """HF GPT2ForSequenceClassification: score (no bias) at the last non-pad token."""

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    self.pad_token_id = config.pad_token_id
    self.transformer = GPT2Model(config, rngs=rngs)
    self.score = nnx.Linear(
      config.n_embd, config.num_labels, use_bias=False, dtype=jnp.dtype(config.dtype), rngs=rngs
    )

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, D) last hidden states, see `GPT2Model.__call__`."""
    return self.transformer(input_ids, attention_mask)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, C) logits at the rightmost non-pad token (`pooling.last_non_pad_index`)."""
    hidden = self.encode(input_ids, attention_mask)
    return self.score(pooling.at_last_non_pad(hidden, input_ids, self.pad_token_id))


class GPT2LMHeadModel(nnx.Module):
  """HF GPT2LMHeadModel with its head tied to `wte` (so only `transformer` holds params)."""

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    self.transformer = GPT2Model(config, rngs=rngs)

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, D) last hidden states, see `GPT2Model.__call__`."""
    return self.transformer(input_ids, attention_mask)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, L, V) next-token logits."""
    return self.transformer.wte.attend(self.encode(input_ids, attention_mask))


def build(config: GPT2Config, *, rngs: nnx.Rngs) -> nnx.Module:
  """The module of `config.architecture`, randomly initialised (use `nnx.eval_shape` for shapes only)."""
  classes = {
    "GPT2ForSequenceClassification": GPT2ForSequenceClassification,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPT2Model": GPT2Model,
  }
  return classes[config.architecture](config, rngs=rngs)
