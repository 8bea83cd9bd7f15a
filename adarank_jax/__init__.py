"""adarank_jax: AdaRank and friends, model merging in JAX/Flax.

`adarank_jax.core` (task vectors, decomposition, masks, merging, training) imports without torch;
`adarank_jax.interop` reads and writes PyTorch / Hugging Face checkpoints and needs the `[torch]` extra.
The layers and what may import what: README "Layout".
"""

__version__ = "0.1.0"
