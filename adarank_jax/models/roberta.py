"""RoBERTa and BERT encoders in Flax NNX, matching Hugging Face transformers 5.23.

Attribute names mirror the Hugging Face modules, so param paths read like the
PyTorch state dict: `roberta/encoder/layer/3/attention/self/query/kernel` is
`roberta.encoder.layer.3.attention.self.query.weight` (transposed to (in, out)).

One encoder body (`RobertaModel`) serves both architectures; they differ only in
how position ids are made (`RobertaConfig.position_ids`): RoBERTa counts from
`pad_token_id + 1` and gives padding the pad position (fairseq's
`make_positions`), BERT uses 0..L-1. The architectures, and their param trees:

  RobertaForSequenceClassification  roberta/..., classifier/{dense,out_proj}
  RobertaModel, BertModel           embeddings/..., encoder/..., pooler/dense
  BertForSequenceClassification     bert/... (with pooler), classifier/{kernel,bias}

Shapes: B batch, L sequence length, D hidden size, C number of labels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from adarank_jax.models.activations import ACTIVATIONS

ARCHITECTURES = (
  "RobertaForSequenceClassification",
  "RobertaModel",
  "BertModel",
  "BertForSequenceClassification",
  "RobertaForMaskedLM",
  "BertForMaskedLM",
)  # masked LMs: the body only (no lm_head)
POSITION_IDS = ("padding_offset", "absolute")  # RoBERTa, BERT


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
  """Hyper-parameters of a RoBERTa/BERT encoder and its head.

  Attributes:
    architecture: one of ARCHITECTURES (the HF class the params come from).
    position_ids: 'padding_offset' (RoBERTa) or 'absolute' (BERT).
    num_labels: classifier outputs C; None for the bare models.
    dtype: compute dtype (params stay float32); 'float32' or 'bfloat16'.
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  pad_token_id: int
  position_ids: str
  num_labels: int | None
  dtype: str = "float32"

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
    if self.position_ids not in POSITION_IDS:
      raise ValueError(f"position_ids {self.position_ids!r} is not one of {POSITION_IDS}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
      )
    if self.architecture.endswith("ForSequenceClassification") != (self.num_labels is not None):
      raise ValueError(
        f"{self.architecture} needs num_labels set exactly when it has a "
        f"classifier; got num_labels={self.num_labels}"
      )
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {self.dtype!r} is not 'float32' or 'bfloat16'")


def position_ids(input_ids: jax.Array, *, scheme: str, pad_token_id: int) -> jax.Array:
  """(B, L) int position ids, as HF RoBERTa (`create_position_ids_from_input_ids`) or BERT make them."""
  if scheme == "absolute":
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
  not_pad = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class RobertaEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    d, dtype = config.hidden_size, jnp.dtype(config.dtype)
    self.config = config
    self.word_embeddings = nnx.Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, dtype=dtype, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d, dtype=dtype, rngs=rngs)
    # pylint: disable-next=invalid-name
    self.LayerNorm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """(B, L) ids -> (B, L, D) embeddings."""
    offset = self.config.pad_token_id + 1 if self.config.position_ids == "padding_offset" else 0
    if input_ids.shape[1] + offset > self.config.max_position_embeddings:
      raise ValueError(
        f"sequence length {input_ids.shape[1]} exceeds the "
        f"{self.config.max_position_embeddings - offset} positions of the model"
      )
    positions = position_ids(
      input_ids, scheme=self.config.position_ids, pad_token_id=self.config.pad_token_id
    )
    x = (
      self.word_embeddings(input_ids)
      + self.token_type_embeddings(token_type_ids)
      + self.position_embeddings(positions)
    )
    return self.LayerNorm(x)


class RobertaSelfAttention(nnx.Module):
  """Multi-head self-attention with separate query/key/value projections."""

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    d, dtype = config.hidden_size, jnp.dtype(config.dtype)
    self.num_heads = config.num_attention_heads
    self.query = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
    self.key = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
    self.value = nnx.Linear(d, d, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: (B, L, D); mask: (B, 1, L, L) bool, True where attending is allowed."""
    b, length, d = x.shape
    heads = lambda t: t.reshape(b, length, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(
      heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask=mask
    )
    return out.reshape(b, length, d)


class RobertaSelfOutput(nnx.Module):
  """Output projection + residual + LayerNorm (post-LN); also the FFN output."""

  def __init__(self, d_in: int, config: RobertaConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.dense = nnx.Linear(d_in, config.hidden_size, dtype=dtype, rngs=rngs)
    # pylint: disable-next=invalid-name
    self.LayerNorm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dense(x) + residual)


class RobertaAttention(nnx.Module):
  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.self = RobertaSelfAttention(config, rngs=rngs)
    self.output = RobertaSelfOutput(config.hidden_size, config, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    return self.output(self.self(x, mask), x)


class RobertaIntermediate(nnx.Module):
  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(
      config.hidden_size, config.intermediate_size, dtype=jnp.dtype(config.dtype), rngs=rngs
    )
    self.act = config.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.act](self.dense(x))


class RobertaLayer(nnx.Module):
  """One post-LN transformer block: attention, then feed-forward."""

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.attention = RobertaAttention(config, rngs=rngs)
    self.intermediate = RobertaIntermediate(config, rngs=rngs)
    self.output = RobertaSelfOutput(config.intermediate_size, config, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention(x, mask)
    return self.output(self.intermediate(x), x)


class RobertaEncoder(nnx.Module):
  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List([RobertaLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    for layer in self.layer:
      x = layer(x, mask)
    return x


class RobertaPooler(nnx.Module):
  """tanh(dense(first token)): BERT's pooler."""

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(config.hidden_size, config.hidden_size, dtype=jnp.dtype(config.dtype), rngs=rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """(B, L, D) -> (B, D)."""
    return jnp.tanh(self.dense(hidden[:, 0]))


class RobertaModel(nnx.Module):
  """The encoder body (HF RobertaModel / BertModel); `__call__` returns last hidden states."""

  def __init__(self, config: RobertaConfig, *, add_pooling_layer: bool, rngs: nnx.Rngs):
    self.embeddings = RobertaEmbeddings(config, rngs=rngs)
    self.encoder = RobertaEncoder(config, rngs=rngs)
    if add_pooling_layer:
      self.pooler = RobertaPooler(config, rngs=rngs)

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """Last hidden states.

    Args:
      input_ids: (B, L) int token ids.
      attention_mask: (B, L), 1 (or True) for real tokens and 0 for padding.
      token_type_ids: (B, L) int segment ids; zeros when None.

    Returns:
      (B, L, D) hidden states of the last layer (padded positions included).
    """
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids)
    mask = attention_mask.astype(bool)[:, None, None, :]
    return self.encoder(x, mask)

  def encode(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, L, D) last hidden states; the same as `__call__` for the bare model."""
    return self(input_ids, attention_mask, token_type_ids)


class RobertaClassificationHead(nnx.Module):
  """RoBERTa's head: out_proj(tanh(dense(first token)))."""

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    d, dtype = config.hidden_size, jnp.dtype(config.dtype)
    self.dense = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
    self.out_proj = nnx.Linear(d, config.num_labels, dtype=dtype, rngs=rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """(B, L, D) -> (B, C)."""
    return self.out_proj(jnp.tanh(self.dense(hidden[:, 0])))


class RobertaForSequenceClassification(nnx.Module):
  """HF RobertaForSequenceClassification: body without pooler + classification head."""

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.roberta = RobertaModel(config, add_pooling_layer=False, rngs=rngs)
    self.classifier = RobertaClassificationHead(config, rngs=rngs)

  def encode(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, L, D) last hidden states, see `RobertaModel.__call__`."""
    return self.roberta(input_ids, attention_mask, token_type_ids)

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, C) logits from the first token; inputs as `RobertaModel.__call__`."""
    return self.classifier(self.encode(input_ids, attention_mask, token_type_ids))


class BertForSequenceClassification(nnx.Module):
  """HF BertForSequenceClassification: classifier(pooler(body))."""

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.bert = RobertaModel(config, add_pooling_layer=True, rngs=rngs)
    self.classifier = nnx.Linear(
      config.hidden_size, config.num_labels, dtype=jnp.dtype(config.dtype), rngs=rngs
    )

  def encode(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, L, D) last hidden states, see `RobertaModel.__call__`."""
    return self.bert(input_ids, attention_mask, token_type_ids)

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, C) logits from the pooled first token; inputs as `RobertaModel.__call__`."""
    return self.classifier(self.bert.pooler(self.encode(input_ids, attention_mask, token_type_ids)))


class MaskedLMBody(nnx.Module):
  """The body of HF RobertaForMaskedLM / BertForMaskedLM (how roberta-base and bert-base are published).

  Only the encoder is kept, under the checkpoint's prefix ('roberta' or 'bert'); the MLM head is not a
  parameter of any merge and is dropped on load. `__call__` returns last hidden states.
  """

  def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs):
    self.prefix = "roberta" if config.architecture.startswith("Roberta") else "bert"
    setattr(self, self.prefix, RobertaModel(config, add_pooling_layer=False, rngs=rngs))

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    return getattr(self, self.prefix)(input_ids, attention_mask, token_type_ids)

  encode = __call__


def build(config: RobertaConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The module of `config.architecture`, randomly initialised (use `nnx.eval_shape` for shapes only)."""
  if config.architecture == "RobertaForSequenceClassification":
    return RobertaForSequenceClassification(config, rngs=rngs)
  if config.architecture == "BertForSequenceClassification":
    return BertForSequenceClassification(config, rngs=rngs)
  if config.architecture.endswith("ForMaskedLM"):
    return MaskedLMBody(config, rngs=rngs)
  return RobertaModel(config, add_pooling_layer=True, rngs=rngs)
