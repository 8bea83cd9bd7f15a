"""Test-wide settings: offline hubs, and a private cache so that no test writes to the user's cache."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
  """Testbed builds go to this session's temporary folder (shared by its tests), not ~/.cache."""
  os.environ["ADARANK_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
