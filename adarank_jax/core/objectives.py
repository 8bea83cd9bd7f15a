"""The test-time objective: Shannon entropy of each task head's predictions (docs/algorithm.md, section 4).

H_t = mean over the batch of -sum_c softmax(z)_c log_softmax(z)_c; total loss = sum_t H_t, a plain
sum with no weighting and no regulariser. Labels are never seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def entropy(logits: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Batch-mean Shannon entropy (nats) of softmax(logits), computed in float32 (or wider).

  Args:
    logits: (B, C) class logits.
    weights: optional (B,) 0/1 row weights (0 for padded rows); the mean is over rows with
      weight 1 (0 when every row is padding).

  Returns:
    A float32 (float64 for float64 logits) scalar.
  """
  logits = logits.astype(jnp.result_type(jnp.float32, logits.dtype))
  log_p = jax.nn.log_softmax(logits, axis=-1)
  per_row = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)  # (B,)
  if weights is None:
    return jnp.mean(per_row)
  weights = weights.astype(per_row.dtype)
  return jnp.sum(weights * per_row) / jnp.maximum(jnp.sum(weights), 1.0)
