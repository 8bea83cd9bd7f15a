"""The test-time objectives (docs/algorithm.md, section 4, and its generative section).

Classification (the paper's): H_t = mean over the batch of -sum_c softmax(z)_c log_softmax(z)_c; the
total loss is sum_t H_t, a plain sum with no weighting and no regulariser. Labels are never seen.

Generative merging (our extension, not the paper's): H_t = `next_token_entropy` of the merged causal
LM on task t's unlabeled prompts, the mean over every non-pad position of the batch of the entropy of
the next-token distribution predicted there; the total loss is again the plain sum over tasks.
`next_token_sums` gives the sums behind it and behind the perplexity of held-out prompts, for
evaluation over many batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _wide(logits: jax.Array) -> jax.Array:
  return logits.astype(jnp.result_type(jnp.float32, logits.dtype))


def _entropies(logits: jax.Array) -> jax.Array:
  """Entropy (nats) of softmax over the last axis, float32 (or wider)."""
  log_p = jax.nn.log_softmax(_wide(logits), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def entropy(logits: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Batch-mean Shannon entropy (nats) of softmax(logits), computed in float32 (or wider).

  Args:
    logits: (B, C) class logits.
    weights: optional (B,) 0/1 row weights (0 for padded rows); the mean is over rows with
      weight 1 (0 when every row is padding).

  Returns:
    A float32 (float64 for float64 logits) scalar.
  """
  per_row = _entropies(logits)  # (B,)
  if weights is None:
    return jnp.mean(per_row)
  weights = weights.astype(per_row.dtype)
  return jnp.sum(weights * per_row) / jnp.maximum(jnp.sum(weights), 1.0)


def next_token_entropy(logits: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean next-token entropy (nats) over the non-pad positions of a batch, computed in float32.

  sum_{b,i} w_{b,i} H(softmax(logits[b, i])) / sum_{b,i} w_{b,i}: logits[b, i] is the model's
  distribution of token i + 1 of sequence b. Every non-pad position counts, the last one included
  (its distribution is that of the prompt's first continuation token, the one generation samples
  next), and every position weighs the same, so longer prompts weigh more than short ones. 0 when
  every position is padding.

  Args:
    logits: (B, L, V) next-token logits.
    weights: (B, L) 1 for real tokens, 0 for padding (the attention mask).

  Returns:
    A float32 (float64 for float64 logits) scalar.
  """
  per_position = _entropies(logits)  # (B, L)
  weights = weights.astype(per_position.dtype)
  return jnp.sum(weights * per_position) / jnp.maximum(jnp.sum(weights), 1.0)


def next_token_sums(logits: jax.Array, input_ids: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """The sums behind `next_token_entropy` and perplexity over one batch, to add up over many.

  entropy_sum / positions is `next_token_entropy` of the batches added; exp(nll_sum / targets) is the
  perplexity of their prompts: the negative log-likelihood of every token i + 1 (0 <= i < L - 1)
  given tokens 0..i, where both positions i and i + 1 are real, so a prompt's first token is never
  predicted and its last position predicts nothing.

  Args:
    logits: (B, L, V) next-token logits.
    input_ids: (B, L) int token ids.
    weights: (B, L) 1 for real tokens, 0 for padding.

  Returns:
    float32 scalars: entropy_sum, positions (sum of weights), nll_sum, targets (scored tokens).
  """
  log_p = jax.nn.log_softmax(_wide(logits), axis=-1)
  weights = weights.astype(log_p.dtype)
  per_position = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  target = weights[:, :-1] * weights[:, 1:]
  token_log_p = jnp.take_along_axis(log_p[:, :-1], input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  return {
    "entropy_sum": jnp.sum(weights * per_position),
    "positions": jnp.sum(weights),
    "nll_sum": -jnp.sum(target * token_log_p),
    "targets": jnp.sum(target),
  }
