"""The experiment pipeline behind `python -m adarank_jax.main`: config validation, loading the models
and data of a config, running each method, checkpointed training loops, reports. Imports every layer
but benchmarks."""
