"""Test-wide settings: offline hubs, a private cache so that no test writes to the user's cache, and one
XLA compilation cache for the session.

Many tests run the CLI on the same tiny configs, each run in its own process; the persistent compilation
cache (JAX's own, `jax_compilation_cache_dir`) lets a later run load the executables an earlier one
compiled instead of compiling them again. It changes no result: a cached executable is the compiled one.
The folder is this session's (removed at its end) unless JAX_COMPILATION_CACHE_DIR is already set.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set before any test module imports jax, so the tests' own process reads it too.
_XLA_CACHE = (
  None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="adarank-jax-xla-")
)
if _XLA_CACHE is not None:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE


def pytest_unconfigure(config):
  if _XLA_CACHE is not None:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
  """Testbed builds go to this session's temporary folder (shared by its tests), not ~/.cache."""
  os.environ["ADARANK_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
