"""Experiment configs: `get_config(arg)` functions, one file per paper experiment (see common.base())."""
