"""The method table: every merging method a run can ask for, what it needs, and how it is made.

Validation, the run, the config docs and the README's method list all read `METHODS`. A static
method's hyperparameters are the keyword arguments of its function, set in the config under
`config.merge.<name>` with the same names (`config.merge.ties.density` feeds `baselines.ties(...,
density=...)`); AdaRank's live under `config.adarank.<base>`.

Inputs a method needs (`Method.needs`):
  'pretrained'  theta_0 alone                       'finetuned'  the T fine-tuned trees
  'tau'         theta_0 and tau_t = theta_t - theta_0
  'factors'     theta_0 and the SVD factors of tau_t (the decomposed matrices; dense elsewhere)
  'cart'        theta_avg and the SVD factors of the centred tau_t = theta_t - theta_avg
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from adarank_jax import baselines
from adarank_jax import task_vectors

NEEDS = ('pretrained', 'finetuned', 'tau', 'factors', 'cart')
# Where the task vectors of each kind of input start from (task_vectors.task_vectors' origin).
ORIGIN_OF = {'tau': 'pretrained', 'factors': 'pretrained', 'cart': 'average'}


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the method table.

  Attributes:
    name: the name in `config.methods` and in the results.
    summary: one line for the README and the docs.
    needs: which inputs it is made from (see the module doc).
    merge: the function that makes its param tree: `merge(*inputs, **hyperparameters)`; None for the
      rows the run makes itself (`individual`, the trained methods).
    trains: learns on unlabeled test data (AdaRank's masks and coefficients).
  """
  name: str
  summary: str
  needs: str
  merge: Callable[..., Any] | None = None
  trains: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method('zero_shot', 'the pretrained model', 'pretrained', baselines.zero_shot),
    Method('individual', "each task's own fine-tuned model (the upper reference)", 'finetuned'),
    Method('weight_averaging', 'mean_t theta_t', 'finetuned', task_vectors.weight_average),
    Method('task_arithmetic', 'theta_0 + scaling * sum_t tau_t (Ilharco et al., 2023)', 'tau',
           baselines.task_arithmetic),
    Method('ties', 'TIES-merging: trim, elect sign, disjoint mean or sum (Yadav et al., 2023)', 'tau',
           baselines.ties),
    Method('cart', 'theta_avg + scaling * sum_t top-k SVD of the centred tau_t (Choi et al., 2024)',
           'cart', baselines.cart),
    Method('tsv_m', 'Task Singular Vectors merge: top r/T of each task, whitened (Gargiulo et al., '
           '2025)', 'factors', baselines.tsv_m),
    Method('iso_c', 'isotropic spectrum of the summed task matrix (Marczak et al., 2025)', 'factors',
           baselines.iso_c),
    Method('iso_cts', 'Iso-C with common and task-specific subspaces (Marczak et al., 2025)',
           'factors', baselines.iso_cts),
    Method('adarank_ta', 'AdaRank on Task Arithmetic: learned masks and coefficients (Lee et al., '
           '2025)', 'factors', trains=True),
    Method('adarank_cart', 'AdaRank on CART: learned masks and coefficients (Lee et al., 2025)', 'cart',
           trains=True),
)}

STATIC = tuple(name for name, m in METHODS.items() if m.merge is not None)


def get(name: str) -> Method:
  """The table's row for `name`; a clear error for an unknown one."""
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; choose from {", ".join(METHODS)}')
  return METHODS[name]
