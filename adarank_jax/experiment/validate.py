"""Checks a config and its workdir before any compute; every problem is listed in one error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_collections

from adarank_jax.core import baselines
from adarank_jax.core import layout as layout_lib
from adarank_jax.core import train as train_lib
from adarank_jax.data import registry
from adarank_jax.experiment import methods, report
from adarank_jax.interop import hf_config, peft
from adarank_jax.storage import files

ARCHITECTURES = ("clip", "roberta", "gpt2", "decoder")
TASK_TYPES = ("classification", "generative")
EXPORTS = {"clip": ("safetensors", "pt"), "roberta": ("hf",), "gpt2": ("hf",), "decoder": ("hf",)}
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
  run builds, so model.pretrained / model.finetuned must be empty and no path is checked. The checks,
  one per concern, each a list of (ok, message): the message is reported where ok is False.
  """
  checks = [
    _finite_numbers(config),
    _names(config),
    _optimisation(config),
    _adarank_fields(config),
    _model_and_merge_fields(config),
    _evaluation_and_mesh(config, export),
    _testbed(config),
    _generative(config),
  ]
  if paths and not config.testbed.name:
    checks.append(_paths(config))
  _raise([message for check in checks for ok, message in check if not ok])


Checks = list[tuple[bool, str]]


def _finite_numbers(config) -> Checks:
  """Every float field finite (NaN passes every `x > 0` test as False... and Inf passes it as True)."""
  return [
    (math.isfinite(value), f"{key}={value!r}: expected a finite number")
    for key, value in _flat_items(config)
    if isinstance(value, float)
  ]


def _names(config) -> Checks:
  """The testbed, the architecture, the tasks and the methods are known ones."""
  tasks = tuple(config.tasks)
  # generative tasks are named by the config alone: their data are the prompt files
  registered = config.task_type != "generative"
  unknown = [t for t in tasks if t not in registry.names()] if registered else []
  bad_methods = [m for m in config.methods if m not in methods.METHODS]
  return [
    (config.testbed.name in ("", "digits"), f"testbed.name={config.testbed.name!r}: expected '' or 'digits'"),
    (
      config.architecture in ARCHITECTURES,
      f"architecture={config.architecture!r}: expected one of {ARCHITECTURES}",
    ),
    (len(tasks) > 0, "tasks: empty"),
    (len(set(tasks)) == len(tasks), f"tasks: duplicates in {tasks}"),
    (not unknown, f"tasks: unknown task(s) {unknown}; known: {', '.join(registry.names())}"),
    (not bad_methods, f"methods: unknown {bad_methods}; choose from {tuple(methods.METHODS)}"),
    (len(config.methods) > 0, "methods: empty"),
  ]


def _optimisation(config) -> Checks:
  """Per-base and AdaMerging learning rates, priors and rank ratios; the step counts and intervals."""
  checks = []
  for base in ("ta", "cart", "tsv_m", "iso_cts"):
    hp = config.adarank[base]
    checks += [
      (
        0 < hp.initial_rank_ratio <= 1,
        f"adarank.{base}.initial_rank_ratio={hp.initial_rank_ratio}: expected a value in (0, 1]",
      ),
      (hp.learning_rate > 0, f"adarank.{base}.learning_rate={hp.learning_rate}: expected > 0"),
      (_is_number(hp.prior), f"adarank.{base}.prior={hp.prior!r}: expected a number"),
    ]
  adamerging = config.adamerging
  checks += [
    (adamerging.learning_rate > 0, f"adamerging.learning_rate={adamerging.learning_rate}: expected > 0"),
    (_is_number(adamerging.prior), f"adamerging.prior={adamerging.prior!r}: expected a number"),
  ]
  counts = [
    ("adarank", k)
    for k in ("num_steps", "batch_size_per_task", "eval_every", "log_every", "checkpoint_every")
  ]
  for section, key in counts + [("adamerging", "num_steps")]:
    value = config[section][key]
    checks.append(
      (isinstance(value, int) and value > 0, f"{section}.{key}={value!r}: expected a positive integer")
    )
  return checks


def _adarank_fields(config) -> Checks:
  """The data workers, what AdaRank learns, the step's layout, the data fraction, the evaluation
  interval against the steps and the logging interval, the temperature, rank, selection and dtype."""
  adarank, data, tasks = config.adarank, config.data, tuple(config.tasks)
  per_forward = adarank.tasks_per_forward
  return [
    (
      isinstance(data.workers, int) and data.workers > 0,
      f"data.workers={data.workers!r}: expected a positive integer",
    ),
    (
      isinstance(data.processes, int) and data.processes >= 0,
      f"data.processes={data.processes!r}: expected an integer >= 0 (0: no worker processes)",
    ),
    (adarank.learn in train_lib.LEARN, f"adarank.learn={adarank.learn!r}: expected one of {train_lib.LEARN}"),
    (
      adarank.layout in layout_lib.MODES,
      f"adarank.layout={adarank.layout!r}: expected one of {layout_lib.MODES}",
    ),
    (
      isinstance(per_forward, int)
      and per_forward >= 0
      and (per_forward == 0 or len(tasks) % per_forward == 0),
      f"adarank.tasks_per_forward={per_forward!r}: expected 0 (all tasks at once) or a divisor "
      f"of the {len(tasks)} tasks",
    ),
    (
      0 < adarank.data_fraction <= 1,
      f"adarank.data_fraction={adarank.data_fraction}: expected a value in (0, 1]",
    ),
    (
      adarank.eval_every <= adarank.num_steps,
      f"adarank.eval_every={adarank.eval_every} is larger than adarank.num_steps="
      f"{adarank.num_steps}: no evaluation point would fall inside the training; set "
      f"adarank.eval_every to at most {adarank.num_steps}, a multiple of adarank.log_every="
      f"{adarank.log_every}",
    ),
    (
      adarank.eval_every > adarank.num_steps or adarank.eval_every % adarank.log_every == 0,
      f"adarank.eval_every={adarank.eval_every}: expected a multiple of adarank.log_every="
      f"{adarank.log_every} (evaluation runs at logging points)",
    ),
    (adarank.mask_temperature > 0, f"adarank.mask_temperature={adarank.mask_temperature}: expected > 0"),
    (adarank.rank >= 0, f"adarank.rank={adarank.rank}: expected >= 0 (0 = full rank)"),
    (
      adarank.selection in report.SELECTION_OF,
      f"adarank.selection={adarank.selection!r}: expected one of {tuple(report.SELECTION_OF)}",
    ),
    (
      adarank.factor_dtype in ("float32", "bfloat16"),
      f"adarank.factor_dtype={adarank.factor_dtype!r}: expected 'float32' or 'bfloat16'",
    ),
  ]


def _model_and_merge_fields(config) -> Checks:
  """The model's dtype and the static merges' hyperparameters."""
  merge = config.merge
  checks = [
    (
      config.model.dtype in ("float32", "bfloat16"),
      f"model.dtype={config.model.dtype!r}: expected 'float32' or 'bfloat16'",
    )
  ]
  for key, value in (("cart.rank_ratio", merge.cart.rank_ratio), ("ties.density", merge.ties.density)):
    checks.append((0 < value <= 1, f"merge.{key}={value}: expected a value in (0, 1]"))
  checks += [
    (
      0 <= merge.iso_cts.common_fraction <= 1,
      f"merge.iso_cts.common_fraction={merge.iso_cts.common_fraction}: expected a value in [0, 1]",
    ),
    (
      merge.ties.merge in baselines.TIES_MERGES,
      f"merge.ties.merge={merge.ties.merge!r}: expected one of {tuple(baselines.TIES_MERGES)}",
    ),
  ]
  for name in ("tsv_m", "iso_c", "iso_cts"):
    checks.append(
      (
        merge[name].matrices in baselines.MATRIX_RULES,
        f"merge.{name}.matrices={merge[name].matrices!r}: expected one of {baselines.MATRIX_RULES}",
      )
    )
  checks.append(
    (
      merge.iso_cts.side in ("in", "out"),
      f"merge.iso_cts.side={merge.iso_cts.side!r}: expected 'in' or 'out'",
    )
  )
  return checks


def _evaluation_and_mesh(config, export: str) -> Checks:
  """The evaluation batch and cap, the factors' placement, and the export format of the architecture."""
  placements = train_lib.FACTOR_PLACEMENTS
  checks = [
    (config.eval.batch_size > 0, f"eval.batch_size={config.eval.batch_size}: expected > 0"),
    (config.eval.max_examples >= 0, f"eval.max_examples={config.eval.max_examples}: expected >= 0"),
    (
      config.mesh.factor_placement in placements,
      f"mesh.factor_placement={config.mesh.factor_placement!r}: expected one of {placements}",
    ),
  ]
  if export:
    allowed = EXPORTS.get(config.architecture, ())
    checks.append(
      (
        export in allowed,
        f"export={export!r}: for architecture {config.architecture!r} expected one of {allowed}",
      )
    )
  return checks


def _generative(config) -> Checks:
  """The task type; generative merging's model family, selection, task names and prompt fields."""
  if config.task_type not in TASK_TYPES:
    return [(False, f"task_type={config.task_type!r}: expected one of {TASK_TYPES}")]
  if config.task_type != "generative":
    return []
  bad_names = [t for t in config.tasks if not isinstance(t, str) or not t or "/" in t or t != t.strip()]
  return [
    (
      config.architecture == "decoder",
      f"task_type='generative' merges Llama, Mistral or Qwen2 causal LMs: expected architecture="
      f"'decoder', got {config.architecture!r}",
    ),
    (
      config.adarank.selection == "final",
      f"adarank.selection={config.adarank.selection!r}: generative tasks have no labelled splits to "
      "select on; expected 'final'",
    ),
    (not bad_names, f"tasks: {bad_names} cannot name generative tasks (non-empty, no '/', no spaces around)"),
    (bool(config.data.prompt_field), "data.prompt_field: empty; expected the .jsonl field of the prompts"),
    (
      config.data.max_length >= 2,
      f"data.max_length={config.data.max_length}: a next token needs prompts of at least 2 tokens",
    ),
  ]


def _testbed(config) -> Checks:
  """A testbed provides the checkpoints: no model path may be set beside it."""
  if not config.testbed.name:
    return []
  set_paths = [f"model.{k}={config.model[k]!r}" for k in ("pretrained", "finetuned") if config.model[k]]
  return [
    (
      not set_paths,
      f"testbed.name={config.testbed.name!r} provides the checkpoints, but "
      f"{', '.join(set_paths)} is set too; clear one of them",
    )
  ]


def _paths(config) -> Checks:
  """Every missing checkpoint at once: the pretrained one, and the fine-tuned ones, which every method
  but zero-shot CLIP needs (LM heads come from them)."""
  pretrained = config.model.pretrained
  checks = [(bool(pretrained), "model.pretrained: empty; set --config.model.pretrained=PATH")]
  if pretrained:
    checks.append((Path(pretrained).exists(), f"model.pretrained: {pretrained} does not exist"))
  if config.architecture != "clip" or any(m != "zero_shot" for m in config.methods):
    template = config.model.finetuned
    checks.append(
      (
        "{task}" in template,
        f"model.finetuned={template!r}: expected a path with {{task}} in it, e.g. 'ckpts/{{task}}.pt'",
      )
    )
    if "{task}" in template:
      paths = [finetuned_path(template, t) for t in config.tasks]
      missing = [str(p) for p in paths if not p.exists()]
      checks.append(
        (
          not missing,
          f"model.finetuned: {len(missing)} fine-tuned checkpoint(s) missing: " + ", ".join(missing),
        )
      )
      if not missing:
        checks += _adapters(config, paths)
  if config.task_type == "generative":
    checks += _prompt_paths(config)
  return checks


def _adapters(config, paths: list[Path]) -> Checks:
  """PEFT LoRA adapter directories among the fine-tuned inputs (an adapter_config.json): generative
  merging only, every task's or none, each adapter_config.json one `peft.read` supports and its
  adapter_model.safetensors present, and every key and shape `peft.read` checks against the pretrained
  model's config.json (the loader checks them again, before any pretrained tensor is read)."""
  adapters = [p for p in paths if peft.is_adapter_dir(p)]
  if not adapters:
    return []
  problems = []
  for path in adapters:
    try:
      peft.read_config(path)
    except ValueError as error:
      problems.append(str(error))
    if not (path / peft.ADAPTER_WEIGHTS).is_file():
      problems.append(f"{path / peft.ADAPTER_WEIGHTS}: missing (the adapter's weights)")
  if config.task_type != "generative":
    return [
      (
        False,
        f"model.finetuned: {', '.join(map(str, adapters))} are PEFT adapter directories; "
        f"{config.architecture} {config.task_type} merging needs each task's full fine-tuned model "
        "(its classification head included): merge each adapter into its model (PEFT's "
        "merge_and_unload, then save_pretrained) and give those directories; adapters are read by "
        "task_type='generative' configs" + "".join(f"\n    {p}" for p in problems),
      )
    ]
  full = [str(p) for p in paths if p not in adapters]
  base = Path(config.model.pretrained) / "config.json"
  if not problems and base.is_file():  # every key and shape, against the pretrained model's config.json
    try:
      model = hf_config.model_config(json.loads(base.read_text()), source=str(base))
    except ValueError:
      model = None  # the loader names the problem of the pretrained model itself
    for path in adapters if model is not None else ():
      try:
        peft.read(path, model)
      except ValueError as error:
        problems.append(str(error))
  return [
    (
      not full,
      f"model.finetuned: {len(adapters)} PEFT adapter directories and {len(full)} full models "
      f"({', '.join(full)}); give every task an adapter or every task a full model",
    ),
    *((False, f"model.finetuned: {problem}") for problem in problems),
  ]


def _prompt_paths(config) -> Checks:
  """Generative tasks: every task's prompt files exist (what they hold is checked when they are read,
  before any checkpoint is loaded)."""
  checks = []
  for key in ("prompts", "eval_prompts"):
    template = config.data[key]
    if key == "eval_prompts" and not template:
      continue  # evaluated on data.prompts
    example = f"'prompts/{{task}}{'_heldout' if key == 'eval_prompts' else ''}.jsonl'"
    if "{task}" not in template:
      checks.append((False, f"data.{key}={template!r}: expected a path with {{task}} in it, e.g. {example}"))
      continue
    missing = [str(p) for p in (finetuned_path(template, t) for t in config.tasks) if not p.is_file()]
    checks.append((not missing, f"data.{key}: {len(missing)} prompt file(s) missing: " + ", ".join(missing)))
  return checks


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
