"""The whole experiment as a readable sequence of named steps:

  mesh -> workdir -> data sets -> models (setup) -> evaluator -> per method, in order:
    inputs (derived and released, `_Inputs`) -> merge or adapt (`_adapt`) -> evaluate -> export
  -> reports

Reads the ConfigDict (only this package and main.py do) and calls the library with explicit arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adarank_jax.core import (
  decomposition,
  evaluate,
  lora,
  masking,
  merging,
  objectives,
  task_vectors,
  train,
  tree_util,
)
from adarank_jax.core import layout as layout_lib
from adarank_jax.data import pipeline, prompts, registry
from adarank_jax.data.task import DatasetMismatchError, DatasetNotFoundError
from adarank_jax.experiment import loading, loop, methods, plan, report, validate
from adarank_jax.storage import checkpoint, files


def run(
  config: ml_collections.ConfigDict, workdir: Path, *, continued: bool, overwrite: bool, export: str
) -> dict[str, Any]:
  """Runs `config.methods` in order; writes results.json, results.md, rank heatmaps and exports."""
  mesh = _mesh(config)
  _check_memory(config, mesh)
  outputs = _prepare_workdir(config, workdir, overwrite=overwrite)
  sources, eval_sources, validation_sources = _open_data_sets(config)
  timings: dict[str, float] = {}
  setup, model_label = _setup(config, Path(config.cache_dir or workdir / "cache"), sources, timings)
  if not continued:
    files.write_atomic(outputs / "config.json", config.to_json(indent=2) + "\n")
  writer = report.MetricWriter(outputs)
  data = _Data(config, setup, mesh)
  evaluate_params = _Evaluator(config, data, setup, mesh, eval_sources)
  inputs = _Inputs(config, setup, timings)
  setup = dataclasses.replace(setup, finetuned=())  # `inputs` is their only holder from here on
  programs = _Programs(config, setup, mesh)
  results = report.new_results(
    name=config.name,
    tasks=tuple(config.tasks),
    model=model_label,
    steps={m: _num_steps(config, methods.get(m).training) for m in config.methods if methods.get(m).trains},
    selection=report.SELECTION_OF[config.adarank.selection],
    metric=report.PERPLEXITY if config.task_type == "generative" else report.SCORE,
  )
  for index, method in enumerate(config.methods):
    begin = time.perf_counter()
    print(f"[{method}]")
    scores = _run_method(
      config,
      index,
      inputs=inputs,
      results=results,
      adapt=functools.partial(
        _adapt,
        config,
        outputs / method,
        shared=workdir / method,
        writer=writer,
        evaluate_params=evaluate_params,
        validation_sources=validation_sources,
        data=data,
        sources=sources,
        mesh=mesh,
        programs=programs,
        tower_layouts=setup.tower_layouts,
      ),
      evaluate_params=evaluate_params,
      export=(lambda params, name: setup.export(params, workdir / "export" / name)) if export else None,
      export_format=export,
      writer=writer,
    )
    timings[f"{method}_s"] = time.perf_counter() - begin
    writer.scalars(0, {f"{method}/{k}": v for k, v in scores.items()})
  results["timings_s"] = timings
  _write_reports(config, outputs, results, writer, export=export)
  return results


def _mesh(config) -> Mesh:
  """One mesh for the run: every task's batch is split over 'data'; with factor_placement="task" the
  factor stacks are split over a 'task' axis of gcd(devices, tasks) devices; with "fsdp" the origin
  and the factor stacks over a 'model' axis of mesh.model_devices devices (0: all), over which the
  batches are split too."""
  task_axis = model_axis = 1
  if config.mesh.factor_placement == "task":
    task_axis = math.gcd(jax.device_count(), len(config.tasks))
  if config.mesh.factor_placement == "fsdp":
    model_axis = config.mesh.model_devices or jax.device_count()
    if model_axis < 1 or jax.device_count() % model_axis:
      raise validate.ConfigError(
        f"mesh.model_devices={config.mesh.model_devices}: expected 0 (all) or a divisor of the "
        f"{jax.device_count()} devices"
      )
  mesh = train.make_mesh(task=task_axis, model=model_axis)
  parts = train.batch_devices(mesh)
  for key in ("adarank.batch_size_per_task", "eval.batch_size"):
    section, field = key.split(".")
    if config[section][field] % parts:
      raise validate.ConfigError(
        f"{key}={config[section][field]}: expected a multiple of the {parts} devices every batch is "
        f"split over (mesh {dict(mesh.shape)}) so every batch splits evenly"
      )
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
  if jax.process_count() > 1:
    shard = pipeline.batch_shard(mesh, config.adarank.batch_size_per_task)
    print(
      f"process {jax.process_index()} of {jax.process_count()} reads part {shard.index + 1} of "
      f"{shard.count} of every batch"
    )
  return mesh


def _check_memory(config, mesh: Mesh) -> None:
  """A decoder classifier run whose training step's inputs would not fit its devices stops here, before
  anything is loaded, with the plan and the option that fits (`plan.check`). Devices of one host
  that share its memory (CPU) each get their share of it."""
  if (
    config.architecture != "decoder"
    or config.task_type != "classification"
    or not any((m := methods.get(name)).training is not None and m.training.masks for name in config.methods)
  ):
    return
  free = plan.device_memory()
  if free is not None:
    plan.check(config, devices=mesh.devices.size, device_memory=free)


def _prepare_workdir(config, workdir: Path, *, overwrite: bool) -> Path:
  """This process's output folder, the workdir cleared first with --overwrite.

  Nothing but the cache is written before the models loaded: a run that fails to load leaves no
  config.json behind, so the corrected rerun is not refused as "a different config". A run of
  several processes (one per host) shares the workdir: every process computes the same results;
  process 0 writes its reports to the workdir, every other process i its own copy under
  workdir/processes/i. The trained methods' checkpoints are written by all processes together;
  their masks, candidate models and the exports by process 0 alone, in the workdir."""
  primary = jax.process_index() == 0
  outputs = workdir if primary else workdir / "processes" / str(jax.process_index())
  if overwrite and primary:
    files.clear_dir(workdir)  # keeps main.py's lock file
  _barrier("workdir ready")
  outputs.mkdir(parents=True, exist_ok=True)
  print(f"workdir {workdir}; {len(config.tasks)} tasks; methods: {', '.join(config.methods)}")
  return outputs


def _open_data_sets(config) -> tuple[list[Any], list[Any], list[Any]]:
  """Every task's adaptation split, its evaluation split (the same one, as in the paper: a task's
  test split) and its validation split for selection=validation (Task.validation_split in
  adarank_jax/data/task.py), opened before any checkpoint is loaded: all missing ones in one error.
  Generative tasks: their prompt files instead (`_open_prompt_files`)."""
  if config.task_type == "generative":
    return _open_prompt_files(config)
  sources, validation_sources, missing = [], [], []
  for t in config.tasks:
    task = registry.get(t)
    splits = [(sources, task.split)]
    if config.adarank.selection == "validation":
      if not task.validation_split:
        missing.append(f"Task {t}: no validation split is registered; selection=validation needs one")
        continue
      splits.append((validation_sources, task.validation_split))
    for out, split in splits:
      try:
        out.append(task.open_source(split, data_dir=config.data.data_dir or None))
      except (DatasetNotFoundError, DatasetMismatchError) as error:
        missing.append(str(error))
  if missing:
    raise validate.ConfigError(
      f"{len(missing)} of {len(config.tasks)} data sets cannot be read:\n  " + "\n  ".join(missing)
    )
  return sources, sources, validation_sources


def _open_prompt_files(config) -> tuple[list[Any], list[Any], list[Any]]:
  """Generative tasks: each task's unlabeled prompts (data.prompts, with {task}) to adapt on and its
  evaluation prompts (data.eval_prompts; '' = the same ones), every file read and checked before any
  checkpoint is loaded: every bad file in one error. No validation splits."""
  opened, problems = {}, []
  templates = [config.data.prompts, config.data.eval_prompts or config.data.prompts]
  for template in templates:
    for task in config.tasks:
      path = validate.finetuned_path(template, task)
      if path not in opened:
        try:
          opened[path] = prompts.open_prompts(path, field=config.data.prompt_field)
        except prompts.PromptFileError as error:
          problems.append(str(error))
  if problems:
    raise validate.ConfigError(
      f"{len(problems)} prompt file(s) cannot be used:\n  " + "\n  ".join(dict.fromkeys(problems))
    )
  adapt, evaluate_on = (
    [opened[validate.finetuned_path(template, t)] for t in config.tasks] for template in templates
  )
  return adapt, evaluate_on, []


def _setup(config, cache_dir: Path, sources, timings: dict[str, float]) -> tuple[loading.Setup, str]:
  """The models of the config (or of the named testbed, built or reused here) as a loading.Setup,
  picked by architecture, and the model's name for the reports; warns about suspicious inputs."""
  model, pretrained, finetuned = config.model.name, config.model.pretrained, config.model.finetuned
  if config.testbed.name == "digits":
    from adarank_jax.digits import testbed  # pylint: disable=g-import-not-at-top (only the demo needs it)

    built = testbed.build(testbed.default_cache_dir(), quick=config.testbed.quick, seed=config.testbed.seed)
    model, pretrained, finetuned = built.model_config, built.pretrained, built.finetuned_template
  label = f"{config.testbed.name} testbed ({Path(model).stem})" if config.testbed.name else config.model.name
  start = time.perf_counter()
  tasks = tuple(config.tasks)
  paths = [str(validate.finetuned_path(finetuned, t)) for t in tasks]
  if config.architecture == "clip":
    setup = loading.load_clip(
      model=model,
      pretrained=pretrained,
      finetuned=paths,
      tasks=tasks,
      dtype=config.model.dtype,
      run_pickled_code=config.model.run_pickled_code,
      cache_dir=cache_dir,
    )
  elif config.task_type == "generative":
    setup = loading.load_causal_lm(
      pretrained=pretrained, finetuned=paths, tasks=tasks, dtype=config.model.dtype
    )
  else:
    setup = loading.load_lm(pretrained=pretrained, finetuned=paths, tasks=tasks, dtype=config.model.dtype)
  timings["load_s"] = time.perf_counter() - start
  _warn_about_inputs(config, setup, paths, sources)
  return setup, label


class _Data:
  """How a task's records become the model's inputs: the modality's preprocessing (`prepare`, for
  grain) and the batch -> model inputs map (`inputs_of`); the mesh's shard of an evaluation batch."""

  def __init__(self, config, setup: loading.Setup, mesh: Mesh):
    if setup.modality == "vision":
      self.prepare = pipeline.vision_preprocessor(image_size=setup.image_size)
    elif setup.modality == "prompts":
      self.prepare = pipeline.prompt_preprocessor(
        tokenizer_dir=config.data.tokenizer or setup.tokenizer, max_length=config.data.max_length
      )
    else:
      self.prepare = pipeline.text_preprocessor(
        tokenizer_dir=config.data.tokenizer or setup.tokenizer, max_length=config.data.max_length
      )
    self.inputs_of = functools.partial(pipeline.model_inputs, modality=setup.modality)
    self.eval_shard = pipeline.batch_shard(mesh, config.eval.batch_size)


class _Evaluator:
  """evaluate_params(params, only=None, on=None) -> {task: score} on every task (or the tasks in
  `only`) of the splits `on` (default: the evaluation splits); `evaluate_params.with_details(...)`
  -> (the same, {task: every metric}).

  Classification: the score is the task's metric (accuracy or Matthews correlation), with no details.
  Generative tasks: the score is the perplexity of the task's evaluation prompts (lower is better),
  the details `evaluate.language_model_scores` (next-token entropy, perplexity, token counts).

  Evaluation is data-parallel like training: the merged model replicated on the mesh, every batch
  split over 'data'; each process reads its part of every batch and counts its rows, and the
  confusion matrices of all processes are summed (a generative task's sums are global already)."""

  def __init__(self, config, data: _Data, setup: loading.Setup, mesh: Mesh, sources):
    self.config, self.data, self.predict, self.mesh, self.sources = config, data, setup.predict, mesh, sources
    self.replicated = NamedSharding(mesh, P())
    self.generative = setup.modality == "prompts"
    if self.generative:
      self.sums = jax.jit(
        lambda params, batch: objectives.next_token_sums(
          setup.logits(params, 0, batch), batch["input_ids"], batch["attention_mask"]
        ),
        out_shardings=self.replicated,
      )

  def _on_mesh(self, x):
    """A leaf replicated on the mesh: a hard merge's output already is; host arrays and arrays on one
    local device (static merges) go there through the host."""
    if isinstance(x, jax.Array) and x.sharding == self.replicated:
      return x
    return jax.device_put(np.asarray(x), self.replicated)

  def _local_logits(self, t, params, batch):
    logits = self.predict(params, t, train.place_batches(self.data.inputs_of(batch), self.mesh))
    return multihost_utils.global_array_to_host_local_array(logits, self.mesh, P("data"))

  def __call__(self, params, only=None, on=None) -> dict[str, float]:
    return self.with_details(params, only, on)[0]

  def with_details(self, params, only=None, on=None) -> tuple[dict[str, float], dict[str, Any]]:
    config, on = self.config, self.sources if on is None else on
    params = jax.tree.map(self._on_mesh, params)
    scores, details = {}, {}
    for t, name in enumerate(config.tasks):
      if only is None or t in only:
        batches = pipeline.eval_batches(
          on[t],
          prepare=self.data.prepare,
          batch_size=config.eval.batch_size,
          max_examples=config.eval.max_examples,
          shard=self.data.eval_shard,
          workers=config.data.workers,
          processes=config.data.processes,
        )
        if self.generative:
          try:
            details[name] = evaluate.language_model_scores(
              lambda inputs: self.sums(params, train.place_batches(self.data.inputs_of(inputs), self.mesh)),
              batches,
            )
          except evaluate.BatchError as error:
            raise evaluate.BatchError(
              f"task {name}, prompts {getattr(on[t], 'path', '')}: {error} (does the tokenizer read "
              f"from {config.data.tokenizer or 'the pretrained directory'} tokenize them?)"
            ) from error
          scores[name] = details[name]["perplexity"]
          continue
        scores[name] = evaluate.evaluate_task(
          functools.partial(self._local_logits, t, params),
          batches,
          metric=registry.get(name).metric,
          combine=_sum_over_processes if jax.process_count() > 1 else None,
        )
    return scores, details


def _sum_over_processes(confusion):
  return np.sum(multihost_utils.process_allgather(confusion), axis=0)


class _Inputs:
  """What the methods are made from (`_input_chain`): the fine-tuned trees -> task vectors -> factors
  -> a static merge's components, each derived from the one before and held only while a later
  method still reads it (`_last_reads`), so a long training run does not keep the fine-tuned trees
  and the task vectors (2 x T models) beside its factors. The origins (theta_0, theta_avg) stay."""

  def __init__(self, config, setup: loading.Setup, timings: dict[str, float]):
    self.config, self.merged, self.timings = config, setup.merged, timings
    self.include = jax.tree.map(lambda x: not x, tree_util.select(setup.merged, config.merge.unmerged))
    adapters = isinstance(setup.finetuned, lora.Adapted)
    self.chains = [_input_chain(config, methods.get(m), adapters=adapters) for m in config.methods]
    self.last_reads = _last_reads(self.chains)
    self.held: dict[Any, Any] = {"finetuned": setup.finetuned}
    self.origins: dict[str, Any] = {}

  def _make(self, key: tuple[Any, ...], source: Any) -> Any:
    """Input `key` of a chain from the one before it (`source`)."""
    config, (kind, origin) = self.config, key[:2]
    if kind == "vectors" and isinstance(source, lora.Adapted):  # a dense matrix per task and kernel
      self.origins[origin], tau = lora.task_vectors(
        self.merged, source.tasks, origin=origin, include=self.include
      )
      return tau
    if kind == "vectors":
      self.origins[origin], tau = task_vectors.task_vectors(
        self.merged, source, origin=origin, include=self.include
      )
      return tau
    if kind in ("factors", "adapter_factors"):
      begin = time.perf_counter()
      tree = self.merged if kind == "adapter_factors" else source
      select = tree_util.select(tree, config.merge.decompose)
      if not any(tree_util.flatten(select).values()):
        raise ValueError(
          f"merge.decompose={tuple(config.merge.decompose)} selects no matrix of the merged "
          f"tree; its paths look like {sorted(tree_util.flatten(tree))[:3]}"
        )
      rank, dtype = key[2], loading.DTYPES[key[3]]
      if kind == "factors":
        factors = decomposition.decompose(source, select, rank=rank, dtype=dtype)
      else:  # exact, from the adapters' factors: never their dense product
        self.origins[origin] = self.merged
        factors = lora.factors(
          self.merged, source.tasks, select=select, include=self.include, rank=rank, dtype=dtype
        )
      factors = jax.block_until_ready(factors)
      self.timings[f"decompose_{origin}_s"] = time.perf_counter() - begin
      return factors
    needs = key[2]  # "components": a static merge's components, with its keywords but `scaling`
    keywords = {k: v for k, v in config.merge[needs].items() if k != "scaling"}
    return jax.jit(functools.partial(methods.COMPONENTS[needs], **keywords))(source)

  def _derive(self, index: int) -> Any:
    """The last input of method `index`'s chain, made from the newest one held; an input no later
    method reads is released as soon as the next one is made from it."""
    chain = self.chains[index]
    start = max(i for i, key in enumerate(chain) if key in self.held)
    for source, key in zip(chain[start:], chain[start + 1 :]):
      self.held[key] = self._make(key, self.held[source])
      if self.last_reads[source] <= index:
        del self.held[source]
    return self.held[chain[-1]]

  def take(self, index: int) -> tuple[Any, ...]:
    """What method `index` is made from (methods.NEEDS): trees, task vectors or factors. Every input
    no later method reads is dropped; the returned tuple is then the only holder of this method's."""
    method = methods.get(self.config.methods[index])
    if method.needs == "pretrained":
      made = (self.merged,)
    elif method.needs == "finetuned":
      made = (self._derive(index),)
    else:
      made = self._derive(index)
      made = (self.origins[methods.ORIGIN_OF[method.needs]], made)
    for key in [key for key in self.held if self.last_reads.get(key, -1) <= index]:
      del self.held[key]
    return made


class _Programs:
  """One compiled training step and one compiled hard merge per kind of training and step layout:
  the learning rate is optimizer state (train.make_optimizer), so AdaRank on TA and on CART share
  them. programs(training, layout) -> (train_step, hard_merge)."""

  def __init__(self, config, setup: loading.Setup, mesh: Mesh):
    self.config, self.setup, self.mesh = config, setup, mesh
    self.compiled: dict[Any, Any] = {}

  def __call__(self, training: methods.Training, step_layout: layout_lib.Layout):
    config, temperature = self.config, self.config.adarank.mask_temperature
    learn = config.adarank.learn if training.masks else "coefficients"
    key = (learn, training.coefficient_range, step_layout)
    if key not in self.compiled:
      self.compiled[key] = (
        train.make_train_step(
          logits_fn=self.setup.train_logits(step_layout),
          optimizer=train.make_optimizer(1e-3),
          temperature=temperature,
          num_tasks=len(config.tasks),
          mesh=self.mesh,
          learn=learn,
          coefficient_range=training.coefficient_range,
          objective=self.setup.objective,
        ),
        jax.jit(  # replicated, so every process holds (and can fetch) the whole merged model
          functools.partial(
            merging.merge,
            temperature=temperature,
            mask_mode="hard",
            coefficient_range=training.coefficient_range,
          ),
          out_shardings=NamedSharding(self.mesh, P()),
        ),
      )
    return self.compiled[key]


def _run_method(
  config, index: int, *, inputs: _Inputs, results, adapt, evaluate_params, export, export_format, writer
) -> dict[str, float]:
  """Method `index` of config.methods: made from its inputs (merged statically, adapted, or, for
  `individual`, each fine-tuned model alone), evaluated, recorded in `results` and exported; returns
  its scores."""
  method = config.methods[index]
  spec = methods.get(method)
  if not spec.trains:  # recomputed from scratch: its earlier records go
    _drop_metrics(writer.jsonl_path, method, config.tasks, after_step=-1)
  made = inputs.take(index)
  if method == "individual":
    results["individual"] = {}
    for t in range(len(config.tasks)):  # made: (the fine-tuned trees,)
      scores, details = evaluate_params.with_details(made[0][t], only={t})
      results["individual"].update(scores)
      _record_details(results, method, details)
    return results["individual"]
  if spec.trains:
    params, results["selected_steps"][method] = adapt(spec, origin=made[0], factors=made[1])
  else:  # a static method: its hyperparameters are its function's keywords (config.merge.<name>)
    hyperparameters = dict(config.merge[method]) if method in config.merge else {}
    params = jax.jit(functools.partial(spec.merge, **hyperparameters))(*made)
  del made  # this method's inputs, before it is evaluated and the next one's are made
  results["methods"][method], details = evaluate_params.with_details(params)
  _record_details(results, method, details)
  if export and jax.process_index() == 0:
    export(params, method if export_format == "hf" else f"{method}.{export_format}")
  return results["methods"][method]


def _record_details(results, method: str, details: dict[str, Any]) -> None:
  """A method's per-task metrics beyond its scores (generative tasks) in results["metrics"]."""
  if details:
    results.setdefault("metrics", {}).setdefault(method, {}).update(details)


def _write_reports(config, outputs: Path, results, writer, *, export: str) -> None:
  """results.json and results.md, the metric writer closed, the table and what was written printed."""
  report.write_results_json(outputs / "results.json", results)
  table = report.markdown_table(results)
  report.write_markdown(outputs / "results.md", results)
  writer.close()
  print(table)
  print(
    f"\nwritten to {outputs}: results.json, results.md"
    + (", export/" if export else "")
    + "".join(
      f", {m}/rank_heatmap.png"
      for m in config.methods
      if methods.get(m).trains and methods.get(m).training.masks
    )
  )


def _warn_about_inputs(config, setup: loading.Setup, paths, sources) -> None:
  """Warnings, before any long compute, for inputs that run but are likely mistakes: a fine-tuned
  checkpoint equal to the pretrained one or an adapter whose lora_B are all zero (PEFT's initialisation:
  a zero task vector), and a batch per task larger than the
  task's split (every batch then repeats examples)."""
  merged = jax.tree.leaves(setup.merged)
  if isinstance(setup.finetuned, lora.Adapted):  # checked on the factors, no tree made
    zero = [not any(np.any(b) for _, b in task.factors.values()) for task in setup.finetuned.tasks]
  else:
    zero = [
      all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree), merged)) for tree in setup.finetuned
    ]
  for task, path, is_zero in zip(config.tasks, paths, zero):
    if is_zero:
      logging.warning(
        "%s: the fine-tuned checkpoint of task %s equals the pretrained one (its task vector is zero)",
        path,
        task,
      )
  batch = config.adarank.batch_size_per_task
  for task, source in zip(config.tasks, sources):
    if batch > len(source):
      logging.warning(
        "task %s: adarank.batch_size_per_task=%d is larger than its split (%d examples): every "
        "batch repeats examples",
        task,
        batch,
        len(source),
      )


# ------------------------------------------------------------------------------------------------
# A trained method: adaptation stream -> step layout -> state (resumed) -> training with evaluation
# points -> the selected state -> masks, heatmap and the hard-merged model.


def _adapt(
  config,
  outdir: Path,
  spec: methods.Method,
  *,
  shared: Path,
  writer,
  origin,
  factors,
  evaluate_params,
  validation_sources,
  data: _Data,
  sources,
  mesh,
  programs: _Programs,
  tower_layouts: bool,
):
  """Learns a trained method's state on the unlabeled test streams; returns the hard-merged tree of
  the reported model (config.adarank.selection) and its step.

  Logs, evaluation records and the rank heatmap go to `outdir` (this process's); the checkpoints,
  candidate models and masks to `shared` (the workdir's, written by process 0 but for checkpoints)."""
  name, training = spec.name, spec.training
  placement = "task" if "task" in mesh.axis_names else "fsdp" if "model" in mesh.axis_names else "replicated"
  frozen = train.place_frozen((origin, factors), mesh, factor_placement=placement)
  init_state = functools.partial(_init_state, config, training, frozen[1], mesh)
  batches = _adaptation_batches(config, sources, data, mesh)
  step_layout = _choose_layout(
    config, shared, frozen, training, batches, mesh, programs, init_state, tower_layouts
  )
  train_step, hard_merge = programs(training, step_layout)
  manager = checkpoint.Manager(shared / "checkpoints")
  state = loop.resume(manager, init_state(step_layout), frozen[1], batches)
  points = _EvaluationPoints(
    config,
    name,
    outdir,
    shared,
    restored=int(jax.device_get(state.step)),
    writer=writer,
    merge=lambda trainable: hard_merge(origin, factors, *trainable),
    evaluate_params=evaluate_params,
    validation_sources=validation_sources,
  )
  state = _train(config, name, frozen, state, train_step, batches, manager, points, writer, mesh=mesh)
  trainable, step = points.reported(jax.device_get((state.mask_logits, state.coefficients)))
  _save_masks(config, training, shared, outdir, trainable, factors)
  return jax.device_get(hard_merge(origin, factors, *trainable)), step


def _choose_layout(
  config,
  shared: Path,
  frozen,
  training: methods.Training,
  batches,
  mesh,
  programs: _Programs,
  init_state,
  tower,
) -> layout_lib.Layout:
  """The step's layout for this method (`_step_layout`): its signature, candidates and timing."""
  signature = layout_lib.signature(
    frozen,
    masks=training.masks,
    coefficients=training.coefficients,
    coefficient_range=training.coefficient_range,
    batch_size_per_task=config.adarank.batch_size_per_task,
    mesh=tuple(mesh.shape.items()),
    tower=tower,
  )
  return _step_layout(
    config,
    shared / LAYOUT_FILE,
    timings_path=shared.parent / TIMINGS_FILE,
    signature=signature,
    mesh=mesh,
    batches=batches,
    candidates=lambda: layout_lib.candidates(
      num_tasks=len(config.tasks), cache_deltas=_cache_fits(frozen[1], mesh), tower=tower
    ),
    timed=lambda candidate, step_batches: layout_lib.time_step(
      programs(training, candidate)[0],
      frozen,
      init_state(candidate),
      step_batches,
      memory_limit=layout_lib.memory_limit(jax.local_devices()[0]),
    ),
  )


def _init_state(config, training: methods.Training, factors, mesh, step_layout: layout_lib.Layout):
  """A trained method's initial state for `step_layout`, replicated on the mesh."""
  hp = config
  for key in training.section:
    hp = hp[key]
  state = train.init_state(
    factors,
    optimizer=train.make_optimizer(hp.learning_rate),
    num_tasks=jax.tree.leaves(factors)[0].shape[0],  # T, or T + 1 with Iso-CTS's common row
    initial_rank_ratio=hp.initial_rank_ratio if training.masks else 1.0,
    prior=hp.prior,
    coefficients_per=training.coefficients,
    cache_deltas=step_layout.cache_deltas,
  )
  return train.place_state(state, mesh)


def _adaptation_batches(config, sources, data: _Data, mesh) -> pipeline.TaskBatches:
  """The adaptation stream: each task's whole test split, or a seeded subset of it (data_fraction),
  unlabeled, in this process's part of every batch."""
  adaptation = [
    pipeline.subset(src, config.adarank.data_fraction, seed=config.seed + t) for t, src in enumerate(sources)
  ]
  return pipeline.TaskBatches(
    [
      pipeline.adaptation_batches(
        src,
        prepare=data.prepare,
        batch_size=config.adarank.batch_size_per_task,
        seed=config.seed + t,
        shard=pipeline.batch_shard(mesh, config.adarank.batch_size_per_task),
        workers=config.data.workers,
        processes=config.data.processes,
      )
      for t, src in enumerate(adaptation)
    ],
    data.inputs_of,
  )


def _cache_fits(factors, mesh) -> bool:
  """layout.cache_fits on this process's first device, decided on process 0: every process must
  build the same programs."""
  fits = layout_lib.cache_fits(factors, jax.local_devices()[0], shards=mesh.shape.get("task", 1))
  return bool(multihost_utils.broadcast_one_to_all(np.int32(fits)))


LAYOUT_FILE = "layout.json"  # in a trained method's workdir folder: the step layout it runs with
TIMINGS_FILE = "layout_timings.json"  # in the workdir: signature -> the timings of one step's candidates


def _step_layout(
  config,
  path: Path,
  *,
  timings_path: Path,
  signature: str,
  mesh,
  batches: pipeline.TaskBatches,
  candidates: Callable[[], tuple[layout_lib.Layout, ...]],
  timed: Callable[[layout_lib.Layout, Any], float | None],
) -> layout_lib.Layout:
  """The step's layout for one trained method (`adarank_jax.core.layout`).

  adarank.layout='config': the config's cache_deltas, tasks_per_forward and remat. 'auto': the
  layout an earlier run of this method chose (stored at `path`); else the one chosen for an earlier
  method of the same step `signature` (stored at `timings_path`, the workdir's); else one chosen now
  among `candidates()` (the cache by its cost rule) by timing each on the stream's first batches,
  which the stream then gives again (`timed` gives None for a candidate that would not fit in
  memory). Process 0 decides for every process; the choice is logged and stored at `path` with the
  timings and the machine, so a resumed run uses the same layout, and under `signature` at
  `timings_path`, so the next method of the same shapes skips the timing.
  """
  adarank = config.adarank
  if adarank.layout == "config":
    return layout_lib.Layout(adarank.tasks_per_forward, adarank.remat, adarank.cache_deltas)
  if path.exists():
    chosen = layout_lib.from_json(files.read_json(path).get("layout"), f"{path}: 'layout'")
    print(f"  step layout: {chosen} (chosen by an earlier run: {path})")
    return chosen
  known = files.read_json(timings_path) if timings_path.exists() else {}
  if signature in known:
    record = known[signature]
    chosen = layout_lib.from_json(record.get("layout"), f"{timings_path}: {signature!r}")
    print(f"  step layout: {chosen} (timed for {record['method']}, a step of the same shapes)")
  else:
    chosen, timings = _time_candidates(candidates(), batches, mesh, timed)
    record = {"timed": timings}
  if jax.process_index() == 0:
    record = {
      "layout": layout_lib.to_json(chosen),
      "method": record.get("method", path.parent.name),
      "timed": record["timed"],
      "machine": record.get("machine", layout_lib.machine()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, record, indent=2)
    files.write_json(timings_path, {**known, signature: record}, indent=2)
  return chosen


def _time_candidates(
  options, batches: pipeline.TaskBatches, mesh, timed
) -> tuple[layout_lib.Layout, list[dict[str, Any]]]:
  """(process 0's fastest candidate, broadcast; each timed candidate's seconds a step, None where
  `timed` skipped it for its memory), timed on the stream's first batches, which it gives again
  after. Several candidates are timed, and so is a lone one that keeps the delta cache (its memory
  is checked); where every candidate with the cache is skipped, the same ones without it are
  chosen among (`layout.without_cache`)."""
  timings = []
  step_batches = None
  while len(options) > 1 or options[0].cache_deltas:
    if step_batches is None:
      start = batches.get_state()
      step_batches = train.place_batches(next(batches), mesh)
      batches.set_state(start)
    timed_now = []
    for candidate in options:
      seconds = timed(candidate, step_batches)
      timed_now.append((candidate, seconds))
      note = "skipped: its step would not fit in memory" if seconds is None else f"{seconds:.3f} s a step"
      print(f"  step layout {candidate}: {note}")
    timings += timed_now
    none_fit = all(seconds is None for _, seconds in timed_now)
    retry = layout_lib.fallback(
      options, none_fit=bool(multihost_utils.broadcast_one_to_all(np.int32(none_fit)))
    )
    if retry:
      print("  no step layout fits with the delta cache: choosing among them without it")
      options = retry
      continue
    index = options.index(layout_lib.fastest(timed_now))
    options = (options[int(multihost_utils.broadcast_one_to_all(np.int32(index)))],)
    break
  chosen = options[0]
  print(f"  step layout: {chosen}")
  return chosen, [{**layout_lib.to_json(c), "step_s": seconds} for c, seconds in timings]


class _EvaluationPoints:
  """A trained method's evaluation points and its selection (config.adarank.selection).

  Points: every eval_every steps (and step 0 when a step is selected), each scored on the test splits
  and, for selection=validation, on the labelled validation splits, appended to evals.jsonl. A point
  that beats the best so far is a candidate: its state is kept (process 0) until the run ends. A
  resumed run continues from its last checkpoint (`restored`): what the killed run logged after it is
  logged again, so it is dropped here (a torn last record with it), and so are the candidate models
  it kept."""

  def __init__(
    self,
    config,
    name,
    outdir: Path,
    shared: Path,
    *,
    restored,
    writer,
    merge,
    evaluate_params,
    validation_sources,
  ):
    self.selection, self.name, self.writer = config.adarank.selection, name, writer
    self.merge, self.evaluate_params, self.validation_sources = merge, evaluate_params, validation_sources
    self.key = SELECTION_KEYS.get(self.selection)
    self.evals_path, self.candidates = outdir / "evals.jsonl", shared / "selected"
    self.primary = jax.process_index() == 0
    files.rewrite_jsonl(self.evals_path, lambda record: record["step"] <= restored)
    _drop_metrics(writer.jsonl_path, name, config.tasks, after_step=restored)
    for old in self.candidates.glob("step_*") if self.candidates.is_dir() and self.primary else ():
      if int(old.name.removeprefix("step_")) > restored:
        shutil.rmtree(old)
    self.best = _best_evaluation(self.evals_path, self.key)
    outdir.mkdir(parents=True, exist_ok=True)
    self.num_steps = _num_steps(config, methods.get(name).training)
    self.initial_due = self.selection != "final" and restored == 0 and self.best["step"] < 0

  def __call__(self, step: int, trainable) -> None:
    params = self.merge(trainable)
    scores, details = self.evaluate_params.with_details(params)
    record = {"step": step, "scores": scores, "average": evaluate.average(scores)}
    if details:
      record["metrics"] = details
    if self.selection == "validation":
      record["validation"] = self.evaluate_params(params, on=self.validation_sources)
      record["validation_average"] = evaluate.average(record["validation"])
    report.write_jsonl(self.evals_path, record)
    self.writer.scalars(
      step, {f"{self.name}/{k}": record[k] for k in ("average", "validation_average") if k in record}
    )
    if self.key and record[self.key] > self.best[self.key]:  # a candidate, kept until the run ends
      self.best.update(record)
      if self.primary:
        checkpoint.replace_tree(self.candidates / f"step_{step}", trainable)

  def reported(self, final):
    """(trainable, step) of the reported model: the final state, or the selected candidate (the
    others are deleted)."""
    if self.selection == "final":
      return final, self.num_steps
    best, name = self.best, self.name
    _barrier(f"{name}: candidates written")
    trainable = checkpoint.load_tree(self.candidates / f"step_{best['step']}", final)
    on = (
      "the labelled test set: an oracle" if self.selection == "oracle" else "the labelled validation splits"
    )
    print(f"[{name}] {self.selection} selection: step {best['step']} (average {best[self.key]:.4f} on {on})")
    for old in self.candidates.iterdir() if self.primary else ():
      if old.name != f"step_{best['step']}":
        shutil.rmtree(old)
    return trainable, best["step"]


def _train(
  config, name, frozen, state, train_step, batches, manager, points: _EvaluationPoints, writer, *, mesh
):
  """Runs the training loop (`loop.fit`) to the method's last step: metrics logged at every logging
  point, evaluation points every eval_every steps; returns the final state."""
  if points.initial_due:  # the initial state is a candidate too (the official code evaluates it first)
    points(0, jax.device_get((state.mask_logits, state.coefficients)))
  logged = loop.fit(
    frozen,
    state,
    train_step=train_step,
    batches=batches,
    num_steps=points.num_steps,
    log_every=config.adarank.log_every,
    checkpoint=manager,
    checkpoint_every=config.adarank.checkpoint_every,
    mesh=mesh,
  )
  try:
    for point in logged:  # the loop body runs at every logging point, before its checkpoint
      scalars = {}
      for key, value in point.metrics.items():  # per-task vectors (entropies): a scalar per task
        value = np.asarray(value)
        scalars.update(
          {f"{name}/{key}/{task}": v for task, v in zip(config.tasks, value)}
          if value.ndim
          else {f"{name}/{key}": value}
        )
      writer.scalars(point.step, scalars)
      if point.step % config.adarank.eval_every == 0:
        points(point.step, jax.device_get((point.state.mask_logits, point.state.coefficients)))
      state = point.state
  except loop.NonFiniteLossError as error:
    raise loop.NonFiniteLossError(f"{name}: {error}") from error
  finally:
    batches.close()  # its worker threads or processes
  manager.close()
  return state


def _save_masks(config, training: methods.Training, shared: Path, outdir: Path, trainable, factors) -> None:
  """The reported model's masks and coefficients, atomically (a resume with more steps replaces
  them), and its rank heatmap."""
  mask_logits, coefficients = trainable
  if jax.process_index() == 0:
    checkpoint.replace_tree(shared / "masks", {"mask_logits": mask_logits, "coefficients": coefficients})
  if training.masks:
    rows = jax.tree.leaves(factors)[0].shape[0]
    labels = list(config.tasks) + ["common"] * (rows - len(config.tasks))
    report.rank_heatmap(
      tree_util.flatten(jax.device_get(masking.kept_counts(mask_logits, factors))),
      labels,
      outdir / "rank_heatmap.png",
    )


def _input_chain(
  config: ml_collections.ConfigDict, method: methods.Method, *, adapters: bool = False
) -> tuple[Any, ...]:
  """What `method` is made from, as a chain of inputs each derived from the one before: "finetuned"
  (the T trees), ("vectors", origin) (the task vectors), ("factors", origin, rank, dtype) and
  ("components", origin, needs) (a static merge's components, `methods.COMPONENTS`).

  `adapters`: the fine-tuned inputs are LoRA adapters (a `lora.Adapted`). AdaRank on Task Arithmetic
  then takes ("adapter_factors", "pretrained", rank, dtype), the task vectors' SVD computed exactly from
  the adapters' factors, never densified; every other method the same chain as full models, its task
  vectors densified from the factors (`lora.task_vectors`)."""
  if adapters and method.needs == "factors" and method.trains:
    return (
      "finetuned",
      ("adapter_factors", "pretrained", config.adarank.rank or None, config.adarank.factor_dtype),
    )
  if method.needs == "finetuned":
    return ("finetuned",)
  if method.needs == "pretrained":
    return ()
  origin = methods.ORIGIN_OF[method.needs]
  chain = ("finetuned", ("vectors", origin))
  if method.needs == "tau":
    return chain
  rank, dtype = None, "float32"  # static methods and their components: full rank
  if method.trains and method.needs not in methods.COMPONENTS:
    rank, dtype = config.adarank.rank or None, config.adarank.factor_dtype
  chain += (("factors", origin, rank, dtype),)
  if method.needs in methods.COMPONENTS:
    chain += (("components", origin, method.needs),)
  return chain


def _last_reads(chains: list[tuple[Any, ...]]) -> dict[Any, int]:
  """For every input of the chains (`_input_chain`, one per method in run order), the index of the last
  method that reads it: the last input of its chain, and the inputs before it back to the first one
  that an earlier method made (each is made once and held until its last read)."""
  last, made = {}, set()
  for index, chain in enumerate(chains):
    for key in reversed(chain):
      last[key] = index
      if key in made:
        break
    made.update(chain)
  return last


def _barrier(name: str) -> None:
  """Waits until every process of the run gets here (nothing to wait for in a run of one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"adarank_jax: {name}")


def _num_steps(config, training: methods.Training) -> int:
  """A trained method's steps: config.<section[0]>.num_steps (adarank.num_steps, adamerging.num_steps)."""
  return config[training.section[0]].num_steps


# The evaluation record's score that each selection maximises ('final' takes the last step).
SELECTION_KEYS = {"oracle": "average", "validation": "validation_average"}


def _best_evaluation(path: Path, key: str | None) -> dict[str, Any]:
  """The evaluation point with the highest `key` logged so far (a resumed run keeps its points)."""
  best = {"step": -1, key: -np.inf}
  for record in report.read_jsonl(path) if key else ():  # a torn last record: dropped, with a warning
    if record[key] > best[key]:
      best = record
  return best


def _drop_metrics(path: Path, method: str, tasks, *, after_step: int) -> None:
  """Drops from metrics.jsonl what an earlier run logged for `method` and will be logged again: its
  training records after `after_step` and its final scores (step 0, keys method/<task>)."""
  prefix = f"{method}/"
  summary = {f"{prefix}{t}" for t in tasks}

  def keep(record):
    keys = [k for k in record if k not in ("step", "wall_time")]
    if not keys or not all(k.startswith(prefix) for k in keys):
      return True
    return not (set(keys) <= summary or record["step"] > after_step)

  files.rewrite_jsonl(path, keep)
