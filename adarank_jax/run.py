"""The whole experiment as one linear function: load, merge by every method asked, evaluate, report.

Reads the ConfigDict (only this module and main.py do) and calls the library with explicit arguments.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from adarank_jax import checkpoint
from adarank_jax import decomposition
from adarank_jax import evaluate
from adarank_jax import families
from adarank_jax import files
from adarank_jax import merging
from adarank_jax import methods
from adarank_jax import report
from adarank_jax import task_vectors
from adarank_jax import train
from adarank_jax import tree_util
from adarank_jax import validate
from adarank_jax.data import pipeline
from adarank_jax.data import registry


def run(config: ml_collections.ConfigDict, workdir: Path, *, continued: bool, overwrite: bool,
        export: str) -> dict[str, Any]:
  """Runs `config.methods` in order; writes results.json, results.md, rank heatmaps and exports."""
  # ------------------------------------------------------------------------------------------ Mesh
  # One mesh for the run: every task's batch is split over 'data'; with factor_sharding='task' the
  # factor stacks are split over a 'task' axis of gcd(devices, tasks) devices.
  task_axis = 1
  if config.mesh.factor_sharding == "task":
    task_axis = math.gcd(jax.device_count(), len(config.tasks))
  mesh = train.make_mesh(task=task_axis)
  data_axis = mesh.shape["data"]
  if config.adarank.batch_size_per_task % data_axis:
    raise validate.ConfigError(
        f"adarank.batch_size_per_task={config.adarank.batch_size_per_task}: expected a multiple of the "
        f"mesh's data axis ({data_axis} devices) so every task's batch splits evenly")
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)")

  # ------------------------------------------------------------------------------------------ Workdir
  # Nothing but the cache is written before the models loaded: a run that fails to load leaves no
  # config.json behind, so the corrected rerun is not refused as "a different config".
  if overwrite:
    files.clear_dir(workdir)  # keeps main.py's lock file
  workdir.mkdir(parents=True, exist_ok=True)
  cache_dir = Path(config.cache_dir or workdir / "cache")
  tasks = tuple(config.tasks)
  print(f"workdir {workdir}; {len(tasks)} tasks; methods: {', '.join(config.methods)}")

  # ------------------------------------------------------------------------------------------ Data sets
  # Every task's data set is opened before any checkpoint is loaded: all missing ones in one error.
  sources, missing = [], []
  for t in tasks:
    try:
      sources.append(registry.get(t).open_source(data_dir=config.data.data_dir or None))
    except (registry.DatasetNotFoundError, registry.DatasetMismatchError) as error:
      missing.append(str(error))
  if missing:
    raise validate.ConfigError(f"{len(missing)} of {len(tasks)} data sets cannot be read:\n  "
                               + "\n  ".join(missing))

  # ------------------------------------------------------------------------------------------ Models
  start = time.perf_counter()
  paths = [str(validate.finetuned_path(config.model.finetuned, t)) for t in tasks]
  if config.family == "clip":
    setup = families.load_clip(model=config.model.name, pretrained=config.model.pretrained,
                               finetuned=paths, tasks=tasks, dtype=config.model.dtype,
                               run_pickled_code=config.model.run_pickled_code, cache_dir=cache_dir)
  else:
    setup = families.load_lm(pretrained=config.model.pretrained, finetuned=paths, tasks=tasks,
                             dtype=config.model.dtype)
  timings = {"load_s": time.perf_counter() - start}
  if not continued:
    files.write_atomic(workdir / "config.json", config.to_json(indent=2) + "\n")
  writer = report.MetricWriter(workdir)

  # ------------------------------------------------------------------------------------------ Data
  if setup.kind == "vision":
    prepare = pipeline.vision_preprocessor(image_size=setup.image_size)
  else:
    prepare = pipeline.text_preprocessor(tokenizer_dir=config.data.tokenizer or setup.tokenizer,
                                         max_length=config.data.max_length)
  inputs_of = functools.partial(pipeline.model_inputs, kind=setup.kind)

  def eval_batches(t):
    return pipeline.eval_batches(sources[t], prepare=prepare, batch_size=config.eval.batch_size,
                                 max_examples=config.eval.max_examples, workers=config.data.workers)


  def evaluate_params(params, only=None) -> dict[str, float]:
    scores = {}
    for t, name in enumerate(tasks):
      if only is None or t in only:
        scores[name] = evaluate.evaluate_task(
            lambda batch, t=t: setup.predict(params, t, inputs_of(batch)),
            eval_batches(t), metric=registry.get(name).metric)
    return scores

  # ------------------------------------------------------------------------------------------ Methods
  include = jax.tree.map(lambda x: not x, tree_util.select(setup.merged, config.merge.unmerged))
  memo: dict[Any, Any] = {}

  def vectors(origin: str):
    if origin not in memo:
      memo[origin] = task_vectors.task_vectors(setup.merged, setup.finetuned, origin=origin,
                                               include=include)
    return memo[origin]

  def factors_of(origin: str, *, rank: int | None, dtype: Any):
    key = (origin, rank, dtype)
    if key not in memo:
      begin = time.perf_counter()
      _, tau = vectors(origin)
      select = tree_util.select(tau, config.merge.decompose)
      if not any(tree_util.flatten(select).values()):
        raise ValueError(f"merge.decompose={tuple(config.merge.decompose)} selects no matrix of the merged "
                         f"tree; its paths look like {sorted(tree_util.flatten(tau))[:3]}")
      memo[key] = jax.block_until_ready(decomposition.decompose(tau, select, rank=rank, dtype=dtype))
      timings[f"decompose_{origin}_s"] = time.perf_counter() - begin
    return memo[key]

  # One compiled training step and one compiled hard merge serve every AdaRank base: the learning
  # rate is optimizer state (train.make_optimizer), so TA and CART runs do not recompile.
  temperature = config.adarank.mask_temperature
  train_step = train.make_train_step(
      logits_fn=setup.train_logits, optimizer=train.make_optimizer(config.adarank.ta.learning_rate),
      temperature=temperature, num_tasks=len(tasks), mesh=mesh)
  hard_merge = jax.jit(functools.partial(merging.merge, temperature=temperature, mask_mode="hard"))

  def method_inputs(method: methods.Method) -> tuple[Any, ...]:
    """What `method` is made from (methods.NEEDS): trees, task vectors or factors, memoised."""
    if method.needs == "pretrained":
      return (setup.merged,)
    if method.needs == "finetuned":
      return (setup.finetuned,)
    origin = methods.ORIGIN_OF[method.needs]
    if method.needs == "tau":
      return vectors(origin)
    rank, dtype = None, families.DTYPES["float32"]  # static methods: full rank, float32
    if method.trains:
      rank, dtype = config.adarank.rank or None, families.DTYPES[config.adarank.factor_dtype]
    return vectors(origin)[0], factors_of(origin, rank=rank, dtype=dtype)

  trains = any(methods.get(m).trains for m in config.methods)
  results = report.new_results(
      name=config.name, tasks=tasks, model=config.model.name,
      steps=config.adarank.num_steps if trains else None,
      selection=("best average test accuracy over evaluation points (oracle: selected on the "
                 "labelled test set)") if config.adarank.selection == "oracle" else "final step")
  for method in config.methods:
    begin = time.perf_counter()
    print(f"[{method}]")
    spec = methods.get(method)
    if not spec.trains:  # recomputed from scratch: its earlier records go
      _drop_metrics(writer.jsonl_path, method, tasks, after_step=-1)
    if method == "individual":
      scores = {}
      for t in range(len(tasks)):
        scores.update(evaluate_params(setup.finetuned[t], only={t}))
      results["individual"] = scores
    else:
      if spec.trains:
        origin, factors = method_inputs(spec)
        params = _adarank(config, workdir / method, base=method.removeprefix("adarank_"),
                          writer=writer, origin=origin, factors=factors,
                          evaluate_params=evaluate_params, sources=sources, prepare=prepare,
                          inputs_of=inputs_of, mesh=mesh, train_step=train_step,
                          hard_merge=hard_merge)
      else:  # a static method: its hyperparameters are its function's keywords (config.merge.<name>)
        hyperparameters = dict(config.merge[method]) if method in config.merge else {}
        params = jax.jit(functools.partial(spec.merge, **hyperparameters))(*method_inputs(spec))
      results["methods"][method] = evaluate_params(params)
      if export:
        setup.export(params, workdir / "export" / (
            method if export == "hf" else f"{method}.{export}"))
    timings[f"{method}_s"] = time.perf_counter() - begin
    writer.scalars(0, {f"{method}/{k}": v for k, v in
                       (results["methods"].get(method) or results["individual"]).items()})

  # ------------------------------------------------------------------------------------------ Reports
  results["timings_s"] = timings
  report.write_results_json(workdir / "results.json", results)
  table = report.markdown_table(results)
  report.write_markdown(workdir / "results.md", results)
  writer.close()
  print(table)
  print(f"\nwritten to {workdir}: results.json, results.md"
        + (", export/" if export else "") + "".join(
            f", {m}/rank_heatmap.png" for m in config.methods if m.startswith("adarank")))
  return results


def _adarank(config, outdir: Path, *, base, writer, origin, factors, evaluate_params,
             sources, prepare, inputs_of, mesh, train_step, hard_merge):
  """Learns masks and coefficients on the unlabeled test streams; returns the hard-merged tree."""
  hp = config.adarank[base]
  placement = "task" if "task" in mesh.axis_names else "replicated"
  frozen = train.place_frozen((origin, factors), mesh, factor_placement=placement)
  state = train.init_state(frozen[1], optimizer=train.make_optimizer(hp.learning_rate),
                           num_tasks=len(config.tasks), initial_rank_ratio=hp.initial_rank_ratio,
                           prior=hp.prior, cache_deltas=config.adarank.cache_deltas)
  state = train.place_state(state, mesh)

  def make_batches(positions):
    streams = [pipeline.adaptation_stream(
        src, prepare=prepare, batch_size=config.adarank.batch_size_per_task,
        seed=config.seed + t, start_batch=positions[t], workers=config.data.workers)
        for t, src in enumerate(sources)]
    return (tuple(inputs_of(next(s)) for s in streams) for _ in iter(int, 1))

  evals_path = outdir / "evals.jsonl"
  # A resumed run continues from its last checkpoint: what the killed run logged after it is logged
  # again, so it is dropped here (and a torn last record with it).
  manager = checkpoint.Manager(outdir / "checkpoints")
  restored = manager.latest_valid_step() or 0  # where fit resumes if the newest checkpoint is corrupt
  files.rewrite_jsonl(evals_path, lambda record: record["step"] <= restored)
  _drop_metrics(writer.jsonl_path, f"adarank_{base}", config.tasks, after_step=restored)
  best = _best_evaluation(evals_path)

  def log(step_, metrics, state_):
    scalars = {}
    for key, value in metrics.items():  # per-task vectors (the entropies) become one scalar per task
      value = np.asarray(value)
      scalars.update({f"adarank_{base}/{key}/{task}": v for task, v in zip(config.tasks, value)}
                     if value.ndim else {f"adarank_{base}/{key}": value})
    writer.scalars(step_, scalars)
    if step_ % config.adarank.eval_every == 0:
      trainable = jax.device_get((state_.mask_logits, state_.coefficients))
      scores = evaluate_params(hard_merge(origin, factors, *trainable))
      record = {"step": step_, "scores": scores, "average": evaluate.average(scores)}
      report.write_jsonl(evals_path, record)
      writer.scalars(step_, {f"adarank_{base}/eval_average": record["average"]})
      if config.adarank.selection == "oracle" and record["average"] > best["average"]:
        best.update(record)  # keep its masks on disk too, so a resumed run can still select it
        checkpoint.replace_tree(outdir / "oracle" / f"step_{step_}", trainable)
        for old in (outdir / "oracle").iterdir():
          if old.name != f"step_{step_}":
            shutil.rmtree(old)

  outdir.mkdir(parents=True, exist_ok=True)
  if config.adarank.selection == "oracle" and best["step"] < 0:
    log(0, {}, state)  # the official code's initial evaluation is an oracle candidate too
  try:
    state = train.fit(frozen, state, train_step=train_step, make_batches=make_batches,
                      num_steps=config.adarank.num_steps, log_every=config.adarank.log_every,
                      checkpoint=manager, checkpoint_every=config.adarank.checkpoint_every,
                      callbacks=(log,), mesh=mesh)
  except train.NonFiniteLossError as error:
    raise train.NonFiniteLossError(f"adarank_{base}: {error}") from error
  manager.close()
  trainable = jax.device_get((state.mask_logits, state.coefficients))
  if config.adarank.selection == "oracle":
    trainable = checkpoint.load_tree(outdir / "oracle" / f"step_{best['step']}", trainable)
    print(f"[adarank_{base}] oracle selection: step {best['step']} (average test score "
          f"{best['average']:.4f}, chosen on the labelled test set)")
  mask_logits, coefficients = trainable
  # Always the final state (a resume with more steps replaces the earlier masks), atomically.
  checkpoint.replace_tree(outdir / "masks", {"mask_logits": mask_logits, "coefficients": coefficients})
  report.rank_heatmap(tree_util.flatten(mask_logits), list(config.tasks), outdir / "rank_heatmap.png")
  return jax.device_get(hard_merge(origin, factors, mask_logits, coefficients))


def _best_evaluation(path: Path) -> dict[str, Any]:
  """The best evaluation point logged so far (a resumed oracle run keeps its earlier points)."""
  best = {"step": -1, "average": -np.inf}
  for record in report.read_jsonl(path):  # a torn last record is dropped with a warning
    if record["average"] > best["average"]:
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
