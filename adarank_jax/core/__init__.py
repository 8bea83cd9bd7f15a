"""The merging core: pure functions over pytrees of arrays (task vectors, SVD factors, masks, merges,
the baselines, the entropy objective, the training step and its layouts, evaluation). It imports
jax, numpy and optax only, never torch, a file format or the command line."""
