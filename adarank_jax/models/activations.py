"""The activation functions of every model architecture, by the names their configs use (HF and OpenCLIP)."""

from collections.abc import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (GPT-2)
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,  # x * sigmoid(x) (Llama, Mistral, Qwen2)
}
