"""adarank_jax: AdaRank and friends, model merging in JAX/Flax.

The JAX core (task vectors, decomposition, masks, merging, training) imports without torch;
`adarank_jax.interop` reads and writes PyTorch / Hugging Face checkpoints and needs the `[torch]` extra.
"""

__version__ = "0.1.0"
