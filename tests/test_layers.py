"""The package's layers (README "Layout"): each folder imports only the layers its sentence allows."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "adarank_jax"
# layer -> the layers of adarank_jax it may import (besides itself)
ALLOWED = {
  "core": set(),
  "models": {"core", "storage"},  # storage: heads.py caches zero-shot heads as .npy files
  "storage": {"core"},
  "interop": {"core", "models", "storage"},
  "data": {"core", "storage", "interop"},
  "digits": {"core", "models", "storage", "interop", "data"},
  "experiment": {"core", "models", "storage", "interop", "data", "digits"},
  "main": {"experiment", "storage"},
  "benchmarks": {"core", "models", "storage", "interop", "data", "digits", "experiment"},
}


def _imported_layers(path: Path) -> set[str]:
  layers = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adarank_jax"):
      names = [node.module] + (
        [f"{node.module}.{a.name}" for a in node.names] if node.module == "adarank_jax" else []
      )
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.startswith("adarank_jax")]
    for name in names:
      parts = name.split(".")
      if len(parts) > 1:
        layers.add(parts[1])
  return layers


def test_every_module_imports_only_the_layers_below_it():
  assert {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"} | {"main"} == set(ALLOWED)
  problems = []
  for path in sorted(ROOT.rglob("*.py")):
    relative = path.relative_to(ROOT)
    if relative.name == "__init__.py" and len(relative.parts) == 1:
      continue
    layer = relative.parts[0].removesuffix(".py")
    for other in _imported_layers(path) - {layer} - ALLOWED[layer]:
      problems.append(f"{relative} imports adarank_jax.{other}")
  assert not problems, problems


def test_nothing_in_the_library_imports_the_benchmarks():
  users = [
    p for p in ROOT.rglob("*.py") if "benchmarks" not in p.parts and "benchmarks" in _imported_layers(p)
  ]
  assert not users
