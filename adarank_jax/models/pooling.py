"""Which token a decoder's sequence classifier reads: the rightmost non-pad one, as HF 5.x pools.

Shared by every decoder family (GPT-2, Llama/Mistral/Qwen2): HF's `GPT2ForSequenceClassification` and
`GenericForSequenceClassification` both score the last token whose id is not `pad_token_id`, so left and
right padding pool the same token.
"""

import jax
import jax.numpy as jnp


def last_non_pad_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
  """(B,) index of the rightmost token whose id != pad_token_id, as HF 5.x pools.

  A row made only of padding gives 0 (HF's argmax of an all-zero row). With no
  pad token HF pools the last position and accepts only batch size 1.
  """
  b, length = input_ids.shape
  if pad_token_id is None:
    if b != 1:
      raise ValueError(
        "Cannot handle batch sizes > 1 if no padding token is defined "
        f"(pad_token_id is None, batch size {b})."
      )
    return jnp.full((b,), length - 1)
  indices = jnp.arange(length, dtype=jnp.int32)
  return jnp.argmax(indices * (input_ids != pad_token_id).astype(jnp.int32), axis=-1)


def at_last_non_pad(hidden: jax.Array, input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
  """(B, D) of the (B, L, D) `hidden` at each row's `last_non_pad_index`."""
  index = last_non_pad_index(input_ids, pad_token_id)
  return hidden[jnp.arange(hidden.shape[0]), index]
