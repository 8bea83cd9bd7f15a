"""What a run leaves behind: results.json, a markdown table, the rank heatmap and the metric logs.

Results are a plain, JSON-ready dict (see `Results`). Scores are fractions (accuracy in [0, 1], Matthews
correlation in [-1, 1]); the markdown shows them in % with one decimal. Files are written atomically
(a temporary file in the same directory, then os.replace), so a crash never leaves half a results.json.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from adarank_jax.core import evaluate
from adarank_jax.storage import files

SELECTION_FINAL = "final step"
SELECTION_ORACLE = (
  "best average test accuracy over evaluation points (oracle: selected on the labelled test set)"
)
SELECTION_VALIDATION = (
  "best average accuracy over evaluation points on labelled validation splits "
  "held out of the tasks' training data"
)
# config.adarank.selection -> how results.json and results.md describe it.
SELECTION_OF = {"final": SELECTION_FINAL, "oracle": SELECTION_ORACLE, "validation": SELECTION_VALIDATION}
SELECTIONS = tuple(SELECTION_OF.values())
# What a run's scores are: the task metrics (fractions, higher is better), or for generative tasks the
# perplexity of each task's evaluation prompts (lower is better; results["metrics"] holds the rest).
SCORE = "score"
PERPLEXITY = "perplexity"
METRICS = (SCORE, PERPLEXITY)
INDIVIDUAL_ROW = "individual"  # the fine-tuned reference row of the tables
MAX_ANNOTATED_CELLS = 400  # the heatmap writes the count in each cell up to this many cells


class _Required(TypedDict):
  """The keys every Results has (see Results)."""

  name: str
  model: str
  tasks: list[str]
  selection: str
  steps: dict[str, int]
  selected_steps: dict[str, int]
  methods: dict[str, dict[str, float]]
  individual: dict[str, float]
  timings_s: dict[str, float]


class Results(_Required, total=False):
  """A run's results; a plain dict that json.dump writes as is. Scores are fractions.

  name: the config name.  model: e.g. "ViT-B-32".  tasks: the task names, in table order.
  selection: how the reported AdaRank step was chosen, one of SELECTIONS.
  steps: trained method -> optimization steps of its run (empty when nothing was trained).
  selected_steps: trained method -> the step of its reported model (the last one for "final").
  methods: method -> task -> score, in the order the methods were run; the caller fills it
    (`results["methods"][method] = scores`).
  individual: task -> score of the task's own fine-tuned model, the reference of the normalized
    scores; empty when the fine-tuned models were not evaluated.
  timings_s: what -> seconds, e.g. {"load_s": 3.1, "adarank_ta_s": 600.0}.
  metric: what the scores are, one of METRICS (absent: SCORE).
  metrics: generative runs: method -> task -> every metric of `evaluate.language_model_scores`
    (next_token_entropy, perplexity, positions, targets); "individual" included.
  """

  metric: str
  metrics: dict[str, dict[str, dict[str, float]]]


def new_results(
  *,
  name: str,
  tasks: Sequence[str],
  model: str,
  selection: str,
  steps: Mapping[str, int] | None = None,
  metric: str = SCORE,
) -> Results:
  """An empty Results (no methods, no individual scores yet)."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
  if evaluate.AVERAGE_KEY in tasks or len(set(tasks)) != len(tasks):
    raise ValueError(f"tasks must be distinct and not {evaluate.AVERAGE_KEY!r}, got {list(tasks)}")
  results = Results(
    name=name,
    model=model,
    tasks=list(tasks),
    selection=selection,
    steps={k: int(v) for k, v in (steps or {}).items()},
    selected_steps={},
    methods={},
    individual={},
    timings_s={},
  )
  if metric != SCORE:
    results.update(metric=metric, metrics={})
  return results


def _to_json(value: Any) -> Any:
  """json.dump's fallback for numpy / jax scalars and arrays."""
  if isinstance(value, np.generic) or (hasattr(value, "__array__") and np.ndim(value) == 0):
    return np.asarray(value).item()
  if hasattr(value, "__array__"):
    return np.asarray(value).tolist()
  raise TypeError(f"cannot write a {type(value).__name__} to JSON: {value!r}")


def _write_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
  """Calls write(tmp_path) for a temporary file next to `path`, then renames it over `path` (files.py)."""
  files.write_atomic(path, write)


def write_results_json(path: str | os.PathLike[str], results: Results) -> None:
  """Writes `results` as indented strict JSON (NaN/Inf are an error), atomically."""
  try:
    text = json.dumps(results, indent=2, default=_to_json, allow_nan=False)
  except ValueError as error:
    raise ValueError(f"{path}: results hold a NaN or Inf and cannot be written as JSON ({error})") from error
  files.write_atomic(path, text + "\n")


def read_results_json(path: str | os.PathLike[str]) -> Results:
  """Reads a file written by write_results_json."""
  results = files.read_json(path)
  if not isinstance(results, Mapping):
    raise ValueError(f"{path}: not a results file, expected a JSON object")
  missing = sorted(set(Results.__required_keys__) - set(results))
  if missing:
    raise ValueError(f"{path}: not a results file, missing keys {missing}")
  return results


def _percent(value: float | None) -> str:
  return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _finite(value: Any) -> bool:
  try:
    return math.isfinite(float(value))
  except (TypeError, ValueError):
    return False


def _normalized(scores: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float | None]:
  """evaluate.normalized_scores, but a task whose score or individual score is not finite (NaN, Inf) has no
  ratio (None, shown "n/a"), and the average covers only the finite ratios."""
  finite_scores = {t: v for t, v in scores.items() if _finite(v) and _finite(individual.get(t))}
  normalized = evaluate.normalized_scores(finite_scores, individual)
  ratios = {t: (normalized.get(t) if t in finite_scores else None) for t in scores}
  ratios = {t: (r if r is not None and _finite(r) else None) for t, r in ratios.items()}
  defined = [r for r in ratios.values() if r is not None]
  ratios[evaluate.AVERAGE_KEY] = float(np.mean(defined)) if defined else None
  return ratios


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def markdown_table(results: Results, tasks: Sequence[str] | None = None) -> str:
  """Markdown tables in %, one decimal; rows: "individual" (if evaluated), then the methods in run order.

  1. Scores: columns are the tasks and "Avg." (mean of the task scores), plus "Norm. avg." (mean of the
     per-task ratios merged / individual) when the individual scores are there.
  2. Normalized scores (only with individual scores): the per-task ratios merged / individual, and their mean.

  Args:
    results: see Results.
    tasks: the columns; by default results["tasks"].
  """
  tasks = list(results["tasks"] if tasks is None else tasks)
  individual = results["individual"]
  if INDIVIDUAL_ROW in results["methods"]:
    raise ValueError(f"{INDIVIDUAL_ROW!r} cannot name a method: it is the row of results['individual']")
  rows = {INDIVIDUAL_ROW: individual, **results["methods"]} if individual else dict(results["methods"])
  for method, scores in rows.items():
    missing = [task for task in tasks if task not in scores]
    if missing:
      raise ValueError(f"results for {method!r} lack tasks {missing}; have {sorted(scores)}")
  if results.get("metric", SCORE) == PERPLEXITY:
    return _generative_tables(results, rows, tasks)
  score_rows, normalized_rows = [], []
  for method, scores in rows.items():
    own = {task: scores[task] for task in tasks}
    score_rows.append([method] + [_percent(own[t]) for t in tasks] + [_percent(evaluate.average(own))])
    if individual:
      normalized = _normalized(own, individual)
      score_rows[-1].append(_percent(normalized[evaluate.AVERAGE_KEY]))
      if method != INDIVIDUAL_ROW:
        normalized_rows.append(
          [method] + [_percent(normalized[t]) for t in tasks] + [_percent(normalized[evaluate.AVERAGE_KEY])]
        )
  if not individual:
    return "Scores (%)\n\n" + _table(["Method", *tasks, "Avg."], score_rows) + "\n"
  return (
    "Scores (%)\n\n"
    + _table(["Method", *tasks, "Avg.", "Norm. avg."], score_rows)
    + "\n\nNormalized scores (% of the individual fine-tuned model)\n\n"
    + _table(["Method", *tasks, "Avg."], normalized_rows)
    + "\n"
  )


def _number(value: float | None, digits: int) -> str:
  return "n/a" if value is None or not _finite(value) else f"{value:.{digits}f}"


def _generative_tables(results: Results, rows: Mapping[str, Mapping[str, float]], tasks: list[str]) -> str:
  """Generative runs: the perplexity of each task's evaluation prompts, and the mean next-token entropy
  on them (the objective; nats), two decimals and three; lower is better in both, and no ratio to the
  individual models is taken (a lower merged perplexity would read as a score below 100%)."""
  metrics = results.get("metrics", {})
  perplexity = [
    [m] + [_number(s[t], 2) for t in tasks] + [_number(evaluate.average(s), 2)] for m, s in rows.items()
  ]
  entropy = []
  for method in rows:
    values = [metrics.get(method, {}).get(t, {}).get("next_token_entropy") for t in tasks]
    known = [v for v in values if v is not None]
    entropy.append(
      [method] + [_number(v, 3) for v in values] + [_number(np.mean(known) if known else None, 3)]
    )
  return (
    "Perplexity of each task's evaluation prompts (lower is better)\n\n"
    + _table(["Method", *tasks, "Avg."], perplexity)
    + "\n\nMean next-token entropy on them (nats; the objective AdaRank minimises)\n\n"
    + _table(["Method", *tasks, "Avg."], entropy)
    + "\n"
  )


def write_markdown(path: str | os.PathLike[str], results: Results) -> None:
  """Writes results.md: name, model, how the step was selected, steps and timings, then markdown_table."""
  if not isinstance(results, Mapping):
    raise TypeError(
      f"write_markdown({str(path)!r}, ...) takes the Results dict (it renders the metadata and "
      f"the tables itself), got a {type(results).__name__}"
    )
  timings = ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()) or "not recorded"
  selected = results["selected_steps"]
  steps = (
    ", ".join(
      f"{k} {v}" + (f" (reported: step {selected[k]})" if selected.get(k, v) != v else "")
      for k, v in results["steps"].items()
    )
    or "none (no training)"
  )
  header = (
    f"# {results['name']}\n\n"
    f"- model: {results['model']}\n"
    f"- selection: {results['selection']}\n"
    f"- steps: {steps}\n"
    f"- timings (s): {timings}\n"
  )
  if results["individual"] and results.get("metric", SCORE) == SCORE:
    header += "- normalized = merged / individual per task; the normalized average is the mean of ratios\n"
  header += "\n"
  files.write_atomic(path, header + markdown_table(results))


def _short_labels(paths: Sequence[str]) -> list[str]:
  """Drops the "/"-components shared by all paths at the start (e.g. "transformer/resblocks/")."""
  parts = [p.split("/") for p in paths]
  common = 0
  while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
    common += 1
  return ["/".join(p[common:]) for p in parts]


def layer_order(paths: Iterable[str]) -> list[str]:
  """Paths sorted with numeric parts compared as numbers: "resblocks/2/..." before "resblocks/10/..."."""

  def key(path):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split("/")]

  return sorted(paths, key=key)


def rank_heatmap(
  kept: Mapping[str, Any],
  task_names: Sequence[str],
  path: str | os.PathLike[str],
  *,
  layer_names: Sequence[str] | None = None,
  title: str = "Kept singular components (mask logit > 0)",
) -> np.ndarray:
  """Writes a PNG heatmap of how many singular components each task keeps in each decomposed layer.

  Rows are layers, columns tasks; the counts are written in the cells when there are at most
  MAX_ANNOTATED_CELLS of them. This is the paper's rank analysis.

  Args:
    kept: flat {layer_path: (T,) counts} (`masking.kept_counts`).
    task_names: T names, left to right.
    path: the PNG file (written atomically).
    layer_names: the layers to plot, top to bottom (keys of `kept`); by default all of them in
      `layer_order` (block by block).
    title: figure title.

  Returns:
    (L, T) int64 count matrix, rows in layer_names order, columns in task order.
  """
  layer_names = layer_order(kept) if layer_names is None else list(layer_names)
  missing = [name for name in layer_names if name not in kept]
  if missing:
    raise ValueError(f"layers {missing} are not in the counts; they have {sorted(kept)}")
  if not layer_names:
    raise ValueError("no layers to plot: the counts or layer_names are empty")
  counts = np.stack([np.asarray(kept[name], np.int64) for name in layer_names])
  if counts.ndim != 2 or counts.shape[1] != len(task_names):
    raise ValueError(
      f"kept counts of shape {counts.shape[1:]} per layer; expected ({len(task_names)},), one per task "
      "row, the same in every layer"
    )

  num_layers, num_tasks = counts.shape
  fig = Figure(figsize=(max(6.0, 2.0 + 0.8 * num_tasks), 1.5 + 0.3 * num_layers), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
  ax.set_xticks(range(num_tasks), labels=list(task_names), rotation=45, ha="right")
  ax.set_yticks(range(num_layers), labels=_short_labels(list(layer_names)))
  ax.set_xlabel("task")
  ax.set_ylabel("layer")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="kept components")
  if counts.size <= MAX_ANNOTATED_CELLS:
    middle = (counts.min() + counts.max()) / 2
    for (row, col), count in np.ndenumerate(counts):
      ax.text(
        col,
        row,
        str(count),
        ha="center",
        va="center",
        fontsize=7,
        color="black" if count > middle else "white",
      )
  _write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  return counts


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a file written by write_jsonl; a torn last record is dropped with a warning naming the
  file, a corrupt one elsewhere is an error naming it (files.read_jsonl)."""
  return files.read_jsonl(path)


def write_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
  """Appends `record` as one JSON line (numpy/jax scalars become numbers; NaN is written as NaN)."""
  line = json.dumps(record, default=_to_json)
  with open(path, "ab+") as f:
    end = f.seek(0, os.SEEK_END)
    if end:
      f.seek(end - 1)
      if f.read(1) != b"\n":  # a torn last record of a killed run: cut it, or this line would join it
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
        warnings.warn(f"{path}: dropped a torn last record (a killed run was writing it)", stacklevel=2)
    f.seek(0, os.SEEK_END)
    f.write((line + "\n").encode("utf-8"))


class MetricWriter:
  """Scalars to workdir/metrics.jsonl (one JSON object per call) and TensorBoard (workdir/tensorboard).

  Usage: `with MetricWriter(workdir) as writer: writer.scalars(step, {"loss": 0.3})`.
  """

  def __init__(self, workdir: str | os.PathLike[str]):
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = self.workdir / "metrics.jsonl"
    self._tensorboard = _EventFile(self.workdir / "tensorboard")

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Logs {name: scalar} at `step` (values may be numpy or jax scalars; fetch them every N steps)."""
    floats = {}
    for name, value in values.items():
      if np.ndim(value) != 0:
        raise ValueError(f"metric {name!r} at step {step} has shape {np.shape(value)}, expected a scalar")
      floats[name] = float(np.asarray(value))
    wall_time = time.time()
    write_jsonl(self.jsonl_path, {"step": int(step), "wall_time": wall_time, **floats})
    self._tensorboard.scalars(int(step), floats, wall_time)

  def flush(self) -> None:
    self._tensorboard.flush()

  def close(self) -> None:
    self._tensorboard.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class _EventFile:
  """Scalar summaries in a TensorBoard event file, through the `tensorboard` package's own writer (it
  imports neither TensorFlow nor torch)."""

  def __init__(self, logdir: pathlib.Path):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._writer = event_file_writer.EventFileWriter(str(logdir))

  def scalars(self, step: int, values: Mapping[str, float], wall_time: float) -> None:
    summary = self._summary_pb2.Summary(
      value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()]
    )
    self._writer.add_event(self._event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
