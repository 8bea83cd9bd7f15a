"""Every experiment config loads, carries the numbers of docs/algorithm.md (section 3), and bad configs
fail before any compute."""

import importlib
import json
from pathlib import Path

import pytest

from adarank_jax.experiment import validate
from configs import common

EXPERIMENTS = (
  "vitb32_t8",
  "vitb32_t14",
  "vitb32_t20",
  "vitl14_t8",
  "vitl14_t14",
  "vitl14_t20",
  "roberta_glue",
  "gpt2_glue",
)

# docs/algorithm.md, section 3: (batch, steps, eval every, TA (prior, rho, lr), CART (prior, rho, lr)).
TABLE = {
  "vitb32_t8": (16, 10_000, 500, (0.3, 1.0, 1e-3), (2.3, 0.16, 1e-3)),
  "vitb32_t14": (16, 10_000, 500, (0.3, 1.0, 1e-3), (2.8, 0.32, 1e-3)),
  "vitb32_t20": (16, 10_000, 500, (0.05, 1.0, 1e-3), (2.4, 0.32, 1e-3)),
  "vitl14_t8": (4, 10_000, 500, (0.3, 1.0, 1e-3), (3.0, 0.16, 1e-3)),
  "vitl14_t14": (2, 100_000, 1000, (0.3, 1.0, 1e-3), (1.25, 0.16, 1e-3)),
  "vitl14_t20": (2, 100_000, 2000, (1.0, 0.3, 1e-3), (1.0, 0.16, 1e-3)),
  "roberta_glue": (8, 5_000, 500, (0.3, 1.0, 5e-5), (1.6, 0.04, 1e-4)),
  "gpt2_glue": (8, 5_000, 500, (0.3, 1.0, 5e-5), (1.3, 0.01, 5e-5)),
}


def _get(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_numbers_match_spec(name):
  config = _get(name)
  batch, steps, every, ta, cart = TABLE[name]
  assert config.adarank.batch_size_per_task == batch
  assert config.adarank.num_steps == steps and config.adarank.eval_every == every
  assert (
    config.adarank.ta.prior,
    config.adarank.ta.initial_rank_ratio,
    config.adarank.ta.learning_rate,
  ) == ta
  assert (
    config.adarank.cart.prior,
    config.adarank.cart.initial_rank_ratio,
    config.adarank.cart.learning_rate,
  ) == cart
  assert config.adarank.mask_temperature == 10.0 and config.adarank.selection == "final"
  assert config.methods == ("individual", "adarank_ta")
  assert config.model.pretrained == "" and config.data.data_dir == ""  # no machine paths
  json.loads(config.to_json())


def test_task_lists_and_args():
  assert len(_get("vitb32_t8").tasks) == 8 and len(_get("vitl14_t20").tasks) == 20
  assert _get("vitb32_t14").tasks[:8] == common.TASKS_8
  assert len(_get("roberta_glue").tasks) == 7
  config = _get("vitb32_t8", "base=cart,baselines=true")
  assert config.methods[-1] == "adarank_cart" and "ties" in config.methods
  assert {"adamerging_task", "adamerging_layer", "iso_cts"} <= set(config.methods)
  for base in ("tsv_m", "iso_cts"):
    assert _get("vitb32_t8", f"base={base}").methods == ("individual", f"adarank_{base}")
  assert _get("vitb32_t8", "quick=true").adarank.num_steps == 4
  with pytest.raises(ValueError, match="unknown config argument 'bse'"):
    _get("vitb32_t8", "bse=cart")
  with pytest.raises(ValueError, match="base='dare'"):
    _get("vitb32_t8", "base=dare")


def test_validate_lists_every_problem(tmp_path):
  config = _get("vitb32_t8")
  config.tasks = ("Cars", "Kitties")
  config.adarank.ta.initial_rank_ratio = 1.5
  config.adarank.num_steps = 0
  config.adarank.batch_size_per_task = -2
  config.model.pretrained = str(tmp_path / "absent.pt")
  config.model.finetuned = str(tmp_path / "{task}.pt")
  with pytest.raises(validate.ConfigError) as e:
    validate.validate(config, export="hf")
  msg = str(e.value)
  for needle in (
    "unknown task(s) ['Kitties']",
    "adarank.ta.initial_rank_ratio=1.5",
    "adarank.num_steps=0",
    "adarank.batch_size_per_task=-2",
    "absent.pt does not exist",
    "2 fine-tuned checkpoint(s) missing",
    "Cars.pt",
    "export='hf'",
  ):
    assert needle in msg, needle


def test_an_evaluation_interval_longer_than_the_training_says_so(tmp_path):
  config = _get("vitb32_t8", "quick=true")
  config.adarank.num_steps, config.adarank.log_every, config.adarank.eval_every = 4, 2, 10
  with pytest.raises(validate.ConfigError) as e:
    validate.validate(config, export="safetensors")
  msg = str(e.value)
  assert "adarank.eval_every=10 is larger than adarank.num_steps=4" in msg
  assert "set adarank.eval_every to at most 4, a multiple of adarank.log_every=2" in msg
  assert "expected a multiple" not in msg
  config.adarank.eval_every = 3  # inside the training, off the logging points: the old message
  with pytest.raises(validate.ConfigError, match="expected a multiple of adarank.log_every=2"):
    validate.validate(config, export="safetensors")
  config.adarank.layout = "fastest"
  with pytest.raises(validate.ConfigError, match="adarank.layout='fastest': expected one of"):
    validate.validate(config, export="safetensors")


def test_validate_accepts_existing_paths(tmp_path):
  config = _get("vitb32_t8")
  (tmp_path / "pre.pt").write_bytes(b"")
  for task in config.tasks:
    (tmp_path / f"{task}.pt").write_bytes(b"")
  config.model.pretrained = str(tmp_path / "pre.pt")
  config.model.finetuned = str(tmp_path / "{task}.pt")
  validate.validate(config, export="safetensors")


def test_workdir_with_other_config(tmp_path):
  config = _get("vitb32_t8")
  assert not validate.check_workdir(config, tmp_path, resume=False, overwrite=False)
  with pytest.raises(validate.ConfigError, match="holds no run to resume"):
    validate.check_workdir(config, tmp_path, resume=True, overwrite=False)
  (tmp_path / "config.json").write_text(config.to_json())
  assert validate.check_workdir(config, tmp_path, resume=False, overwrite=False)
  longer = _get("vitb32_t8")
  longer.adarank.num_steps = 20_000  # resumable: train longer
  longer.export = "safetensors"  # and write the merged models at the end
  assert validate.check_workdir(longer, tmp_path, resume=True, overwrite=False)
  other = _get("vitb32_t8", "base=cart")
  with pytest.raises(validate.ConfigError, match=r"different config .*methods"):
    validate.check_workdir(other, tmp_path, resume=False, overwrite=False)
  assert not validate.check_workdir(other, tmp_path, resume=False, overwrite=True)


def test_demo_config_is_plain_values_with_a_selection_argument():
  import subprocess
  import sys

  # Loading a config imports no library module (configs are data).
  code = (
    "import sys; import importlib; importlib.import_module('configs.demo').get_config('selection=validation');"
    "print(sorted(m for m in sys.modules if m.startswith('adarank_jax')))"
  )
  root = Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
  assert out.stdout.strip() == "[]"
  config = _get("demo", "selection=validation")
  assert config.adarank.selection == "validation" and config.name == "digits_demo_validation"
  assert config.testbed.name == "digits" and not config.model.pretrained and not config.model.finetuned
  assert tuple(config.tasks) == common.DIGITS_8
  validate.validate(config, paths=True)  # the testbed provides the checkpoints: no path to check


@pytest.mark.parametrize("name", ["qwen2_generative", "llama_generative", "mistral_generative"])
def test_generative_configs_are_plain_values_and_their_mistakes_are_named(name):
  config = _get(name, "base=cart")
  assert config.task_type == "generative" and config.architecture == "decoder"
  assert config.merge.unmerged == common.UNMERGED["causal_lm"] and config.methods == (
    "individual",
    "adarank_cart",
  )
  assert config.model.pretrained == config.data.prompts == config.data.eval_prompts == ""  # no machine paths
  json.loads(config.to_json())
  config.tasks = ("code", "math")  # any names: generative tasks are not in the registry
  validate.validate(config, paths=False)
  config.tasks, config.adarank.selection, config.architecture = ("a/b",), "oracle", "gpt2"
  config.data.prompts = "prompts.jsonl"
  with pytest.raises(validate.ConfigError) as error:
    validate.validate(config)
  for message in (
    "expected architecture='decoder'",
    "adarank.selection='oracle': generative tasks have no labelled splits",
    "tasks: ['a/b'] cannot name generative tasks",
    "data.prompts='prompts.jsonl': expected a path with {task}",
  ):
    assert message in str(error.value)
