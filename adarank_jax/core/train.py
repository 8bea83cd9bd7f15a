"""Test-time training of AdaRank's masks and coefficients (docs/algorithm.md, section 4).

The loss is sum_t H_t, the batch-mean prediction entropy of each task's head on weights rebuilt by
`merging.merge` (straight-through masks); for generative merging H_t is the mean next-token entropy
of the merged causal LM on task t's prompts (the `objective` argument, our extension). Adam (0.9, 0.999), no schedule, no clipping, no weight
decay, on the mask logits and the coefficients only; the origin and the factors are frozen.

  frozen = (origin, factors)                 # never donated, never differentiated
  state = init_state(factors, optimizer=..., num_tasks=T, initial_rank_ratio=rho, prior=lam0)
  step = make_train_step(logits_fn=per_task(f), optimizer=make_optimizer(1e-3), temperature=10.,
                         num_tasks=T)
  state, metrics = step(frozen, state, batches)   # the loop with checkpoints: experiment.loop.fit

`logits_fn(params, batches) -> T logits (B_t, C_t)` is the model-specific part, made by one of:
  per_task(task_logits_fn)        # task_logits_fn(params, t, inputs): T traced forwards
  one_forward(body_fn, head_fn)   # the shared body on the concatenated batches (or, with
                                  # tasks_per_call=k, on k tasks at a time in a lax.map), then
                                  # head_fn(t, features of task t): one traced body for any T

Sharding: one mesh from `make_mesh`, axes ('data',), ('data', 'task') or ('data', 'model'). Every
task's batch is split along 'data' (and along 'model' too: `batch_sharding`); the factors are
replicated, split along 'task', or, with 'fsdp', split along 'model' with the origin (`place_frozen`:
each array on one of its axes, so that per-device memory of the weights falls as 1 / model devices and
that of the activations as 1 / devices). The trainable state is replicated. The step's outputs are
pinned to replicated so its inputs never change layout; XLA gathers the weights where they are used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adarank_jax.core import masking, merging, objectives, tree_util

FACTOR_PLACEMENTS = ("replicated", "task", "fsdp")

TaskLogitsFn = Callable[[Any, int, Any], jax.Array]
LogitsFn = Callable[[Any, Sequence[Any]], Sequence[jax.Array]]
# objective(logits of task t, task t's inputs) -> H_t, the scalar each task contributes to the loss.
Objective = Callable[[jax.Array, Any], jax.Array]


def class_entropy(logits: jax.Array, inputs: Any) -> jax.Array:
  """The paper's objective: the batch-mean entropy of a task head's class predictions."""
  del inputs
  return objectives.entropy(logits)


def next_token_entropy(logits: jax.Array, inputs: Any) -> jax.Array:
  """The generative objective (our extension): `objectives.next_token_entropy` of a causal LM's
  (B, L, V) logits over the non-pad positions of the prompts (`inputs["attention_mask"]`)."""
  return objectives.next_token_entropy(logits, inputs["attention_mask"])


class TrainState(NamedTuple):
  """Everything a run needs to resume.

  Attributes:
    step: int32 scalar, steps taken.
    mask_logits: {path: (T, r)} float32 per SVD leaf.
    coefficients: {path: (T,)} float32 per merged leaf.
    opt_state: Adam state over (mask_logits, coefficients).
    deltas: None, or the delta cache: per SVD leaf a `merging.Cached` of the per-task deltas
      U_t diag(b_t s_t) V_t^T, (T, m, n), and U_t^T (`merging.init_deltas`): derived from the factors
      and the logits, so never checkpointed.
  """

  step: jax.Array
  mask_logits: Any
  coefficients: Any
  opt_state: Any
  deltas: Any = None


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Adam(lr, b1=0.9, b2=0.999): the official optimiser (no schedule, clipping or weight decay).

  The learning rate lives in the optimizer state (`optax.inject_hyperparams`), not in the compiled
  program: a step built with one learning rate runs states made with another without recompiling,
  so AdaRank on TA and on CART (different learning rates) share one compiled step.
  """
  return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, b1=0.9, b2=0.999)


def init_state(
  factors: Mapping[Any, Any],
  *,
  optimizer: optax.GradientTransformation,
  num_tasks: int,
  initial_rank_ratio: float,
  prior: float,
  coefficients_per: str = "tensor",
  cache_deltas: bool = False,
) -> TrainState:
  """Step 0: logits +-0.1 from `initial_rank_ratio`, every coefficient = `prior`, fresh Adam.

  `coefficients_per`: 'tensor' (one lambda per task per tensor) or 'task' (one per task, shared by
  every tensor: task-wise AdaMerging); see `merging.init_coefficients`. Factors without SVD leaves
  (AdaMerging's dense task vectors) give no mask logits.

  With `cache_deltas` the state also holds every task's masked delta of every SVD leaf and its U^T
  (`merging.Cached`: one more float32 matrix per task and decomposed matrix, plus a copy of U; 4.3 GB
  for ViT-B/32 x 8 tasks at full rank, `layout.cache_bytes`), computed where the factors live
  (place the factors first); the step then does about half the rebuild work (see `merging`). The
  math is the same either way.
  """
  mask_logits = masking.init_logits(factors, initial_rank_ratio=initial_rank_ratio, num_tasks=num_tasks)
  coefficients = merging.init_coefficients(factors, num_tasks=num_tasks, prior=prior, per=coefficients_per)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    mask_logits=mask_logits,
    coefficients=coefficients,
    opt_state=optimizer.init((mask_logits, coefficients)),
    deltas=_init_deltas(factors, mask_logits) if cache_deltas else None,
  )


_init_deltas = jax.jit(merging.init_deltas)


def per_task(task_logits_fn: TaskLogitsFn) -> LogitsFn:
  """logits_fn running `task_logits_fn(params, t, batches[t])` for every task t (traced T times)."""

  def logits_fn(params, batches):
    return [task_logits_fn(params, t, batch) for t, batch in enumerate(batches)]

  return logits_fn


def one_forward(
  body_fn: Callable[[Any, Any], jax.Array],
  head_fn: Callable[[int, jax.Array], jax.Array],
  *,
  tasks_per_call: int | None = None,
  remat: bool = False,
) -> LogitsFn:
  """logits_fn running the shared body, traced once, over all tasks' inputs, then each task's head.

  Args:
    body_fn: (params, inputs) -> (N, ...) features, row i from input row i (rows independent).
    head_fn: (t, features of task t's rows) -> (B_t, C_t) logits.
    tasks_per_call: None: one call of the body on the concatenated inputs of all T tasks. k: the
      body runs T / k times in a `lax.map`, each call on k tasks' rows (k must divide T, and every
      task's inputs must have the same shapes). Smaller calls keep the activations in cache (on
      CPU, k = 1 at 16 images per task is faster than one call on all of them); the program holds
      one copy of the body either way.
    remat: rematerialise the body (`jax.checkpoint`): the backward pass recomputes its activations
      instead of keeping them, about one more forward of compute for a fraction of the memory (with
      `tasks_per_call`, only one call's activations are alive at a time).

  The tasks' inputs (arrays or trees of arrays with a leading batch axis) are concatenated along
  that axis. The result is the same for every `tasks_per_call` up to float rounding.
  """
  body = jax.checkpoint(body_fn) if remat else body_fn

  def logits_fn(params, batches):
    sizes = [jax.tree.leaves(batch)[0].shape[0] for batch in batches]
    if tasks_per_call is None:
      features = body(params, jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches))
    else:
      groups, rest = divmod(len(batches), tasks_per_call)
      if tasks_per_call < 1 or rest or len(set(sizes)) > 1:
        raise ValueError(
          f"one_forward: tasks_per_call={tasks_per_call} must divide the "
          f"{len(batches)} tasks, whose batches must be equal (sizes {sizes})"
        )
      rows = tasks_per_call * sizes[0]
      grouped = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(groups, rows, *xs[0].shape[1:]), *batches)
      features = jax.lax.map(lambda inputs: body(params, inputs), grouped)
      features = features.reshape(groups * rows, *features.shape[2:])
    ends = np.cumsum(sizes)
    return [head_fn(t, features[end - size : end]) for t, (size, end) in enumerate(zip(sizes, ends))]

  return logits_fn


LEARN = ("both", "masks", "coefficients")


def make_loss_fn(
  *,
  logits_fn: LogitsFn,
  temperature: float,
  num_tasks: int,
  mask_mode: str = "ste",
  precision: Any = None,
  learn: str = "both",
  coefficient_range: tuple[float, float] | None = None,
  objective: Objective = class_entropy,
) -> Callable[..., Any]:
  """loss_fn((mask_logits, coefficients), (origin, factors), batches, deltas=None) -> (loss, (T,) H).

  `batches` is a length-T sequence of the tasks' inputs, as `logits_fn(params, batches)` takes them.
  `deltas`: the state's cache of per-task deltas, if it keeps one (`init_state(cache_deltas=True)`).
  `mask_mode` is passed to `merging.merge` ('ste' to train, 'soft' for the smooth surrogate).
  `learn`: 'both' (AdaRank), or 'masks' / 'coefficients' alone (the ablations: the other part gets
  no gradient, so Adam leaves it at its initial value). `coefficient_range`: see `merging.merge`.
  `objective(logits_t, batches[t]) -> H_t`: `class_entropy` (the paper's) or `next_token_entropy`.
  """
  if learn not in LEARN:
    raise ValueError(f"make_loss_fn: learn={learn!r}; expected one of {LEARN}")

  def loss_fn(trainable, frozen, batches, deltas=None):
    if len(batches) != num_tasks:
      raise ValueError(f"loss: got {len(batches)} task batches; expected num_tasks={num_tasks}")
    mask_logits, coefficients = trainable
    if learn == "coefficients":
      mask_logits = jax.lax.stop_gradient(mask_logits)
    elif learn == "masks":
      coefficients = jax.lax.stop_gradient(coefficients)
    origin, factors = frozen
    params = merging.merge(
      origin,
      factors,
      mask_logits,
      coefficients,
      temperature=temperature,
      mask_mode=mask_mode,
      precision=precision,
      deltas=deltas,
      coefficient_range=coefficient_range,
    )
    outputs = logits_fn(params, batches)
    entropies = jnp.stack([objective(logits, batch) for logits, batch in zip(outputs, batches)])
    return jnp.sum(entropies), entropies

  return loss_fn


def make_train_step(
  *,
  logits_fn: LogitsFn,
  optimizer: optax.GradientTransformation,
  temperature: float,
  num_tasks: int,
  mesh: Mesh | None = None,
  mask_mode: str = "ste",
  precision: Any = None,
  learn: str = "both",
  coefficient_range: tuple[float, float] | None = None,
  objective: Objective = class_entropy,
) -> Callable[..., Any]:
  """One jitted `step(frozen, state, batches) -> (state, metrics)`; `state` is donated.

  Args:
    logits_fn: (params, batches) -> T logits; `per_task(...)` or `one_forward(...)`.
    optimizer: e.g. `make_optimizer(1e-3)`.
    temperature: mask temperature (10 in the AdaRank configs).
    num_tasks: T.
    mesh: optional mesh from `make_mesh`; the new state and the metrics come out replicated on it.
    mask_mode: 'ste' (AdaRank) or 'soft'; see `merging.merge`.
    precision: matmul precision of the weight rebuild; see `merging.svd_delta`.
    learn, coefficient_range, objective: see `make_loss_fn`.

  Returns:
    The jitted step. metrics: loss (scalar), entropy (T,), kept_fraction (scalar, after the update).
  """
  loss_fn = make_loss_fn(
    logits_fn=logits_fn,
    temperature=temperature,
    num_tasks=num_tasks,
    mask_mode=mask_mode,
    precision=precision,
    learn=learn,
    coefficient_range=coefficient_range,
    objective=objective,
  )

  def step(frozen, state: TrainState, batches):
    trainable = (state.mask_logits, state.coefficients)
    (loss, entropies), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      trainable, frozen, batches, state.deltas
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    mask_logits, coefficients = optax.apply_updates(trainable, updates)
    deltas = state.deltas
    if deltas is not None:  # rebuild the deltas of the (task, matrix) pairs whose hard mask flipped
      deltas = merging.refresh_deltas(frozen[1], deltas, state.mask_logits, mask_logits, precision=precision)
    new_state = TrainState(
      step=state.step + 1,
      mask_logits=mask_logits,
      coefficients=coefficients,
      opt_state=opt_state,
      deltas=deltas,
    )
    metrics = {
      "loss": loss,
      "entropy": entropies,
      "kept_fraction": masking.kept_fraction(mask_logits, frozen[1]),
    }
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=1)

  def sharded_step(frozen, state, batches):
    # The trainable state and the metrics come out replicated; cached deltas stay where the
    # factors are (replicated or split over 'task'), as `init_state` placed them.
    replicated = NamedSharding(mesh, P())
    new_state, metrics = step(frozen, state, batches)
    new_state = jax.lax.with_sharding_constraint(new_state._replace(deltas=None), replicated)._replace(
      deltas=new_state.deltas
    )
    return new_state, jax.lax.with_sharding_constraint(metrics, replicated)

  return jax.jit(sharded_step, donate_argnums=1)


# ------------------------------------------------------------------------------------------------
# Sharding


def make_mesh(*, task: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (or the given) devices: ('data',), ('data', 'task') or ('data', 'model').

  `task` or `model` devices go to that axis (at most one of them > 1), the rest to 'data'. Axes are
  Auto (XLA picks the collectives).
  """
  devices = list(jax.devices() if devices is None else devices)
  for name, size in (("task", task), ("model", model)):
    if size < 1 or len(devices) % size:
      raise ValueError(f"make_mesh: {name}={size} must be a positive divisor of the {len(devices)} devices")
  if task > 1 and model > 1:
    raise ValueError(f"make_mesh: task={task} and model={model}; at most one of them may exceed 1")
  second = ("task", task) if task > 1 else ("model", model) if model > 1 else None
  if second is None:
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)
  name, size = second
  return jax.make_mesh(
    (len(devices) // size, size), ("data", name), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """How every task's batch is split: along its leading axis over 'data', and over 'model' too on an
  FSDP mesh (each device holds its own rows; the weights come to them)."""
  axes = tuple(a for a in ("data", "model") if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def batch_devices(mesh: Mesh) -> int:
  """How many parts a batch splits into (`batch_sharding`): every batch size must divide by it."""
  return int(np.prod([mesh.shape[a] for a in ("data", "model") if a in mesh.axis_names]))


def fsdp_spec(shape: Sequence[int], size: int, *, skip_leading: bool) -> P:
  """The PartitionSpec that splits an array of `shape` over 'model' along its largest axis that
  divides by `size` (the leading task axis of a factor stack excluded); P() when none does (biases
  and norms of odd sizes stay replicated)."""
  axes = [i for i in range(1 if skip_leading else 0, len(shape)) if shape[i] % size == 0]
  if not axes or size == 1:
    return P()
  axis = max(axes, key=lambda i: (shape[i], -i))
  return P(*([None] * axis), "model")


def check_same_on_every_process(tree: Any, what: str) -> None:
  """Raises ValueError, naming the leaves, where the processes of a run hold different values of
  `tree` (host arrays that every process computed itself and that are about to be placed on a mesh
  spanning them all: each process would give its own values for its shards, a silent mix).
  Compares sha256 digests of the leaves, not the leaves; nothing to do for one process."""
  if jax.process_count() == 1:
    return
  sums = tree_util.checksums(tree)
  if sums is None:  # already global arrays: one value by construction
    return
  names = sorted(sums)
  digests = np.stack([np.frombuffer(bytes.fromhex(sums[n]["sha256"]), np.uint8) for n in names])
  every = multihost_utils.process_allgather(digests)  # (processes, leaves, 32)
  differ = [n for i, n in enumerate(names) if (every[:, i] != every[0, i]).any()]
  if differ:
    raise ValueError(
      f"{what}: {len(differ)} of {len(names)} arrays differ between the {jax.process_count()} processes "
      f"(e.g. {', '.join(differ[:3])}). Every host must compute the same values: the same checkpoints, "
      "the same library versions; hosts with different CPUs may round the SVD differently."
    )


def place_frozen(
  frozen: tuple[Any, Any], mesh: Mesh, *, factor_placement: str = "replicated"
) -> tuple[Any, Any]:
  """Puts (origin, factors) on `mesh`.

  'replicated': both replicated. 'task': the origin replicated; every factor array (u, s, vt and dense
  task vectors) split along its leading task axis, which must divide evenly by the mesh's 'task' size.
  'fsdp': every array of both split over 'model' along one axis (`fsdp_spec`). In a run of several
  processes, every process must hold the same (origin, factors) (`check_same_on_every_process`).
  """
  if factor_placement not in FACTOR_PLACEMENTS:
    raise ValueError(
      f"place_frozen: factor_placement={factor_placement!r}; expected one of {FACTOR_PLACEMENTS}"
    )
  needs = {"task": "task", "fsdp": "model"}.get(factor_placement)
  if needs and needs not in mesh.axis_names:
    raise ValueError(
      f"place_frozen: factor_placement={factor_placement!r} needs a mesh with a {needs!r} axis; got axes "
      f"{mesh.axis_names}"
    )
  check_same_on_every_process(frozen, "place_frozen: (origin, factors)")
  origin, factors = frozen
  replicated = NamedSharding(mesh, P())
  if factor_placement == "fsdp":
    size = mesh.shape["model"]
    put = lambda tree, skip: jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(np.shape(x), size, skip_leading=skip))), tree
    )
    return put(origin, False), put(factors, True)
  if factor_placement == "replicated":
    factor_sharding = replicated
  else:
    shards = mesh.shape["task"]
    bad = sorted({np.shape(x)[0] for x in jax.tree.leaves(factors) if np.shape(x)[0] % shards})
    if bad:
      raise ValueError(
        f"place_frozen: task counts {bad} do not divide over the mesh's 'task' axis of size {shards}"
      )
    factor_sharding = NamedSharding(mesh, P("task"))
  return jax.device_put(origin, replicated), jax.device_put(factors, factor_sharding)


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
  """Replicates the trainable state on `mesh`; cached deltas keep the placement of the factors."""
  placed = jax.device_put(state._replace(deltas=None), NamedSharding(mesh, P()))
  return placed._replace(deltas=state.deltas)


def place_batches(batches: Any, mesh: Mesh) -> Any:
  """Splits every leaf of every task's batch along its leading (batch) axis (`batch_sharding`). Each
  process gives its part (`batch_shard`); the global batch is the parts of all processes in order."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batches)
