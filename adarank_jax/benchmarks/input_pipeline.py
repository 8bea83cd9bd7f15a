"""Input-pipeline throughput: images/s of an evaluation pass and of an adaptation stream.

  python -m adarank_jax.benchmarks.input_pipeline
  python -m adarank_jax.benchmarks.input_pipeline --baseline=/tmp/thread_pool_pipeline.py

Two inputs, both read through the real read path:
  digits   the digits testbed's "Digits" test split (719 in-memory 8x8 images, resized to the testbed's 32 px)
  jpeg224  --images generated 320x256 JPEGs in an image folder, prepared with `data.image_folder` into an
           array_record data set and decoded with PIL on read; preprocessed to CLIP's 224 px

Pipelines: this one (`adarank_jax.data.pipeline`, grain) with `workers` threads, and with `processes`
worker processes; with --baseline, also the pipeline module in that file, on the same inputs (e.g. the
thread-pool pipeline that grain replaced: `git show f2484fc:adarank_jax/data/pipeline.py > FILE`).
Printed: images/s of a whole evaluation pass (its start included: every evaluation starts a new pass),
images/s of --batches adaptation batches after the first, and the seconds to that first batch (worker
start). Each is the median of --repeats runs after one warm-up run, one pipeline after the other.
Images/s depend on the machine's cores and disk: another machine prints other numbers.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image

from adarank_jax.data import image_folder, pipeline, registry
from adarank_jax.data.task import Source

_BASELINE = flags.DEFINE_string(
  "baseline", "", "A pipeline module file to measure as well (see the docstring)."
)
_IMAGES = flags.DEFINE_integer("images", 2048, "Generated JPEGs of the jpeg224 input.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (after one warm-up).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Threads per pipeline (config.data.workers).")
_PROCESSES = flags.DEFINE_integer("processes", 2, "Worker processes of the grain pipeline's second row.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 128, "Evaluation batch size.")
_BATCH = flags.DEFINE_integer("batch", 16, "Adaptation batch size (per task).")
_BATCHES = flags.DEFINE_integer("batches", 64, "Adaptation batches per timed run.")


def _jpeg_source(root: Path, count: int) -> Source:
  """`count` generated 320x256 JPEGs (smooth gradients plus noise, so they compress like photos) in the
  RenderedSST2 image-folder layout, prepared and opened as a tfds data source."""
  rng = np.random.default_rng(0)
  manual = root / "manual" / "rendered_sst2" / "test"
  y, x = np.mgrid[0:256, 0:320]
  for i in range(count):
    folder = manual / ("negative", "positive")[i % 2]
    folder.mkdir(parents=True, exist_ok=True)
    base = np.stack([(x + 7 * i) % 256, (y + 3 * i) % 256, (x + y + i) % 256], -1)
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)
  image_folder.prepare_image_folder("RenderedSST2", root / "data", manual_dir=root / "manual")
  return registry.get("RenderedSST2").open_source(data_dir=root / "data")


def _load_module(path: str) -> ModuleType:
  spec = importlib.util.spec_from_file_location("baseline_pipeline", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _eval_pass(module: ModuleType, source, prepare, **options) -> float:
  """Seconds of one whole evaluation pass."""
  begin = time.perf_counter()
  for _ in module.eval_batches(source, prepare=prepare, batch_size=_EVAL_BATCH.value, **options):
    pass
  return time.perf_counter() - begin


def _adaptation(module: ModuleType, source, prepare, **options) -> tuple[float, float]:
  """(seconds to the first batch, seconds of the next --batches batches) of a new adaptation stream
  (this pipeline's `adaptation_batches`, or a baseline's thread-pool `adaptation_stream`)."""
  make = getattr(module, "adaptation_batches", None) or module.adaptation_stream
  begin = time.perf_counter()
  stream = make(source, prepare=prepare, batch_size=_BATCH.value, seed=0, **options)
  next(stream)
  started = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(stream)
  end = time.perf_counter()
  stream.close()
  return started - begin, end - started


def _medians(run: Callable[..., Any], *args, **options) -> Any:
  """The median of each of `run`'s results over --repeats runs, after a warm-up run."""
  run(*args, **options)  # warm-up: file cache, first decode
  results = [run(*args, **options) for _ in range(_REPEATS.value)]
  if isinstance(results[0], tuple):
    return tuple(statistics.median(r[i] for r in results) for i in range(len(results[0])))
  return statistics.median(results)


def main(argv) -> None:
  del argv
  rows = [("grain, threads", pipeline, {"workers": _WORKERS.value})]
  rows.append(
    (
      f"grain, {_PROCESSES.value} processes",
      pipeline,
      {"workers": _WORKERS.value, "processes": _PROCESSES.value},
    )
  )
  if _BASELINE.value:
    rows.append(
      (
        f"baseline ({Path(_BASELINE.value).name}), threads",
        _load_module(_BASELINE.value),
        {"workers": _WORKERS.value},
      )
    )
  with tempfile.TemporaryDirectory() as tmp:
    inputs = {
      "digits": (registry.get("Digits").open_source(), pipeline.vision_preprocessor(image_size=32)),
      "jpeg224": (_jpeg_source(Path(tmp), _IMAGES.value), pipeline.vision_preprocessor(image_size=224)),
    }
    print(
      f"{'input':8} {'pipeline':40} {'eval images/s':>14} {'adaptation images/s':>20} {'first batch s':>14}"
    )
    for name, (source, prepare) in inputs.items():
      for label, module, options in rows:
        eval_rate = len(source) / _medians(_eval_pass, module, source, prepare, **options)
        first, rest = _medians(_adaptation, module, source, prepare, **options)
        stream_rate = _BATCH.value * _BATCHES.value / rest
        print(f"{name:8} {label:40} {eval_rate:14.0f} {stream_rate:20.0f} {first:14.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
