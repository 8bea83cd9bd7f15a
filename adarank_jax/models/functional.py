"""Functional view of NNX modules: (graphdef, params) in, outputs out.

`split` turns a module into a static `graphdef` and a pure nested dict of
parameter arrays (the canonical param tree of the project: str keys, int keys
for `nnx.List` items). `call` rebuilds the module from the two and calls one
of its methods; it has no side effects, so it can be wrapped in `jax.jit`
(with `graphdef` static), `jax.grad` or `jax.vmap`:

  graphdef, params = functional.split(model)
  apply = jax.jit(functools.partial(functional.call, graphdef))
  features = apply(params, images)
"""

from typing import Any

from flax import nnx


def split(module: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """Splits `module` into its static graph and a pure dict of its params.

  Args:
    module: an NNX module whose only state is `nnx.Param` variables.

  Returns:
    `(graphdef, params)`; `params` is a nested dict of arrays as given by
    `nnx.to_pure_dict`, e.g. {"conv1": {"kernel": (p, p, 3, width)}, ...}.

  Raises:
    ValueError: the module holds state other than `nnx.Param` (batch
      statistics, RNG streams, caches), which `call` could not rebuild.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rest_paths = ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
  if rest_paths:
    raise ValueError(
      f"functional.split supports modules whose only state is nnx.Param; "
      f"{type(module).__name__} also has non-Param state at {rest_paths}."
    )
  return graphdef, nnx.to_pure_dict(params)


def call(
  graphdef: nnx.GraphDef, params: dict[str, Any], *args: Any, method: str = "__call__", **kwargs: Any
) -> Any:
  """Rebuilds the module from `graphdef` and `params`, then calls `method`.

  Pure and jittable: `params` may be traced arrays. The structure of
  `params` must match the one `split` returned for `graphdef`.

  Args:
    graphdef: the static graph from `split` (hashable; make it static or
      close over it under `jax.jit`).
    params: nested dict of arrays with the structure `split` returned.
    *args: positional arguments of the method.
    method: name of the module method to call.
    **kwargs: keyword arguments of the method.

  Returns:
    Whatever the method returns.
  """
  module = nnx.merge(graphdef, params)
  return getattr(module, method)(*args, **kwargs)
