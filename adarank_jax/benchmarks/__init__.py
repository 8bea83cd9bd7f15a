"""Benchmark programs, each run as `python -m adarank_jax.benchmarks.<name>`; they print what they
measure and the machine it was measured on. Nothing in the library imports them."""
