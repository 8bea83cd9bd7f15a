"""Command-line converters between PyTorch checkpoints and adarank_jax param trees."""
