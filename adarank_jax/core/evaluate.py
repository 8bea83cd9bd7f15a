"""Evaluation over padded, masked batches: top-1 accuracy, Matthews correlation, normalized scores, and
for generative tasks a causal LM's next-token entropy and perplexity (`language_model_scores`).

Evaluators see only a `predict_fn` (big_vision style): a jitted function the caller builds, from the batch
inputs to logits. They never touch the model, and `predict_fn` never sees the labels.

A batch is a dict of numpy arrays with FIXED shapes. Two keys are reserved:
  'label': (B,) int class indices.
  'mask':  (B,) 1 for real rows, 0 for padding rows (the last batch of a split is padded to B).
Every other key is an input and goes to `predict_fn` as a dict, e.g. {'image': (B, H, W, 3)} or
{'input_ids': (B, L), 'attention_mask': (B, L)}. Shapes and dtypes must be the same in every batch, so
`predict_fn` compiles once per task; a batch that differs raises BatchError instead of recompiling.

Per batch only the argmax predictions (B,) come back to the host, and the counts are kept in a (C, C)
confusion matrix (rows true class, columns predicted class). Both metrics are functions of that matrix.
Scores are fractions: accuracy in [0, 1], Matthews correlation in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LABEL_KEY = "label"
MASK_KEY = "mask"
AVERAGE_KEY = "average"  # the mean over tasks, stored beside the task scores

PredictFn = Callable[[dict[str, Any]], jax.Array]


class BatchError(ValueError):
  """A batch lacks a reserved key, has labels out of range, or differs in shape from the first batch."""


def confusion_matrix(
  labels: np.ndarray, predictions: np.ndarray, num_classes: int, mask: np.ndarray | None = None
) -> np.ndarray:
  """Counts of (true, predicted) pairs over the real rows.

  Args:
    labels: (B,) int true classes in [0, num_classes).
    predictions: (B,) int predicted classes in [0, num_classes).
    num_classes: C.
    mask: optional (B,); rows where mask > 0 count, the rest (padding) are ignored.

  Returns:
    (C, C) int64 array, [true, predicted].
  """
  labels = np.asarray(labels).reshape(-1)
  predictions = np.asarray(predictions).reshape(-1)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels have shape {labels.shape} but predictions {predictions.shape}")
  if mask is not None:
    mask = np.asarray(mask).reshape(-1)
    if mask.shape != labels.shape:
      raise ValueError(f"mask has shape {mask.shape}, expected {labels.shape} like the labels")
    keep = mask > 0
    labels, predictions = labels[keep], predictions[keep]
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(
        f"{name} must lie in [0, {num_classes}), got values in [{values.min()}, {values.max()}]"
      )
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
  return confusion


def _check_nonempty(confusion: np.ndarray) -> None:
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"a confusion matrix must be square (C, C), got shape {confusion.shape}")
  if confusion.sum() == 0:
    raise ValueError("the confusion matrix is empty: no real (mask=1) rows were evaluated")


def accuracy(confusion: np.ndarray) -> float:
  """Top-1 accuracy = correct / real rows, from a (C, C) confusion matrix."""
  confusion = np.asarray(confusion)
  _check_nonempty(confusion)
  return float(np.trace(confusion) / confusion.sum())


def matthews_corrcoef(confusion: np.ndarray) -> float:
  """Matthews correlation for binary or multi-class labels (Gorodkin's R_K), from a (C, C) confusion matrix.

  The general formula of sklearn.metrics.matthews_corrcoef, computed the same way (float64):
    (c*s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)),
  with t = true-class counts, p = predicted-class counts, c = correct, s = total; 0.0 when the
  denominator is 0 (all labels or all predictions in one class). For C = 2 it equals the binary
  (TP*TN - FP*FN) / sqrt(...) formula.
  """
  confusion = np.asarray(confusion)
  _check_nonempty(confusion)
  t_sum = confusion.sum(axis=1, dtype=np.float64)
  p_sum = confusion.sum(axis=0, dtype=np.float64)
  n_correct = np.trace(confusion, dtype=np.float64)
  n_samples = p_sum.sum()
  cov_ytyp = n_correct * n_samples - np.dot(t_sum, p_sum)
  cov_ypyp = n_samples**2 - np.dot(p_sum, p_sum)
  cov_ytyt = n_samples**2 - np.dot(t_sum, t_sum)
  denominator = cov_ypyp * cov_ytyt
  if denominator == 0:
    return 0.0
  return float(cov_ytyp / np.sqrt(denominator))


METRICS: dict[str, Callable[[np.ndarray], float]] = {"accuracy": accuracy, "matthews": matthews_corrcoef}


def _metric_fn(metric: str, task: str | None = None) -> Callable[[np.ndarray], float]:
  if metric not in METRICS:
    where = f" for task {task!r}" if task is not None else ""
    raise ValueError(f"unknown metric {metric!r}{where}; expected one of {sorted(METRICS)}")
  return METRICS[metric]


def average(scores: Mapping[str, float]) -> float:
  """Plain mean of the task scores (the AVERAGE_KEY entry, if present, is not a task and is skipped)."""
  values = [float(v) for task, v in scores.items() if task != AVERAGE_KEY]
  if not values:
    raise ValueError("no task scores to average")
  return float(np.mean(values))


def normalized_scores(
  scores: Mapping[str, float], individual: Mapping[str, float]
) -> dict[str, float | None]:
  """Normalized score = merged / individual (fine-tuned) score, per task and on average.

  The average is the mean of the per-task ratios (not the ratio of the mean scores), as in the
  model-merging literature.

  Args:
    scores: task -> merged-model score; an AVERAGE_KEY entry is ignored.
    individual: task -> score of that task's own fine-tuned model; must cover every task of `scores`.

  Returns:
    {task: ratio, ..., AVERAGE_KEY: mean ratio}, tasks in the order of `scores`. A task whose individual
    score is <= 0 (a Matthews correlation can be) has no meaningful ratio: its entry is None and the
    average is taken over the other tasks (None if there are none).
  """
  ratios = {}
  for task, value in scores.items():
    if task == AVERAGE_KEY:
      continue
    if task not in individual:
      raise ValueError(f"no individual (fine-tuned) score for task {task!r}; have {sorted(individual)}")
    reference = float(individual[task])
    ratios[task] = float(value) / reference if reference > 0 else None
  defined = {task: ratio for task, ratio in ratios.items() if ratio is not None}
  ratios[AVERAGE_KEY] = average(defined) if defined else None
  return ratios


@jax.jit
def _argmax(logits: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1)


def _signature(batch: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
  """key -> (shape, dtype); read from the array objects, so device arrays are not copied to the host."""
  return {key: (tuple(value.shape), str(value.dtype)) for key, value in batch.items()}


def _check_batch(
  index: int, batch: Mapping[str, Any], expected: dict[str, tuple[tuple[int, ...], str]] | None
) -> None:
  for key in (LABEL_KEY, MASK_KEY):
    if key not in batch:
      raise BatchError(f"batch {index} has no {key!r} key; keys are {sorted(batch)}")
  for key, value in batch.items():
    if not isinstance(value, (np.ndarray, jax.Array)):
      raise BatchError(f"batch {index}: {key!r} is a {type(value).__name__}, expected a numpy array")
  rows = np.shape(batch[MASK_KEY])
  if len(rows) != 1 or np.shape(batch[LABEL_KEY]) != rows:
    raise BatchError(
      f"batch {index}: {LABEL_KEY!r} and {MASK_KEY!r} must both have shape (B,), got "
      f"{np.shape(batch[LABEL_KEY])} and {rows}"
    )
  if expected is None:
    return
  actual = _signature(batch)
  if actual != expected:
    diffs = [
      f"{k!r}: {actual.get(k)} vs {expected.get(k)}"
      for k in sorted(set(actual) | set(expected))
      if actual.get(k) != expected.get(k)
    ]
    raise BatchError(
      f"batch {index} differs from batch 0 in (shape, dtype): {'; '.join(diffs)}. Pad every "
      f"batch to the same shape and mark padding rows with {MASK_KEY}=0, so that predict_fn "
      "compiles once"
    )


def _fetch_counts(
  predictions: jax.Array, labels: np.ndarray, mask: np.ndarray, index: int, *, num_classes: int
) -> np.ndarray:
  """Brings one batch's (B,) predictions to the host and counts its real rows."""
  try:
    return confusion_matrix(labels, np.asarray(jax.device_get(predictions)), num_classes, mask)
  except ValueError as error:
    raise BatchError(f"batch {index}: {error}") from error


def accumulate_confusion(predict_fn: PredictFn, batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
  """Runs `predict_fn` over all batches and counts (true, argmax) pairs of the real rows.

  Dispatch is asynchronous: batch i+1 is sent to the device before batch i's predictions (B,) are fetched.

  Args:
    predict_fn: jitted; dict of the non-reserved batch arrays -> logits (B, C).
    batches: iterable of dicts with fixed shapes (see the module docstring).

  Returns:
    (C, C) int64 confusion matrix [true, predicted].
  """
  confusion = None
  signature = None
  pending = None  # (device predictions, labels, mask, batch index) of the previous batch
  for index, batch in enumerate(batches):
    _check_batch(index, batch, signature)
    if signature is None:
      signature = _signature(batch)
    inputs = {k: v for k, v in batch.items() if k not in (LABEL_KEY, MASK_KEY)}
    logits = predict_fn(inputs)
    rows = np.shape(batch[MASK_KEY])[0]
    if logits.ndim != 2 or logits.shape[0] != rows:
      raise BatchError(
        f"batch {index}: predict_fn returned logits of shape {logits.shape}, expected ({rows}, num_classes)"
      )
    if confusion is None:
      confusion = np.zeros((logits.shape[-1],) * 2, np.int64)
    predictions = _argmax(logits)
    if pending is not None:
      confusion += _fetch_counts(*pending, num_classes=confusion.shape[0])
    pending = (predictions, np.asarray(batch[LABEL_KEY]), np.asarray(batch[MASK_KEY]), index)
  if pending is None:
    raise BatchError("no batches to evaluate")
  confusion += _fetch_counts(*pending, num_classes=confusion.shape[0])
  return confusion


def evaluate_task(
  predict_fn: PredictFn,
  batches: Iterable[Mapping[str, Any]],
  *,
  metric: str,
  combine: Callable[[np.ndarray], np.ndarray] | None = None,
) -> float:
  """One task's score over all real rows of `batches`.

  Args:
    predict_fn: jitted; dict of the non-reserved batch arrays -> logits (B, C).
    batches: iterable of dicts of numpy arrays with fixed shapes, with 'label' (B,) and 'mask' (B,).
    metric: a METRICS name: 'accuracy' or 'matthews' (Matthews correlation, e.g. CoLA).
    combine: this process's confusion matrix -> the sum over every process's, when each process of a
      run sees only its part of every batch; None: the counts are this process's alone.

  Returns:
    The score as a fraction (accuracy in [0, 1], Matthews correlation in [-1, 1]).
  """
  metric_fn = _metric_fn(metric)
  confusion = accumulate_confusion(predict_fn, batches)
  return metric_fn(confusion if combine is None else combine(confusion))


# ------------------------------------------------------------------------------------------------
# Generative tasks: label-free scores of a causal LM on a task's prompts.

SumsFn = Callable[[dict[str, Any]], Mapping[str, jax.Array]]


def language_model_scores(sums_fn: SumsFn, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """A causal LM's label-free scores over all batches of a task's prompts.

  Args:
    sums_fn: jitted; the batch's inputs (input_ids, attention_mask) -> the sums of
      `objectives.next_token_sums` over the batch (replicated scalars). Padding rows (`mask` 0) must
      have an all-zero attention mask, as the data pipeline pads them, so they add nothing.
    batches: dicts of fixed-shape numpy arrays with 'mask' (B,) and the inputs.

  Returns:
    next_token_entropy: sum of the next-token entropies over every non-pad position / their number
      (nats; the objective's definition over the whole pass, not a mean of batch means);
    perplexity: exp(the summed negative log-likelihood of every token after a prompt's first / their
      number); positions, targets: the counts behind them.
  """
  pending = []
  for index, batch in enumerate(batches):
    if MASK_KEY not in batch:
      raise BatchError(f"batch {index} has no {MASK_KEY!r} key; keys are {sorted(batch)}")
    pending.append(sums_fn({k: v for k, v in batch.items() if k not in (LABEL_KEY, MASK_KEY)}))
  if not pending:
    raise BatchError("no batches to evaluate")
  total = {key: 0.0 for key in pending[0]}
  for sums in pending:
    for key, value in sums.items():
      value = value.addressable_data(0) if isinstance(value, jax.Array) else value
      total[key] += float(np.asarray(value, np.float64))
  if total["targets"] == 0:
    raise BatchError("no prompt has two tokens: there is no next token to score")
  return {
    "next_token_entropy": total["entropy_sum"] / total["positions"],
    "perplexity": float(np.exp(total["nll_sum"] / total["targets"])),
    "positions": int(total["positions"]),
    "targets": int(total["targets"]),
  }
