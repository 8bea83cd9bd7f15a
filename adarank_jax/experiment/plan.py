"""Memory per device of an AdaRank run on a decoder, planned from the config before anything is loaded.

  rows = plan.plan(config, devices=8, device_memory=80e9)   # one Row per option
  print(plan.table(rows, devices=8, device_memory=80e9))

What is planned: the training step of the first AdaRank method of config.methods, on a mesh of
`devices` devices laid out as config.mesh says. Its inputs come from shapes alone: the architecture
from the config.json in config.model.pretrained (no weights are read), a head per task of the size of
the task's classes, the task vectors and the SVD factors by `jax.eval_shape` of the same functions
the run calls. Per device, in bytes:

  weights      the origin (merged and unmerged leaves) and the heads, as `train.place_frozen` places them
  factors      U, s, V^T (and the dense task vectors of unselected leaves) of every task
  state        the mask logits, the coefficients and Adam's two moments, replicated
  activations  what the compiled step allocates beyond its inputs (XLA's memory analysis of the
               step compiled for this mesh on abstract inputs: outputs not aliased to inputs plus
               temporaries: the activations kept for the backward pass, the rebuilt and gathered
               weights, the gradients); only with compile=True. Deeper than 2 layers, the step is
               compiled with 1 and 2 layers and extrapolated linearly in depth (on tiny decoders of
               3 and 6 layers this overestimated the compiled figure by 0.4% and 0.7%)

The rows: the config as it is, then with the factors stored in bfloat16, then with the top-k window
(adarank.rank = `WINDOW` of the narrowest side of each matrix, at least 1). The run itself holds
more on the host while it loads (the fine-tuned models, then the task vectors): the plan is of the
devices during training. Planning 8 devices on a host with fewer compiles for forced CPU devices
(`main --dry_run`): XLA:CPU's buffer assignment, which an accelerator's may differ from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adarank_jax.core import decomposition, layout, train, tree_util
from adarank_jax.core import task_vectors as task_vectors_lib
from adarank_jax.data import registry
from adarank_jax.experiment import loading, methods
from adarank_jax.interop import hf_config
from adarank_jax.models import decoder, functional

WINDOW = 0.16  # the top-k window's k, as a fraction of min(m, n) (the CART configs' 16%)
COLUMNS = ("weights", "factors", "state", "activations")


@dataclasses.dataclass(frozen=True)
class Row:
  """One option's bytes per device (`COLUMNS`; activations None when not compiled)."""

  option: str
  weights: int
  factors: int
  state: int
  activations: int | None

  @property
  def total(self) -> int:
    return self.weights + self.factors + self.state + (self.activations or 0)


class DoesNotFit(ValueError):
  """The run's training would not fit its devices; the message holds the plan."""


def decoder_config(config) -> decoder.DecoderConfig:
  """The sequence classifier of config.model.pretrained's config.json (its shapes; no weights read)."""
  if config.task_type != "classification":
    raise ValueError(
      f"task_type={config.task_type!r}: the planner covers decoder classifiers (task_type='classification')"
    )
  path = Path(config.model.pretrained) / "config.json"
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: cannot read the model's config.json to plan the run: {error}") from error
  fields = classifier_fields(raw, num_labels=2, source=str(path))  # labels replaced per task by `_problem`
  return hf_config.decoder_config(fields, dtype=config.model.dtype)


def classifier_fields(raw: dict[str, Any], *, num_labels: int, source: str) -> dict[str, Any]:
  """The complete config.json fields (`hf_config.complete`) of the sequence classifier of a decoder's
  config.json dict `raw`: its XForSequenceClassification with `num_labels` labels; the pad id is raw's,
  else its eos id, else 0."""
  raw = hf_config.complete(raw)
  if raw.get("model_type") not in decoder.MODEL_TYPES:
    raise ValueError(
      f"{source}: model_type {raw.get('model_type')!r}; the planner covers the decoders "
      f"{sorted(decoder.MODEL_TYPES)}"
    )
  prefix = decoder.MODEL_TYPES[raw["model_type"]]
  raw["architectures"] = [f"{prefix}ForSequenceClassification"]
  raw["id2label"] = {i: str(i) for i in range(num_labels)}
  raw["label2id"] = {str(i): i for i in range(num_labels)}
  if raw.get("pad_token_id") is None:
    raw["pad_token_id"] = raw.get("eos_token_id") if isinstance(raw.get("eos_token_id"), int) else 0
  return raw


def plan(config, *, devices: int, device_memory: float, compile: bool = True) -> list[Row]:  # noqa: A002
  """The rows of the module docstring for `config` on `devices` of `device_memory` bytes each (the
  first `devices` of jax.devices(); compile=False leaves activations out and needs no devices)."""
  del device_memory  # the rows are sizes; `table` and `check` compare them with it
  shape = decoder_config(config)
  options = [("as configured", config.adarank.factor_dtype, config.adarank.rank or None)]
  if config.adarank.factor_dtype != "bfloat16":
    options.append(("factor_dtype=bfloat16", "bfloat16", config.adarank.rank or None))
  window = max(1, math.floor(WINDOW * min(shape.hidden_size, shape.intermediate_size)))
  if not config.adarank.rank or config.adarank.rank > window:
    options.append((f"rank={window} (top-{WINDOW:.0%} window)", config.adarank.factor_dtype, window))
  mesh = _mesh(config, devices) if compile else None
  problem = _problem(config, shape)
  return [
    Row(
      option=name,
      **_sizes(config, problem, dtype, rank, devices),
      activations=None if mesh is None else _activations(config, shape, dtype, rank, mesh),
    )
    for name, dtype, rank in options
  ]


def table(rows: Sequence[Row], *, devices: int, device_memory: float) -> str:
  """A markdown table of `rows` in GB per device, and whether each fits `device_memory`."""
  gb = lambda b: "-" if b is None else f"{b / 1e9:.3g}"
  lines = [
    f"| option ({devices} devices of {device_memory / 1e9:.0f} GB) | "
    + " | ".join(COLUMNS)
    + " | total | fits |",
    "|---|" + "---:|" * (len(COLUMNS) + 1) + "---|",
  ]
  for row in rows:
    values = [gb(getattr(row, c)) for c in COLUMNS]
    fits = "yes" if row.total <= device_memory else "no"
    lines.append(f"| {row.option} | " + " | ".join(values) + f" | {gb(row.total)} | {fits} |")
  return "\n".join(lines) + "\n(GB per device; 1 GB = 1e9 bytes)"


def check(config, *, devices: int, device_memory: float) -> None:
  """Raises DoesNotFit, with the table and the first option that fits (or the devices it would
  take), when the step's inputs alone (weights, factors, state) exceed `device_memory`: before
  anything is loaded. Uncompiled, so it costs no compile."""
  rows = plan(config, devices=devices, device_memory=device_memory, compile=False)
  if rows[0].total <= device_memory:
    return
  fitting = [row.option for row in rows[1:] if row.total <= device_memory]
  if fitting:
    advice = f"--config.adarank.{fitting[0].split(' ')[0]} would fit"
  else:
    spread = rows[0].factors + rows[0].weights
    advice = (
      f"none of these fits; fsdp over about {math.ceil(devices * spread / device_memory)} devices might"
    )
  if config.mesh.factor_placement != "fsdp" and devices > 1:
    advice += "; --config.mesh.factor_placement=fsdp splits the weights and factors over the devices"
  raise DoesNotFit(
    f"{config.model.pretrained}: the training step's inputs need {rows[0].total / 1e9:.1f} GB per device, "
    f"more than the {device_memory / 1e9:.1f} GB there are; {advice}:\n"
    + table(rows, devices=devices, device_memory=device_memory)
  )


def planned_method(config) -> methods.Method:
  """The first method of config.methods that learns masks (AdaRank on some base): what is planned."""
  for name in config.methods:
    spec = methods.get(name)
    if spec.training is not None and spec.training.masks:
      return spec
  raise ValueError(
    f"methods={tuple(config.methods)}: no AdaRank method to plan (its step is what is planned)"
  )


def device_memory() -> int | None:
  """Bytes free on this process's first device (`layout.free_bytes`); devices that share the host's
  memory (CPU) each get their share. None when the device does not say."""
  device = jax.local_devices()[0]
  free = layout.free_bytes(device)
  if free is not None and device.platform == "cpu":
    free //= jax.local_device_count()
  return free


def _mesh(config, devices: int):
  available = jax.devices()
  if len(available) < devices:
    raise ValueError(
      f"plan: {devices} devices asked for, {len(available)} present (on a CPU host, "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax starts)"
    )
  used = available[:devices]
  placement = config.mesh.factor_placement
  if placement == "fsdp":
    return train.make_mesh(model=config.mesh.model_devices or devices, devices=used)
  if placement == "task":
    return train.make_mesh(task=math.gcd(devices, len(config.tasks)), devices=used)
  return train.make_mesh(devices=used)


def _problem(config, shape: decoder.DecoderConfig):
  """Abstract origin and task vectors, the heads and the logits function of `planned_method`."""
  classes = [registry.get(task).num_classes for task in config.tasks]
  configs = [dataclasses.replace(shape, num_labels=c) for c in classes]
  heads = [{"kernel": np.zeros((shape.hidden_size, c), np.float32)} for c in classes]
  logits = loading.lm_logits(decoder.build, configs, heads, head_key="score", family="decoder")
  tree = functional.split(nnx.eval_shape(lambda: decoder.build(configs[0], rngs=nnx.Rngs(0))))[1]
  body = {"model": tree["model"]}
  origin_kind = methods.ORIGIN_OF[planned_method(config).needs]
  include = jax.tree.map(lambda x: not x, tree_util.select(body, config.merge.unmerged))
  origin, tau = jax.eval_shape(
    lambda b, f: task_vectors_lib.task_vectors(b, f, origin=origin_kind, include=include),
    body,
    [body] * len(config.tasks),
  )
  return origin, tau, heads, logits


def _factors_and_state(config, tau, factor_dtype: str, rank: int | None):
  """Abstract factors and training state (`train.init_state`) of the planned method, and its optimiser."""
  factors = jax.eval_shape(
    functools.partial(
      decomposition.decompose,
      select=tree_util.select(tau, config.merge.decompose),
      rank=rank,
      dtype=loading.DTYPES[factor_dtype],
      method="xla",
    ),
    tau,
  )
  training = planned_method(config).training
  hyper = functools.reduce(lambda section, key: section[key], training.section, config)
  optimizer = train.make_optimizer(hyper.learning_rate)
  state = jax.eval_shape(
    functools.partial(
      train.init_state,
      optimizer=optimizer,
      num_tasks=len(config.tasks),
      initial_rank_ratio=hyper.initial_rank_ratio,
      prior=hyper.prior,
      coefficients_per=training.coefficients,
    ),
    factors,
  )
  return factors, state, optimizer


def _sizes(config, problem, factor_dtype, rank, devices) -> dict[str, int]:
  """Weights, factors and state per device (the Row fields but activations)."""
  origin, tau, heads, _ = problem
  factors, state, _ = _factors_and_state(config, tau, factor_dtype, rank)
  placement, model = config.mesh.factor_placement, config.mesh.model_devices or devices
  shard = lambda tree, skip: _bytes_per_device(tree, placement, model, devices, skip_leading=skip)
  weights = shard(origin, False) + sum(h["kernel"].nbytes for h in heads)
  return dict(weights=weights, factors=shard(factors, True), state=_nbytes(state))


def _activations(config, shape, factor_dtype, rank, mesh) -> int:
  """What the step compiled for `mesh` allocates beyond its inputs (`layout.step_bytes`), on a model
  of `shape`'s layers. A model deeper than 2 layers is compiled with 1 and 2 layers and extrapolated
  linearly in depth (the layers are alike; compiling all of them takes many minutes at 8B)."""
  layers = shape.num_hidden_layers
  if layers > 2:
    one, two = (_activations(config, _first_layers(shape, n), factor_dtype, rank, mesh) for n in (1, 2))
    return one + (layers - 1) * (two - one)
  origin, tau, _, logits = _problem(config, shape)
  factors, state, optimizer = _factors_and_state(config, tau, factor_dtype, rank)
  training = planned_method(config).training
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  tokens = jax.ShapeDtypeStruct(
    (config.adarank.batch_size_per_task, config.data.max_length),
    jnp.int32,
    sharding=train.batch_sharding(mesh),
  )
  batches = tuple({"input_ids": tokens, "attention_mask": tokens} for _ in config.tasks)
  step = train.make_train_step(
    logits_fn=train.per_task(logits),
    optimizer=optimizer,
    temperature=config.adarank.mask_temperature,
    num_tasks=len(config.tasks),
    mesh=mesh,
    learn=config.adarank.learn if training.masks else "coefficients",
    coefficient_range=training.coefficient_range,
  )
  frozen = _abstract_frozen(origin, factors, mesh, config.mesh.factor_placement)
  return layout.step_bytes(step.lower(frozen, state, batches).compile())


def _first_layers(shape: decoder.DecoderConfig, layers: int) -> decoder.DecoderConfig:
  return dataclasses.replace(shape, num_hidden_layers=layers, layer_types=shape.layer_types[:layers])


def _abstract_frozen(origin, factors, mesh, placement):
  """(origin, factors) as ShapeDtypeStructs carrying `train.place_frozen`'s shardings."""
  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  P = jax.sharding.PartitionSpec  # noqa: N806

  def place(tree, skip):
    def one(x):
      if placement == "fsdp":
        spec = train.fsdp_spec(x.shape, mesh.shape.get("model", 1), skip_leading=skip)
      else:
        spec = P("task") if placement == "task" and skip else P()
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=named(spec))

    return jax.tree.map(one, tree)

  return place(origin, False), place(factors, True)


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _bytes_per_device(tree, placement: str, model: int, devices: int, *, skip_leading: bool) -> int:
  """Bytes of `tree` on one device once placed as `train.place_frozen` places it."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape, size = list(x.shape), jnp.dtype(x.dtype).itemsize
    if placement == "fsdp":
      spec = train.fsdp_spec(shape, model, skip_leading=skip_leading)
      if spec:
        shape[len(spec) - 1] //= model
    elif placement == "task" and skip_leading:
      shape[0] //= math.gcd(devices, shape[0])
    total += math.prod(shape) * size
  return total
