"""The method table: every merging method a run can ask for, what it needs, and how it is made.

Validation, the run, the config docs and the README's method list all read `METHODS`. A static
method's hyperparameters are the keyword arguments of its function, set in the config under
`config.merge.<name>` with the same names (`config.merge.ties.density` feeds `baselines.ties(...,
density=...)`); a trained method's live in the config section its `Training.section` names
(`config.adarank.ta`, `config.adarank.cart`, `config.adamerging`), and it trains for
`config.<section[0]>.num_steps` steps with the loop settings of `config.adarank` (batch, evaluation,
logging, checkpoints, data fraction).

Inputs a method needs (`Method.needs`):
  'pretrained'  theta_0 alone                       'finetuned'  the T fine-tuned trees
  'tau'         theta_0 and tau_t = theta_t - theta_0
  'factors'     theta_0 and the SVD factors of tau_t (the decomposed matrices; dense elsewhere)
  'cart'        theta_avg and the SVD factors of the centred tau_t = theta_t - theta_avg
  'tsv_m'       theta_0 and TSV-M's per-task whitened components (`baselines.tsv_m_components` of the
                factors)
  'iso_cts'     theta_0 and Iso-CTS's components, one row per task plus one for the common subspace
                (`baselines.iso_cts_components` of the factors)
The components of a static method (`COMPONENTS`) take its config.merge.<name> keywords but `scaling`,
so AdaRank on that base starts from the static method's own configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from adarank_jax.core import baselines, task_vectors

NEEDS = ("pretrained", "finetuned", "tau", "factors", "cart", "tsv_m", "iso_cts")
# Where the task vectors of each kind of input start from (task_vectors.task_vectors' origin).
ORIGIN_OF = {
  "tau": "pretrained",
  "factors": "pretrained",
  "cart": "average",
  "tsv_m": "pretrained",
  "iso_cts": "pretrained",
}
# Static merges as rows of components that AdaRank masks (needs -> function of the factors).
COMPONENTS = {"tsv_m": baselines.tsv_m_components, "iso_cts": baselines.iso_cts_components}


@dataclasses.dataclass(frozen=True)
class Training:
  """How a trained method's state is made and used (train.init_state, train.make_train_step).

  Attributes:
    section: the config keys of its hyperparameters: prior, learning_rate (and, with masks,
      initial_rank_ratio), e.g. ('adarank', 'ta').
    masks: learns masks over the factors' singular components (AdaRank); False: coefficients only,
      over dense task vectors (AdaMerging).
    coefficients: 'tensor' (one lambda per task per tensor) or 'task' (one per task).
    coefficient_range: (low, high) clamp of every lambda in the forward pass, or None.
  """

  section: tuple[str, ...]
  masks: bool
  coefficients: str = "tensor"
  coefficient_range: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the method table.

  Attributes:
    name: the name in `config.methods` and in the results.
    summary: one line for the README and the docs.
    needs: which inputs it is made from (see the module doc).
    merge: the function that makes its param tree: `merge(*inputs, **hyperparameters)`; None for the
      rows the run makes itself (`individual`, the trained methods).
    training: for a method that learns on unlabeled test data, how (see `Training`); None: static.
  """

  name: str
  summary: str
  needs: str
  merge: Callable[..., Any] | None = None
  training: Training | None = None

  @property
  def trains(self) -> bool:
    return self.training is not None


METHODS: dict[str, Method] = {
  m.name: m
  for m in (
    Method("zero_shot", "the pretrained model", "pretrained", baselines.zero_shot),
    Method("individual", "each task's own fine-tuned model (the upper reference)", "finetuned"),
    Method("weight_averaging", "mean_t theta_t", "finetuned", task_vectors.weight_average),
    Method(
      "task_arithmetic",
      "theta_0 + scaling * sum_t tau_t (Ilharco et al., 2023)",
      "tau",
      baselines.task_arithmetic,
    ),
    Method(
      "ties",
      "TIES-merging: trim, elect sign, disjoint mean or sum (Yadav et al., 2023)",
      "tau",
      baselines.ties,
    ),
    Method(
      "cart",
      "theta_avg + scaling * sum_t top-k SVD of the centred tau_t (Choi et al., 2024)",
      "cart",
      baselines.cart,
    ),
    Method(
      "tsv_m",
      "Task Singular Vectors merge: top r/T of each task, whitened (Gargiulo et al., 2025)",
      "factors",
      baselines.tsv_m,
    ),
    Method(
      "iso_c",
      "isotropic spectrum of the summed task matrix (Marczak et al., 2025)",
      "factors",
      baselines.iso_c,
    ),
    Method(
      "iso_cts",
      "Iso-C with common and task-specific subspaces (Marczak et al., 2025)",
      "factors",
      baselines.iso_cts,
    ),
    Method(
      "adamerging_task",
      "AdaMerging, task-wise: one learned lambda in [0, 1] per task over TA (Yang et al., 2024)",
      "tau",
      training=Training(("adamerging",), masks=False, coefficients="task", coefficient_range=(0.0, 1.0)),
    ),
    Method(
      "adamerging_layer",
      "AdaMerging, layer-wise: one learned lambda in [0, 1] per task per tensor over TA (Yang et al., 2024)",
      "tau",
      training=Training(("adamerging",), masks=False, coefficient_range=(0.0, 1.0)),
    ),
    Method(
      "adarank_ta",
      "AdaRank on Task Arithmetic: learned masks and coefficients (Lee et al., 2025)",
      "factors",
      training=Training(("adarank", "ta"), masks=True),
    ),
    Method(
      "adarank_cart",
      "AdaRank on CART: learned masks and coefficients (Lee et al., 2025)",
      "cart",
      training=Training(("adarank", "cart"), masks=True),
    ),
    Method(
      "adarank_tsv_m",
      "AdaRank on TSV-M: masks over each task's whitened TSV-M components "
      "(this library's extension; docs/algorithm.md, section 9)",
      "tsv_m",
      training=Training(("adarank", "tsv_m"), masks=True),
    ),
    Method(
      "adarank_iso_cts",
      "AdaRank on Iso-CTS: masks over each task's specific directions and the "
      "common subspace's (this library's extension; docs/algorithm.md, section 9)",
      "iso_cts",
      training=Training(("adarank", "iso_cts"), masks=True),
    ),
  )
}

STATIC = tuple(name for name, m in METHODS.items() if m.merge is not None)


def get(name: str) -> Method:
  """The table's row for `name`; a clear error for an unknown one."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
  return METHODS[name]
