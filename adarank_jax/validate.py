"""Checks a config and its workdir before any compute; every problem is listed in one error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_collections

from adarank_jax import baselines, files, methods, report
from adarank_jax import layout as layout_lib
from adarank_jax import train as train_lib
from adarank_jax.data import registry

ARCHITECTURES = ("clip", "roberta", "gpt2")
EXPORTS = {"clip": ("safetensors", "pt"), "roberta": ("hf",), "gpt2": ("hf",)}
# Fields that may change when a run is resumed (they do not change what was computed so far).
RESUMABLE = (
  "adarank.num_steps",
  "adamerging.num_steps",
  "adarank.log_every",
  "adarank.checkpoint_every",
  "adarank.eval_every",
  "adarank.layout",
  "adarank.cache_deltas",
  "adarank.tasks_per_forward",
  "adarank.remat",
  "data.workers",
  "export",
)


class ConfigError(ValueError):
  """The config, its paths or its workdir can't be run."""


def finetuned_path(template: str, task: str) -> Path:
  return Path(template.replace("{task}", task))


def validate(config: ml_collections.ConfigDict, *, export: str = "", paths: bool = True) -> None:
  """Raises ConfigError listing every problem of `config` (and of `export`: --export, else config.export).

  `paths=False` checks the values only. With `testbed.name` set the checkpoints come from the testbed the
  run builds, so model.pretrained / model.finetuned must be empty and no path is checked.
  """
  problems = []

  def need(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  # Every float field: finite (NaN passes every `x > 0` test as False... and Inf passes it as True).
  for key, value in _flat_items(config):
    if isinstance(value, float):
      need(math.isfinite(value), f"{key}={value!r}: expected a finite number")
  need(
    config.testbed.name in ("", "digits"), f"testbed.name={config.testbed.name!r}: expected '' or 'digits'"
  )
  need(
    config.architecture in ARCHITECTURES,
    f"architecture={config.architecture!r}: expected one of {ARCHITECTURES}",
  )
  tasks = tuple(config.tasks)
  need(len(tasks) > 0, "tasks: empty")
  need(len(set(tasks)) == len(tasks), f"tasks: duplicates in {tasks}")
  unknown = [t for t in tasks if t not in registry.names()]
  need(not unknown, f"tasks: unknown task(s) {unknown}; known: {', '.join(registry.names())}")
  bad_methods = [m for m in config.methods if m not in methods.METHODS]
  need(not bad_methods, f"methods: unknown {bad_methods}; choose from {tuple(methods.METHODS)}")
  need(len(config.methods) > 0, "methods: empty")

  for base in ("ta", "cart", "tsv_m", "iso_cts"):
    hp = config.adarank[base]
    need(
      0 < hp.initial_rank_ratio <= 1,
      f"adarank.{base}.initial_rank_ratio={hp.initial_rank_ratio}: expected a value in (0, 1]",
    )
    need(hp.learning_rate > 0, f"adarank.{base}.learning_rate={hp.learning_rate}: expected > 0")
    need(_is_number(hp.prior), f"adarank.{base}.prior={hp.prior!r}: expected a number")
  need(
    config.adamerging.learning_rate > 0,
    f"adamerging.learning_rate={config.adamerging.learning_rate}: expected > 0",
  )
  need(
    _is_number(config.adamerging.prior), f"adamerging.prior={config.adamerging.prior!r}: expected a number"
  )
  for section, key in [
    ("adarank", k)
    for k in ("num_steps", "batch_size_per_task", "eval_every", "log_every", "checkpoint_every")
  ] + [("adamerging", "num_steps")]:
    value = config[section][key]
    need(isinstance(value, int) and value > 0, f"{section}.{key}={value!r}: expected a positive integer")
  need(
    isinstance(config.data.workers, int) and config.data.workers > 0,
    f"data.workers={config.data.workers!r}: expected a positive integer",
  )
  need(
    isinstance(config.data.processes, int) and config.data.processes >= 0,
    f"data.processes={config.data.processes!r}: expected an integer >= 0 (0: no worker processes)",
  )
  need(
    config.adarank.learn in train_lib.LEARN,
    f"adarank.learn={config.adarank.learn!r}: expected one of {train_lib.LEARN}",
  )
  need(
    config.adarank.layout in layout_lib.MODES,
    f"adarank.layout={config.adarank.layout!r}: expected one of {layout_lib.MODES}",
  )
  tasks_per_forward = config.adarank.tasks_per_forward
  need(
    isinstance(tasks_per_forward, int)
    and tasks_per_forward >= 0
    and (tasks_per_forward == 0 or len(tasks) % tasks_per_forward == 0),
    f"adarank.tasks_per_forward={tasks_per_forward!r}: expected 0 (all tasks at once) or a divisor "
    f"of the {len(tasks)} tasks",
  )
  need(
    0 < config.adarank.data_fraction <= 1,
    f"adarank.data_fraction={config.adarank.data_fraction}: expected a value in (0, 1]",
  )
  need(
    config.adarank.eval_every <= config.adarank.num_steps,
    f"adarank.eval_every={config.adarank.eval_every} is larger than adarank.num_steps="
    f"{config.adarank.num_steps}: no evaluation point would fall inside the training; set "
    f"adarank.eval_every to at most {config.adarank.num_steps}, a multiple of adarank.log_every="
    f"{config.adarank.log_every}",
  )
  need(
    config.adarank.eval_every > config.adarank.num_steps
    or config.adarank.eval_every % config.adarank.log_every == 0,
    f"adarank.eval_every={config.adarank.eval_every}: expected a multiple of adarank.log_every="
    f"{config.adarank.log_every} (evaluation runs at logging points)",
  )
  need(
    config.adarank.mask_temperature > 0,
    f"adarank.mask_temperature={config.adarank.mask_temperature}: expected > 0",
  )
  need(config.adarank.rank >= 0, f"adarank.rank={config.adarank.rank}: expected >= 0 (0 = full rank)")
  need(
    config.adarank.selection in report.SELECTION_OF,
    f"adarank.selection={config.adarank.selection!r}: expected one of {tuple(report.SELECTION_OF)}",
  )
  need(
    config.adarank.factor_dtype in ("float32", "bfloat16"),
    f"adarank.factor_dtype={config.adarank.factor_dtype!r}: expected 'float32' or 'bfloat16'",
  )
  need(
    config.model.dtype in ("float32", "bfloat16"),
    f"model.dtype={config.model.dtype!r}: expected 'float32' or 'bfloat16'",
  )
  merge = config.merge
  for key, value in (("cart.rank_ratio", merge.cart.rank_ratio), ("ties.density", merge.ties.density)):
    need(0 < value <= 1, f"merge.{key}={value}: expected a value in (0, 1]")
  need(
    0 <= merge.iso_cts.common_fraction <= 1,
    f"merge.iso_cts.common_fraction={merge.iso_cts.common_fraction}: expected a value in [0, 1]",
  )
  need(
    merge.ties.merge in baselines.TIES_MERGES,
    f"merge.ties.merge={merge.ties.merge!r}: expected one of {tuple(baselines.TIES_MERGES)}",
  )
  for name in ("tsv_m", "iso_c", "iso_cts"):
    need(
      merge[name].matrices in baselines.MATRIX_RULES,
      f"merge.{name}.matrices={merge[name].matrices!r}: expected one of {baselines.MATRIX_RULES}",
    )
  need(
    merge.iso_cts.side in ("in", "out"), f"merge.iso_cts.side={merge.iso_cts.side!r}: expected 'in' or 'out'"
  )
  need(config.eval.batch_size > 0, f"eval.batch_size={config.eval.batch_size}: expected > 0")
  need(config.eval.max_examples >= 0, f"eval.max_examples={config.eval.max_examples}: expected >= 0")
  need(
    config.mesh.factor_placement in train_lib.FACTOR_PLACEMENTS,
    f"mesh.factor_placement={config.mesh.factor_placement!r}: expected one of {train_lib.FACTOR_PLACEMENTS}",
  )
  if export:
    allowed = EXPORTS.get(config.architecture, ())
    need(
      export in allowed,
      f"export={export!r}: for architecture {config.architecture!r} expected one of {allowed}",
    )

  if config.testbed.name:
    set_paths = [f"model.{k}={config.model[k]!r}" for k in ("pretrained", "finetuned") if config.model[k]]
    need(
      not set_paths,
      f"testbed.name={config.testbed.name!r} provides the checkpoints, but "
      f"{', '.join(set_paths)} is set too; clear one of them",
    )
  if not paths or config.testbed.name:
    _raise(problems)
    return
  # Paths: every missing file at once.
  need(bool(config.model.pretrained), "model.pretrained: empty; set --config.model.pretrained=PATH")
  if config.model.pretrained:
    need(
      Path(config.model.pretrained).exists(), f"model.pretrained: {config.model.pretrained} does not exist"
    )
  # Fine-tuned checkpoints are needed by every method but zero-shot CLIP (LM heads come from them).
  if config.architecture != "clip" or any(m != "zero_shot" for m in config.methods):
    template = config.model.finetuned
    need(
      "{task}" in template,
      f"model.finetuned={template!r}: expected a path with {{task}} in it, e.g. 'ckpts/{{task}}.pt'",
    )
    if "{task}" in template:
      missing = [str(finetuned_path(template, t)) for t in tasks if not finetuned_path(template, t).exists()]
      need(
        not missing,
        f"model.finetuned: {len(missing)} fine-tuned checkpoint(s) missing: " + ", ".join(missing),
      )
  _raise(problems)


def _raise(problems: list[str]) -> None:
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flat_items(node, prefix=""):
  """(dotted key, value) of every leaf of a ConfigDict; tuples and lists are walked too (key[i])."""
  for key, value in node.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _flat_items(value, f"{prefix}{key}.")
    elif isinstance(value, (tuple, list)):
      for i, item in enumerate(value):
        yield f"{prefix}{key}[{i}]", item
    else:
      yield f"{prefix}{key}", value


def _flat_config(config: ml_collections.ConfigDict) -> dict:
  def walk(node, prefix=""):
    out = {}
    for key, value in node.items():
      if isinstance(value, dict):
        out.update(walk(value, f"{prefix}{key}."))
      else:
        out[f"{prefix}{key}"] = value
    return out

  return walk(json.loads(config.to_json()))


def check_workdir(config: ml_collections.ConfigDict, workdir: Path, *, resume: bool, overwrite: bool) -> bool:
  """Decides what to do with an existing workdir; returns True when a previous run is continued.

  A workdir holding a run of a different config is an error unless `overwrite` (then the caller wipes
  it). The same config continues where it stopped; `resume` demands that there is a run to continue.
  """
  saved = workdir / "config.json"
  if overwrite or not saved.exists():
    if resume and not overwrite:
      raise ConfigError(f"--resume: {workdir} holds no run to resume (no config.json)")
    return False
  try:
    old = _flat_config(ml_collections.ConfigDict(files.read_json(saved)))
  except (ValueError, TypeError) as error:
    raise ConfigError(
      f"{saved}: cannot read the saved config of the run in {workdir} ({error}); pass "
      f"--overwrite to start over there"
    ) from error
  new = _flat_config(config)
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE)
  if changed:
    details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:10])
    raise ConfigError(
      f"{workdir} holds a run with a different config ({details}). Pass --overwrite to start "
      f"over there, or choose another --workdir."
    )
  return True
