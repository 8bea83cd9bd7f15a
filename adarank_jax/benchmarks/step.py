"""Times AdaRank's decomposition and training step on random CLIP image towers or decoder LLMs, beside PyTorch.

  python -m adarank_jax.benchmarks.step --arch ViT-B-32 --tasks 8 --batch 4            # adarank_jax alone
  python -m adarank_jax.benchmarks.step --arch ViT-B-32 --tasks 8 --batch 4 --baseline # + the official step
  python -m adarank_jax.benchmarks.step --arch qwen2_0.5b --tasks 4 --batch 4 --seq-len 128 --baseline
  python -m adarank_jax.benchmarks.step --suite cpu        # the README's table, each run in its own process
  python -m adarank_jax.benchmarks.step --suite gpu        # the accelerator table (run it where one is)
  python -m adarank_jax.benchmarks.step --arch ViT-L-14 --tasks 20 --compile-only      # no weights needed

The variant is `--arch`: an OpenCLIP config name or JSON path benchmarks the image tower (`Inputs`), a
decoder shape (a directory name under configs/shapes, such as qwen2_0.5b or llama3_8b, or a directory or
config.json path of a Llama, Mistral or Qwen2 config) its sequence classifier (`DecoderInputs`: one score
head per task read at the last non-pad token, the entropy of its class probabilities, as the CLI's
`load_lm` runs it; `--layers` and `--vocab` shrink the shape).

Pretrained weights are a random init, each "fine-tuned" model adds small Gaussian noise, heads are
random (CLIP: unit vectors times CLIP's logit scale 100; decoders: N(0, 1/hidden) score kernels) and the
inputs random (CLIP: normal pixels; decoders: token ids, right-padded): the cost, not the accuracy, is
measured. `make_inputs` draws them deterministically from a seed, and
`adarank_jax.benchmarks.torch_step` (the official step, re-stated in PyTorch on the open_clip or
transformers model) draws the very same ones, so `--baseline` compares equal computations
(`tests/benchmarks/test_benchmark_torch.py` and `test_benchmark_torch_decoder.py` check that the two give
the same loss and gradients). Each side runs in its own process, so each peak host RSS is its own.

Prints the machine, the decomposition time, the initial state (with cached deltas: their first build), the
first step (compile included), the median step,
host peak RSS and device peak memory where available, and one line `result: {json}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adarank_jax.core import decomposition, layout, task_vectors, train, tree_util
from adarank_jax.core.decomposition import SVD
from adarank_jax.experiment import loading, plan
from adarank_jax.interop import hf_config, openclip_config
from adarank_jax.models import clip, decoder, functional
from configs import common

# The SVD rule of the official code (docs/algorithm.md, section 1) on the Flax image-tower layout.
SVD_PATTERNS = (
  r"transformer/resblocks/\d+/attn/(in_proj|out_proj)/kernel",
  r"transformer/resblocks/\d+/mlp/(c_fc|c_proj)/kernel",
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LOGIT_SCALE = 100.0  # CLIP's logit scale, folded into the benchmark heads
SHAPES = Path(common.__file__).parent / "shapes"  # decoder shapes: <name>/config.json
PAD_ID = 0  # the decoder benchmarks' padding token (never drawn as a real token)

# The README's tables: (label, arguments). The step's layout is chosen as adarank.layout='auto'
# chooses it (every candidate timed, the fastest reported) unless the label fixes it. The official
# configs' windows are 16% and 32% of r. Decoders: 4 tasks, batch 4 x 128 tokens per task.
B32_X8 = ["--arch", "ViT-B-32", "--tasks", "8"]
DECODER_X4 = ["--tasks", "4", "--batch", "4", "--seq-len", "128"]
# The 7-8B rows keep the top-16% window: at full rank one device holds neither side's factors (Llama-3-8B,
# 4 tasks: 156 GB of float32 factors). The memory plan (`--dry_run`, XLA:CPU's buffers; Llama-3-8B, these
# 4 tasks and batches) puts the window's step at 119 GB on one device: an H200's memory, not an H100's.
# The official step has no window: its PyTorch side runs full rank and is expected to fail (its column
# then says why).
LARGE_DECODERS = (("Llama-3-8B", "llama3_8b"), ("Mistral-7B", "mistral_7b"), ("Qwen2-7B", "qwen2_7b"))
SUITES = {
  "cpu": (
    ("B/32 x 8, batch 4", [*B32_X8, "--batch", "4"]),
    ("B/32 x 8, batch 16", [*B32_X8, "--batch", "16"]),
    ("B/32 x 8, batch 4, window 16%", [*B32_X8, "--batch", "4", "--window", "0.16"]),
    (
      "B/32 x 8, batch 4, fixed: 1 task per call, remat, no cache",
      [*B32_X8, "--batch", "4", "--tasks-per-call", "1", "--remat", "--no-cache-deltas"],
    ),
    ("Qwen2-0.5B x 4, batch 4 x 128 tokens", ["--arch", "qwen2_0.5b", *DECODER_X4]),
  ),
  "gpu": tuple(
    (label, [*argv, "--torch-device", "cuda"])
    for label, argv in (
      ("B/32 x 8, batch 16", [*B32_X8, "--batch", "16"]),
      ("L/14 x 14, batch 16", ["--arch", "ViT-L-14", "--tasks", "14", "--batch", "16"]),
      ("L/14 x 20, batch 16", ["--arch", "ViT-L-14", "--tasks", "20", "--batch", "16"]),
      ("Qwen2-0.5B x 4, batch 4 x 128 tokens", ["--arch", "qwen2_0.5b", *DECODER_X4]),
      *(
        (f"{name} x 4, batch 4 x 128 tokens, window 16%", ["--arch", shape, *DECODER_X4, "--window", "0.16"])
        for name, shape in LARGE_DECODERS
      ),
    )
  ),
}
COMPILE_SUITE = tuple((arch, tasks) for arch in ("ViT-B-32", "ViT-L-14") for tasks in (8, 14, 20))


@dataclasses.dataclass
class Inputs:
  """The random benchmark problem, in the Flax layouts (shared with `benchmark_torch`).

  Attributes:
    arch: the OpenCLIP config name or JSON path it was built from.
    vision: the image tower's config.
    graphdef: static graph of the Flax tower.
    pretrained: Flax param tree of numpy arrays (theta_0, a random init).
    heads: (T, features, classes) float32, unit-norm columns times LOGIT_SCALE.
    images: (T, batch, size, size, 3) float32 NHWC standard-normal pixels, task t's batch at [t].
    noise: std of the fine-tuning noise.
    seed: the seed of every draw.
  """

  arch: str
  vision: clip.VisionConfig
  graphdef: Any
  pretrained: dict[Any, Any]
  heads: np.ndarray
  images: np.ndarray
  noise: float
  seed: int

  decompose: ClassVar[tuple[str, ...]] = SVD_PATTERNS  # regexes of the SVD-decomposed matrices
  unmerged: ClassVar[tuple[str, ...]] = ()  # regexes of the leaves that get no task vector
  # what `logits_fn` takes; the first is the default
  forwards: ClassVar[tuple[str, ...]] = ("one", "per_task")

  @property
  def num_tasks(self) -> int:
    return self.heads.shape[0]

  @property
  def width(self) -> int:
    """The rank of every decomposed matrix (a window keeps a fraction of it)."""
    return self.vision.width

  def finetuned(self, t: int) -> dict[Any, Any]:
    """Task t's "fine-tuned" tree: pretrained + noise * N(0, 1), drawn from default_rng([seed, t]).

    Made on demand, so a caller can hold one fine-tuned model at a time.
    """
    return _noisy(self.pretrained, self.noise, self.seed, t)

  def batches(self) -> tuple[jax.Array, ...]:
    """The step's T inputs: task t's images."""
    return tuple(jnp.asarray(x) for x in self.images)

  def logits_fn(self, forward: str, tasks_per_call: int | None = None, remat: bool = False) -> train.LogitsFn:
    return logits_fn(self.graphdef, self.heads, forward, tasks_per_call, remat)


@dataclasses.dataclass
class DecoderInputs:
  """The random benchmark problem on a Llama, Mistral or Qwen2 sequence classifier (shared with
  `benchmark_torch`): the merged tree is the body, each task has its own score head, as `loading.load_lm`.

  Attributes:
    arch: the shape name or path it was built from.
    fields: the classifier's complete HF config.json fields (the PyTorch side builds its model from them).
    config: its DecoderConfig (compute dtype included).
    pretrained: {"model": body} param tree of numpy arrays (theta_0, a random init).
    heads: (T, hidden, classes) float32 score kernels, N(0, 1 / hidden).
    input_ids: (T, batch, seq_len) int32; each row right-padded with PAD_ID to a length drawn from
      [seq_len // 2, seq_len] (the first row of every task unpadded).
    attention_mask: (T, batch, seq_len) int32, 1 on the real tokens.
    noise: std of the fine-tuning noise.
    seed: the seed of every draw.
  """

  arch: str
  fields: dict[str, Any]
  config: decoder.DecoderConfig
  pretrained: dict[Any, Any]
  heads: np.ndarray
  input_ids: np.ndarray
  attention_mask: np.ndarray
  noise: float
  seed: int

  # The CLI's rules for decoder classifiers (configs/common.py).
  decompose: ClassVar[tuple[str, ...]] = common.DECOMPOSE["decoder"]
  unmerged: ClassVar[tuple[str, ...]] = common.UNMERGED["decoder"]
  forwards: ClassVar[tuple[str, ...]] = ("per_task",)  # as load_lm's train_logits

  @property
  def num_tasks(self) -> int:
    return self.heads.shape[0]

  @property
  def width(self) -> int:
    return self.config.hidden_size

  def finetuned(self, t: int) -> dict[Any, Any]:
    """Task t's "fine-tuned" body: pretrained + noise * N(0, 1), drawn from default_rng([seed, t])."""
    return _noisy(self.pretrained, self.noise, self.seed, t)

  def batches(self) -> tuple[dict[str, jax.Array], ...]:
    """The step's T inputs: task t's {input_ids, attention_mask}."""
    return tuple(
      {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
      for ids, mask in zip(self.input_ids, self.attention_mask)
    )

  def logits_fn(self, forward: str, tasks_per_call: int | None = None, remat: bool = False) -> train.LogitsFn:
    """The CLI's logits (`loading.lm_logits`): the body with task t's score head, one forward per task."""
    del tasks_per_call, remat  # the tower layouts are CLIP's
    if forward not in self.forwards:
      raise ValueError(f"decoders run forward={self.forwards[0]!r} (as load_lm); got {forward!r}")
    heads = [{"kernel": head} for head in self.heads]
    logits = loading.lm_logits(
      decoder.build, [self.config] * self.num_tasks, heads, head_key="score", family="decoder"
    )
    return train.per_task(logits)


def _noisy(tree: dict[Any, Any], noise: float, seed: int, t: int) -> dict[Any, Any]:
  rng = np.random.default_rng([seed, t])
  return jax.tree.map(lambda x: x + noise * rng.standard_normal(x.shape, np.float32), tree)


def decoder_shape(arch: str | os.PathLike) -> Path | None:
  """The config.json of a decoder `arch` (a name under configs/shapes, a directory or a config.json
  path whose model_type is a decoder's), or None (an OpenCLIP arch)."""
  name = Path(arch)
  for path in (SHAPES / name / "config.json", name / "config.json", name):
    if path.name == "config.json" and path.is_file():
      if json.loads(path.read_text()).get("model_type") in decoder.MODEL_TYPES:
        return path
  return None


def make_decoder_inputs(
  arch: str | os.PathLike,
  *,
  tasks: int,
  batch: int,
  seq_len: int,
  classes: int = 2,
  layers: int | None = None,
  vocab: int | None = None,
  noise: float = 1e-3,
  seed: int = 0,
  compute_dtype: str = "float32",
) -> DecoderInputs:
  """The decoder benchmark's random classifier body, heads and token ids, deterministically from `seed`.

  `layers` and `vocab` replace the shape's num_hidden_layers and vocab_size (None keeps them).
  """
  path = decoder_shape(arch)
  if path is None:
    raise ValueError(
      f"{arch}: not a decoder shape (configs/shapes/<name>, or a Llama/Mistral/Qwen2 config.json)"
    )
  raw = json.loads(path.read_text())
  if layers is not None:
    raw["num_hidden_layers"] = layers
    if "max_window_layers" in raw:
      raw["max_window_layers"] = min(raw["max_window_layers"], layers)
  if vocab is not None:
    raw["vocab_size"] = vocab
  raw["pad_token_id"] = PAD_ID
  fields = plan.classifier_fields(raw, num_labels=classes, source=str(path))
  config = hf_config.decoder_config(fields, dtype=compute_dtype)
  tree = functional.split(decoder.build(config, rngs=nnx.Rngs(seed)))[1]
  pretrained = {"model": jax.tree.map(np.asarray, tree["model"])}
  del tree
  rng = np.random.default_rng(seed)
  hidden = config.hidden_size
  heads = rng.standard_normal((tasks, hidden, classes), np.float32) / np.float32(np.sqrt(hidden))
  rng = np.random.default_rng(seed + 1)
  input_ids = rng.integers(PAD_ID + 1, config.vocab_size, (tasks, batch, seq_len)).astype(np.int32)
  lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, (tasks, batch))
  lengths[:, 0] = seq_len
  attention_mask = (np.arange(seq_len)[None, None] < lengths[..., None]).astype(np.int32)
  input_ids = np.where(attention_mask == 1, input_ids, PAD_ID).astype(np.int32)
  return DecoderInputs(
    arch=os.fspath(arch),
    fields=fields,
    config=config,
    pretrained=pretrained,
    heads=heads,
    input_ids=input_ids,
    attention_mask=attention_mask,
    noise=noise,
    seed=seed,
  )


def make_inputs(
  arch: str | os.PathLike,
  *,
  tasks: int,
  batch: int,
  classes: int = 10,
  noise: float = 1e-3,
  seed: int = 0,
  compute_dtype: Any = jnp.float32,
) -> Inputs:
  """The benchmark's random tower, heads and images, deterministically from `seed`."""
  vision = openclip_config.load_config(arch).vision
  model = clip.VisionTransformer(vision, dtype=compute_dtype, rngs=nnx.Rngs(seed))
  graphdef, pretrained = functional.split(model)
  del model
  rng = np.random.default_rng(seed)
  features = vision.output_dim or vision.width
  heads = rng.standard_normal((tasks, features, classes), np.float32)
  heads = LOGIT_SCALE * heads / np.linalg.norm(heads, axis=1, keepdims=True)
  images = np.random.default_rng(seed + 1).standard_normal(
    (tasks, batch, vision.image_size, vision.image_size, 3), np.float32
  )
  return Inputs(
    arch=os.fspath(arch),
    vision=vision,
    graphdef=graphdef,
    pretrained=jax.tree.map(np.asarray, pretrained),
    heads=heads,
    images=images,
    noise=noise,
    seed=seed,
  )


FORWARDS = ("one", "per_task")


def logits_fn(
  graphdef: Any, heads: np.ndarray, forward: str, tasks_per_call: int | None = None, remat: bool = False
) -> train.LogitsFn:
  """The step's logits: task t's head on the L2-normalised tower features of its images.

  forward='one': the tower traced once (`train.one_forward`), called on every task's images at once
  or on `tasks_per_call` tasks at a time, optionally rematerialised; 'per_task': one traced forward
  per task (`train.per_task`).
  """

  def body(params, images):
    feats = functional.call(graphdef, params, images).astype(jnp.float32)
    return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

  def head(t, features):
    return features @ heads[t]

  if forward == "one":
    return train.one_forward(body, head, tasks_per_call=tasks_per_call or None, remat=remat)
  if forward == "per_task":
    return train.per_task(lambda params, t, images: head(t, body(params, images)))
  raise ValueError(f"logits_fn: forward={forward!r}; expected one of {FORWARDS}")


def window_rank(width: int, window: float | None) -> int | None:
  """Components kept by a window of `window` * r (r = `width`: the CLIP tower's width, every matrix's
  rank; a decoder's hidden size)."""
  return None if window is None else max(1, int(window * width))


def config_label(args: argparse.Namespace) -> str:
  """The configuration's name in the table."""
  if decoder_shape(args.arch) is None:
    return f"{args.arch} x {args.tasks}, batch {args.batch}"
  shrunk = "".join(
    f", {value} {name}"
    for name, value in (("layers", args.layers), ("vocab", args.vocab))
    if value is not None
  )
  return f"{args.arch}{shrunk} x {args.tasks}, batch {args.batch} x {args.seq_len} tokens"


def table_label(args: argparse.Namespace) -> str:
  """A --baseline row's name: `config_label` and what only the adarank_jax side varies (the window,
  the factors' dtype), so a windowed row is not mistaken for a full-rank one."""
  label = config_label(args)
  if args.window is not None:
    label += f", window {args.window:.0%}"
  if args.factor_dtype != "float32":
    label += f", {args.factor_dtype} factors"
  return label


def build_inputs(args: argparse.Namespace, *, compute_dtype: str) -> Inputs | DecoderInputs:
  """The benchmark problem of the command line, CLIP or decoder as `--arch` says."""
  if decoder_shape(args.arch) is not None:
    return make_decoder_inputs(
      args.arch,
      tasks=args.tasks,
      batch=args.batch,
      seq_len=args.seq_len,
      classes=args.classes,
      layers=args.layers,
      vocab=args.vocab,
      noise=args.noise,
      seed=args.seed,
      compute_dtype=compute_dtype,
    )
  if args.layers is not None or args.vocab is not None:
    raise ValueError(f"--layers and --vocab shrink decoder shapes; {args.arch} is an OpenCLIP arch")
  return make_inputs(
    args.arch,
    tasks=args.tasks,
    batch=args.batch,
    classes=args.classes,
    noise=args.noise,
    seed=args.seed,
    compute_dtype=DTYPES[compute_dtype],
  )


# ------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--arch",
    default="ViT-B-32",
    help="OpenCLIP model config name or JSON path, or a decoder shape (configs/shapes/<name>, or a "
    "Llama/Mistral/Qwen2 config.json directory or path)",
  )
  parser.add_argument("--tasks", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
  parser.add_argument("--batch", type=int, default=4, help="images (decoders: sequences) per task per step")
  parser.add_argument("--seq-len", type=int, default=128, help="decoders: tokens per sequence")
  parser.add_argument("--layers", type=int, default=None, help="decoders: replace the shape's layer count")
  parser.add_argument("--vocab", type=int, default=None, help="decoders: replace the shape's vocabulary size")
  parser.add_argument("--classes", type=int, default=10, help="classes of every random head")
  parser.add_argument("--origin", choices=task_vectors.ORIGINS, default="pretrained")
  parser.add_argument("--initial-rank-ratio", type=float, default=1.0)
  parser.add_argument(
    "--window",
    type=float,
    default=None,
    help="keep only the top fraction of components (learnable), the rest off",
  )
  parser.add_argument(
    "--forward",
    choices=FORWARDS,
    default=None,
    help="'one': the tower traced once (train.one_forward, CLIP's default), or one traced forward per "
    "task (decoders: the only one, as the CLI)",
  )
  parser.add_argument(
    "--cache-deltas",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="fix the layout's delta cache (the config's adarank.cache_deltas); with any of the three "
    "layout flags the layout is fixed (adarank.layout='config'), the others at their defaults",
  )
  parser.add_argument(
    "--tasks-per-call",
    type=int,
    default=None,
    help="fix the tower's call size in tasks, 0 = all at once (adarank.tasks_per_forward)",
  )
  parser.add_argument(
    "--remat",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="fix whether the tower's activations are recomputed in the backward pass (adarank.remat)",
  )
  parser.add_argument("--factor-dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--compute-dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument(
    "--mesh-task",
    type=int,
    default=1,
    help="size of the mesh's 'task' axis (factors split over it); used when more than one device is visible",
  )
  parser.add_argument("--noise", type=float, default=1e-3, help="std of the fine-tuning noise")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--torch-device", default="cpu", help="the PyTorch baseline's device ('cpu' or 'cuda')")
  parser.add_argument(
    "--baseline",
    action="store_true",
    help="also run the official PyTorch step (own process) and print ratios",
  )
  parser.add_argument(
    "--compile-only",
    action="store_true",
    help="only trace and compile the step on abstract inputs (no weights)",
  )
  parser.add_argument(
    "--suite", choices=sorted(SUITES), help="run a table's configurations, each with its PyTorch baseline"
  )
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=None,
    help="the device's peak TFLOP/s at the compute dtype, for an MFU estimate",
  )
  return parser.parse_args(argv)


def _machine() -> dict[str, object]:
  return {**layout.machine(), "host": platform.machine()}


def _layouts(args: argparse.Namespace, factors: Any, *, tower: bool) -> tuple[layout.Layout, ...]:
  """The layouts to time: the one the flags fix, else the candidates of adarank.layout='auto'
  (`tower`: whether the logits take the tower layouts)."""
  flags = (args.tasks_per_call, args.remat, args.cache_deltas)
  if any(flag is not None for flag in flags):
    default = layout.Layout()
    return (
      layout.Layout(
        default.tasks_per_forward if args.tasks_per_call is None else args.tasks_per_call,
        default.remat if args.remat is None else args.remat,
        default.cache_deltas if args.cache_deltas is None else args.cache_deltas,
      ),
    )
  return layout.candidates(
    num_tasks=args.tasks,
    cache_deltas=layout.cache_fits(factors, jax.local_devices()[0], shards=args.mesh_task),
    tower=tower,
  )


def _peak_memory() -> dict[str, float | None]:
  host_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
  stats = jax.devices()[0].memory_stats() or {}
  device = stats.get("peak_bytes_in_use")
  return {
    "host_peak_rss_gb": round(host_gb, 3),
    "device_peak_gb": None if device is None else round(device / 2**30, 3),
  }


def _step_memory(compiled: Any) -> dict[str, float] | None:
  """XLA's account of a compiled step's buffers in GB: arguments, outputs, the outputs aliased to
  (donated) arguments, and temporaries."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return {
    name: round(getattr(memory, f"{name}_size_in_bytes") / 2**30, 3)
    for name in ("argument", "output", "alias", "temp")
  }


def _decompose(
  inputs: Inputs | DecoderInputs, *, origin: str, rank: int | None, dtype: Any
) -> tuple[Any, Any]:
  """(origin tree, factors), streaming: one fine-tuned model and one task vector at a time. The
  `inputs.unmerged` leaves get no task vector (they stay at the origin)."""
  tasks = range(inputs.num_tasks)
  if origin == "pretrained":
    base = inputs.pretrained
  else:  # the mean of the fine-tuned models, accumulated one model at a time
    base = jax.tree.map(np.zeros_like, inputs.pretrained)
    for t in tasks:
      base = jax.tree.map(lambda acc, x: acc + x / inputs.num_tasks, base, inputs.finetuned(t))
  unmerged = tree_util.flatten(tree_util.select(base, inputs.unmerged))

  def tau(t):
    flat, origin_flat = tree_util.flatten(inputs.finetuned(t)), tree_util.flatten(base)
    return tree_util.unflatten({p: x - origin_flat[p] for p, x in flat.items() if not unmerged[p]})

  factors = decomposition.decompose_streaming(
    tree_util.select(base, inputs.decompose),
    (tau(t) for t in tasks),
    num_tasks=inputs.num_tasks,
    rank=rank,
    dtype=dtype,
  )
  return base, jax.block_until_ready(factors)


def run_jax(args: argparse.Namespace) -> dict[str, object]:
  """The adarank_jax side: decomposition, first step, median step, memory."""
  result: dict[str, object] = {"args": vars(args), "machine": _machine()}
  print("machine:", json.dumps(result["machine"]))
  inputs = build_inputs(args, compute_dtype=args.compute_dtype)
  args.forward = args.forward or inputs.forwards[0]
  num_params = sum(x.size for x in jax.tree.leaves(inputs.pretrained))
  print(f"{config_label(args)}: {num_params / 1e6:.1f}M params in the merged tree")
  result["host_peak_rss_inputs_gb"] = _peak_memory()["host_peak_rss_gb"]

  start = time.perf_counter()
  origin, factors = _decompose(
    inputs, origin=args.origin, rank=window_rank(inputs.width, args.window), dtype=DTYPES[args.factor_dtype]
  )
  result["decompose_s"] = time.perf_counter() - start
  result["decompose_peak_rss_gb"] = _peak_memory()["host_peak_rss_gb"]  # the peak so far
  print(
    f"task vectors + decomposition {result['decompose_s']:.2f} s (peak RSS so far "
    f"{result['decompose_peak_rss_gb']} GB)"
  )

  frozen = (jax.device_put(origin), factors)  # on the device once, not converted at every step
  batches = inputs.batches()
  mesh = None
  if jax.device_count() > 1:
    mesh = train.make_mesh(task=args.mesh_task)
    placement = "task" if args.mesh_task > 1 else "replicated"
    frozen = train.place_frozen(frozen, mesh, factor_placement=placement)
    batches = train.place_batches(batches, mesh)
  # Every candidate layout measured alike; the fastest median is the result (as the run's
  # adarank.layout='auto' picks it, there from fewer steps), the others are listed.
  # As the run does, a candidate whose compiled step would not fit in memory is skipped, and where none
  # fits with cached deltas the same ones without them are measured; a fixed layout always runs.
  measured = []
  tower = args.forward == "one"  # CLIP's tower layouts; decoders run per task
  options = _layouts(args, factors, tower=tower)
  auto = all(flag is None for flag in (args.tasks_per_call, args.remat, args.cache_deltas))
  while options:
    for candidate in options:
      measured.append(_measure_step(args, inputs, frozen, batches, mesh, candidate, check_memory=auto))
      m = measured[-1]
      if "skipped" in m:
        print(f"layout {candidate}: skipped, {m['skipped']}", flush=True)
        continue
      print(
        f"layout {candidate}: state init {m['init_s']:.2f} s; first step {m['first_step_s']:.2f} s "
        f"(compile {m['compile_s']:.2f} s); median of {args.steps} steps {m['step_s_median'] or 0:.3f} s",
        flush=True,
      )
    options = layout.fallback(options, none_fit=all("skipped" in m for m in measured[-len(options) :]))
  if all("skipped" in m for m in measured):
    raise SystemExit(f"no step layout fits in this machine's memory: {[m['skipped'] for m in measured]}")
  best = min(measured, key=lambda m: m["step_s_median"] or math.inf)
  result.update(best)
  result["layouts"] = [
    {"layout": m["layout"], "step_s_median": m["step_s_median"], "skipped": m.get("skipped")}
    for m in measured
  ]
  if result["step_s_median"] and result["step_gflop"] and args.peak_tflops:
    result["mfu"] = result["step_gflop"] / 1e3 / result["step_s_median"] / args.peak_tflops
  result.update(_peak_memory())
  print(
    f"layout {result['layout']}: state init {result['init_s']:.2f} s; first step {result['first_step_s']:.2f} s "
    f"(compile {result['compile_s']:.2f} s); "
    f"median of {args.steps} steps {result['step_s_median'] or 0:.3f} s = "
    f"{result['steps_per_s'] or 0:.3f} steps/s; loss {result['loss']:.4f}"
  )
  print(
    f"peak memory: host RSS {result['host_peak_rss_gb']} GB, "
    f"device {result['device_peak_gb']} GB; XLA's account of the step (GB): "
    f"{result['step_memory_gb']}"
  )
  print("result:", json.dumps(result))
  return result


def _measure_step(
  args: argparse.Namespace,
  inputs: Inputs | DecoderInputs,
  frozen: Any,
  batches: Any,
  mesh: Any,
  candidate: layout.Layout,
  *,
  check_memory: bool = False,
) -> dict[str, Any]:
  """The state's initialisation, compile time, first step and the median of `args.steps` steps of the
  step laid out as `candidate`. The initial state (with cached deltas: every task's delta rebuilt
  from its factors) is waited for before the compile is timed: dispatched asynchronously, it would
  otherwise share the cores with the compiler and count as compile time."""
  optimizer = train.make_optimizer(1e-3)
  start = time.perf_counter()
  state = train.init_state(
    frozen[1],
    optimizer=optimizer,
    num_tasks=args.tasks,
    initial_rank_ratio=args.initial_rank_ratio,
    prior=0.3,
    cache_deltas=candidate.cache_deltas,
  )
  if mesh is not None:
    state = train.place_state(state, mesh)
  state = jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  step = train.make_train_step(
    logits_fn=inputs.logits_fn(args.forward, candidate.tasks_per_forward, candidate.remat),
    optimizer=optimizer,
    temperature=10.0,
    num_tasks=args.tasks,
    mesh=mesh,
  )
  result: dict[str, Any] = {
    "layout": str(candidate),
    "layout_fields": layout.to_json(candidate),
    "init_s": init_s,
  }
  start = time.perf_counter()
  compiled = step.lower(frozen, state, batches).compile()
  result["compile_s"] = time.perf_counter() - start
  cost = compiled.cost_analysis() or {}
  result["step_gflop"] = round(cost["flops"] / 1e9, 1) if "flops" in cost else None
  result["step_memory_gb"] = _step_memory(compiled)
  needed, limit = layout.step_bytes(compiled), layout.memory_limit(jax.local_devices()[0])
  if check_memory and not layout.fits(needed, limit):
    result["skipped"] = (
      f"its step would allocate {needed / 2**30:.1f} GB, over {layout.STEP_SHARE:.0%} of the "
      f"{limit / layout.STEP_SHARE / 2**30:.1f} GB free"
    )
    result["step_s_median"] = None
    return result
  start = time.perf_counter()
  state, metrics = compiled(frozen, state, batches)
  jax.block_until_ready(metrics)
  result["first_step_s"] = result["compile_s"] + time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(frozen, state, batches)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  result["step_s"] = times
  result["step_s_median"] = statistics.median(times) if times else None
  result["steps_per_s"] = 1 / result["step_s_median"] if times else None
  result["loss"] = float(metrics["loss"])
  return result


def compile_only(args: argparse.Namespace) -> dict[str, object]:
  """Traces and compiles the step on abstract inputs of the requested size (no weights made)."""
  if decoder_shape(args.arch) is not None:
    raise ValueError(
      "--compile-only covers CLIP towers; a decoder's step compiled on abstract inputs is the memory plan: "
      "python -m adarank_jax.main --config configs/qwen2_glue.py --dry_run --config.model.pretrained=SHAPE_DIR"
    )
  args.forward = args.forward or Inputs.forwards[0]
  vision = openclip_config.load_config(args.arch).vision
  graphdef, params = functional.split(
    nnx.eval_shape(lambda: clip.VisionTransformer(vision, dtype=DTYPES[args.compute_dtype], rngs=nnx.Rngs(0)))
  )
  rank = window_rank(vision.width, args.window)
  select = tree_util.flatten(tree_util.select(params, SVD_PATTERNS))
  factor_dtype = DTYPES[args.factor_dtype]

  def abstract_factor(path, leaf):
    if not select[path]:
      return jax.ShapeDtypeStruct((args.tasks, *leaf.shape), factor_dtype)
    (m, n), r = leaf.shape, min(leaf.shape) if rank is None else min(rank, *leaf.shape)
    return SVD(
      jax.ShapeDtypeStruct((args.tasks, m, r), factor_dtype),
      jax.ShapeDtypeStruct((args.tasks, r), factor_dtype),
      jax.ShapeDtypeStruct((args.tasks, r, n), factor_dtype),
    )

  factors = tree_util.unflatten({p: abstract_factor(p, x) for p, x in tree_util.flatten(params).items()})
  origin = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  candidate = _layouts(args, factors, tower=args.forward == "one")[0]  # fixed, else auto's first
  optimizer = train.make_optimizer(1e-3)
  state = jax.eval_shape(
    lambda f: train.init_state(
      f,
      optimizer=optimizer,
      num_tasks=args.tasks,
      initial_rank_ratio=args.initial_rank_ratio,
      prior=0.3,
      cache_deltas=candidate.cache_deltas,
    ),
    factors,
  )
  size = vision.image_size
  batches = tuple(jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32) for _ in range(args.tasks))
  heads = np.zeros((args.tasks, vision.output_dim or vision.width, args.classes), np.float32)
  step = train.make_train_step(
    logits_fn=logits_fn(graphdef, heads, args.forward, candidate.tasks_per_forward, candidate.remat),
    optimizer=optimizer,
    temperature=10.0,
    num_tasks=args.tasks,
  )
  start = time.perf_counter()
  lowered = step.lower((origin, factors), state, batches)
  trace_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  result = {
    "args": vars(args),
    "machine": _machine(),
    "layout": str(candidate),
    "trace_s": trace_s,
    "compile_s": time.perf_counter() - start,
    **_peak_memory(),
  }
  result["step_memory_gb"] = _step_memory(compiled)
  print(
    f"{args.arch} x {args.tasks} tasks, batch {args.batch}: trace {trace_s:.1f} s, "
    f"compile {result['compile_s']:.1f} s"
  )
  print("result:", json.dumps(result))
  return result


def _subprocess(module: str, argv: Sequence[str]) -> dict[str, object]:
  """Runs `python -m module argv` in its own process and returns its `result:` JSON line."""
  proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("result: ")]
  if proc.returncode or not lines:
    raise RuntimeError(
      f"{module} {' '.join(argv)} failed (exit {proc.returncode}):\n"
      f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
  return json.loads(lines[-1].removeprefix("result: "))


_TORCH_ARGS = (
  "--arch",
  "--tasks",
  "--steps",
  "--batch",
  "--seq-len",
  "--layers",
  "--vocab",
  "--classes",
  "--origin",
  "--initial-rank-ratio",
  "--noise",
  "--seed",
)


def _torch_argv(argv: Sequence[str]) -> list[str]:
  """The arguments the PyTorch baseline shares with this benchmark (it has no window: the official
  step always rebuilds every component)."""
  out, it = [], iter(argv)
  for arg in it:
    if arg in _TORCH_ARGS:
      out += [arg, next(it)]
    elif arg == "--torch-device":
      out += ["--device", next(it)]
  return out


def _ratio(torch_value: Any, jax_value: Any) -> str:
  return f"{torch_value / jax_value:.2f}x" if torch_value and jax_value else "-"


def side_by_side(label: str, argv: Sequence[str]) -> dict[str, object]:
  """Both sides of one configuration, each in its own process; prints and returns the comparison.

  A PyTorch side that fails (e.g. the official step's full-rank factors do not fit the device) leaves
  the row with adarank_jax's column and the error in PyTorch's (`torch` = {"error": ...}).
  """
  ours = _subprocess("adarank_jax.benchmarks.step", argv)
  print("adarank_jax result:", json.dumps(ours), flush=True)
  try:
    theirs = _subprocess("adarank_jax.benchmarks.torch_step", _torch_argv(argv))
  except RuntimeError as error:
    print(f"{label}: the PyTorch side FAILED\n{error}", flush=True)
    return {"label": label, "jax": ours, "torch": {"error": _error_line(error)}}
  print("pytorch result:", json.dumps(theirs), flush=True)
  row = {
    "label": label,
    "jax": ours,
    "torch": theirs,
    "step_speedup": theirs["step_s_median"] / ours["step_s_median"],
    "decompose_speedup": theirs["decompose_s"] / ours["decompose_s"],
    "memory_ratio": ours["host_peak_rss_gb"] / theirs["host_peak_rss_gb"],
  }
  print(
    f"{label}: step {theirs['step_s_median']:.2f} s (torch) vs {ours['step_s_median']:.2f} s "
    f"(jax) = {row['step_speedup']:.2f}x; decomposition {theirs['decompose_s']:.1f} vs "
    f"{ours['decompose_s']:.1f} s; peak RSS {theirs['host_peak_rss_gb']:.1f} vs "
    f"{ours['host_peak_rss_gb']:.1f} GB ({row['memory_ratio']:.2f}x)",
    flush=True,
  )
  return row


def _error_line(error: Exception) -> str:
  """The last line of a failed side's output that names an error (e.g. out of memory)."""
  lines = [l.strip() for l in str(error).splitlines() if "Error" in l or "error" in l]
  return (lines[-1] if lines else str(error).splitlines()[0])[:200]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The comparison table of `side_by_side` rows, under the machine it was measured on."""
  machine = rows[0]["jax"]["machine"] if rows else {}
  lines = [
    f"{machine.get('cpu')} ({machine.get('cpu_count')} cores; {' '.join(machine.get('isa', []))}), "
    f"{machine.get('backend')} {machine.get('device_kind')}, jax {machine.get('jax')}",
    "",
    "| configuration | measure | PyTorch (official) | adarank_jax | ratio |",
    "|---|---|---:|---:|---:|",
  ]
  for row in rows:
    t, j = row["torch"], row["jax"]
    if "error" in t:
      lines += [
        f"| {row['label']} | layout | | {j['layout']} | |",
        f"| | step (median) | failed: {t['error']} | {j['step_s_median']:.2f} s | |",
        f"| | first step (compile) | | {j['first_step_s']:.1f} s ({j['compile_s']:.1f} s compile) | |",
        f"| | state init (the delta cache) | | {j['init_s']:.1f} s | |",
        f"| | decomposition | | {j['decompose_s']:.1f} s | |",
        f"| | peak host memory | | {j['host_peak_rss_gb']:.1f} GB | |",
      ]
      if j.get("device_peak_gb") is not None:
        lines.append(f"| | peak device memory | | {j['device_peak_gb']} GB | |")
      continue
    lines += [
      f"| {row['label']} | layout | | {j['layout']} | |",
      f"| | step (median) | {t['step_s_median']:.2f} s | "
      f"{j['step_s_median']:.2f} s | {_ratio(t['step_s_median'], j['step_s_median'])} |",
      f"| | first step (compile) | {t['first_step_s']:.1f} s | {j['first_step_s']:.1f} s "
      f"({j['compile_s']:.1f} s compile) | |",
      f"| | state init (the delta cache) | | {j['init_s']:.1f} s | |",
      f"| | decomposition | {t['decompose_s']:.1f} s | {j['decompose_s']:.1f} s | "
      f"{_ratio(t['decompose_s'], j['decompose_s'])} |",
      f"| | peak host memory | {t['host_peak_rss_gb']:.1f} GB | {j['host_peak_rss_gb']:.1f} GB"
      f" | {j['host_peak_rss_gb'] / t['host_peak_rss_gb']:.2f}x |",
    ]
    if j.get("device_peak_gb") is not None:
      lines.append(
        f"| | peak device memory | {t.get('device_peak_gb', '-')} GB | {j['device_peak_gb']} GB | |"
      )
  return "\n".join(lines)


def suite(name: str, extra: Sequence[str] = ()) -> list[dict[str, object]]:
  """Every configuration of SUITES[name] side by side, then the compile times for T = 8, 14, 20.

  This process starts no JAX backend (on an accelerator it would hold memory its children need): the
  machine is each child's."""
  rows = []
  for label, argv in SUITES[name]:
    try:
      rows.append(side_by_side(label, [*argv, *extra]))
    except RuntimeError as error:  # e.g. out of memory: report it and go on with the next one
      print(f"{label}: FAILED\n{error}", flush=True)
  print(markdown(rows))
  print("\n| model | tasks | trace | compile | host peak RSS |\n|---|---:|---:|---:|---:|")
  for arch, tasks in COMPILE_SUITE:
    try:
      result = _subprocess(
        "adarank_jax.benchmarks.step",
        ["--arch", arch, "--tasks", str(tasks), "--batch", "16", "--compile-only", *extra],
      )
    except RuntimeError as error:
      print(f"| {arch} | {tasks} | FAILED: {str(error).splitlines()[0]} | | |", flush=True)
      continue
    print(
      f"| {arch} | {tasks} | {result['trace_s']:.1f} s | {result['compile_s']:.1f} s | "
      f"{result['host_peak_rss_gb']:.1f} GB |",
      flush=True,
    )
  return rows


def main(argv: list[str] | None = None) -> dict[str, object] | list[dict[str, object]]:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parse_args(argv)
  if args.suite:
    extra = [a for a in argv if a not in ("--suite", args.suite)]
    return suite(args.suite, extra)
  if args.compile_only:
    return compile_only(args)
  if args.baseline:
    row = side_by_side(table_label(args), [a for a in argv if a != "--baseline"])
    print(markdown([row]))
    return row
  return run_jax(args)


if __name__ == "__main__":
  main()
