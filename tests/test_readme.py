"""The README's two commands are the ones that run: CI's command is README's test command, verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  ci_command = [
    line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")
  ]
  assert len(ci_command) == 1
  readme = (ROOT / "README.md").read_text()
  assert ci_command[0] in readme
  assert "python -m adarank_jax.main --config configs/demo.py" in readme


def test_readme_config_files_exist():
  readme = (ROOT / "README.md").read_text()
  for name in (
    "vitb32_t8",
    "vitb32_t14",
    "vitb32_t20",
    "vitl14_t8",
    "vitl14_t14",
    "vitl14_t20",
    "roberta_glue",
    "gpt2_glue",
    "demo",
  ):
    assert f"{name}.py" in readme or f"{name}" in readme
    assert (ROOT / "configs" / f"{name}.py").exists()


def test_readme_lists_every_method_of_the_table():
  from adarank_jax.experiment import methods

  readme = (ROOT / "README.md").read_text()
  for name in methods.METHODS:
    assert f"`{name}`" in readme, name
