"""A miniature of the paper's vision setting, built from the digits tasks in about 80 s on a 2-core CPU.

`build(cache_dir)` makes, deterministically from `seed`:
  1. a tiny OpenCLIP-architecture CLIP (`tiny_clip.json`), pretrained contrastively (symmetric
     InfoNCE, learned logit scale) on the train images of every task's input distribution, each
     paired with a plain caption of its digit ("the number seven."); no task's own labels;
  2. per task, a fine-tuned image tower: the pretrained tower trained with cross-entropy through
     that task's frozen zero-shot head (Task Arithmetic's recipe; the text tower stays pretrained);
  3. OpenCLIP state-dict .safetensors files of the pretrained CLIP and of each fine-tuned CLIP
     (pretrained text tower + fine-tuned image tower), written by the OpenCLIP exporter, so the run
     reads them exactly like real checkpoints.

The files live in cache_dir/digits-<full|quick>-<fingerprint>/, where the fingerprint covers the
model config, the schedule, the seed and the source of this package; a second call with the same
arguments reuses them once `verify` finds each file's sha256 as testbed.json recorded it at build time
(a corrupt or missing file is named and the testbed rebuilt). The directory is built under a temporary
name and renamed when complete, so an interrupted build never leaves a directory that looks finished; a
directory without testbed.json (left by an older, killed build) is replaced.

  bed = testbed.build("~/.cache/adarank_jax")
  bed.model_config, bed.pretrained, bed.finetuned("DigitsParity"), bed.finetuned_template, bed.tasks
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adarank_jax.data import clip_tokenizer, preprocess, registry
from adarank_jax.data import digits as digit_tasks
from adarank_jax.models import clip, functional
from adarank_jax.models import heads as heads_lib

PACKAGE_DIR = Path(__file__).parent
MANIFEST = "testbed.json"


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Training budget of one build."""

  model_config: str  # file name in this package
  pretrain_steps: int
  pretrain_batch: int
  pretrain_lr: float
  finetune_steps: int
  finetune_batch: int  # per task
  finetune_lr: float
  evaluate: bool  # measure zero-shot and fine-tuned test accuracy for the manifest


# Full: about 80 s on 2 CPU cores. Quick (CI, about 20 s, mostly compiling): a smaller model and a few
# steps; its models are near chance, but the files, tasks and code path are the real ones.
FULL = Schedule(
  model_config="tiny_clip.json",
  pretrain_steps=800,
  pretrain_batch=128,
  pretrain_lr=2e-3,
  finetune_steps=200,
  finetune_batch=32,
  finetune_lr=3e-4,
  evaluate=True,
)
QUICK = Schedule(
  model_config="tiny_clip_quick.json",
  pretrain_steps=12,
  pretrain_batch=64,
  pretrain_lr=3e-3,
  finetune_steps=8,
  finetune_batch=16,
  finetune_lr=1e-3,
  evaluate=False,
)


@dataclasses.dataclass(frozen=True)
class Testbed:
  """Where a built testbed lives.

  Attributes:
    directory: the cache directory of this build; `testbed.json` in it records the schedule, the
      build times and the zero-shot / fine-tuned test accuracies.
    model_config: OpenCLIP model-config JSON (`openclip_config.load_config` and open_clip read it).
    pretrained: full CLIP, OpenCLIP state dict (.safetensors).
    finetuned_template: fine-tuned full CLIP per task, with "{task}" for the task name.
    tasks: the registered task names, in merging order.
  """

  directory: str
  model_config: str
  pretrained: str
  finetuned_template: str
  tasks: tuple[str, ...]

  def finetuned(self, task: str) -> str:
    """The fine-tuned checkpoint of `task`."""
    if task not in self.tasks:
      raise ValueError(f"Testbed {self.directory}: no fine-tuned model for {task!r}; tasks: {self.tasks}")
    return self.finetuned_template.format(task=task)

  @property
  def finetuned_paths(self) -> tuple[str, ...]:
    """The fine-tuned checkpoints, in the order of `tasks`."""
    return tuple(self.finetuned(task) for task in self.tasks)


def default_cache_dir() -> Path:
  """$ADARANK_JAX_CACHE, else $XDG_CACHE_HOME/adarank_jax, else ~/.cache/adarank_jax."""
  if os.environ.get("ADARANK_JAX_CACHE"):
    return Path(os.environ["ADARANK_JAX_CACHE"])
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adarank_jax"


def locate(cache_dir: str | os.PathLike, *, quick: bool = False, seed: int = 0) -> Testbed:
  """Where `build` puts (or finds) this testbed, without building it."""
  names = digit_tasks.TASKS
  kind = "quick" if quick else "full"
  fingerprint = _fingerprint(QUICK if quick else FULL, seed)
  return _testbed(Path(cache_dir).expanduser() / f"digits-{kind}-{fingerprint}", names)


def build(cache_dir: str | os.PathLike, *, quick: bool = False, seed: int = 0) -> Testbed:
  """Builds (or reuses) the digits testbed under `cache_dir`; registers the digits tasks.

  Args:
    cache_dir: parent directory of the cached builds (created if missing).
    quick: the CI schedule (a smaller model, seconds of training); same tasks and files.
    seed: model initialisation and training randomness (the task data are fixed).
  """
  located = locate(cache_dir, quick=quick, seed=seed)
  names, directory = located.tasks, Path(located.directory)
  schedule = QUICK if quick else FULL
  kind = "quick" if quick else "full"
  directory.parent.mkdir(parents=True, exist_ok=True)
  _remove_abandoned(directory)
  if directory.exists():
    problems = verify(directory)
    if not problems:
      print(f"Digits testbed: reusing {directory}")
      return _testbed(directory, names)
    for problem in problems:
      print(f"Digits testbed: {problem}; rebuilding the testbed")
  print(f"Digits testbed: building {directory} ({kind} schedule, seed {seed})")
  start = time.perf_counter()
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{os.getpid()}.", dir=directory.parent))
  try:
    report = _build_into(tmp, names, schedule, seed)
    manifest = {
      "seed": seed,
      "quick": quick,
      "schedule": dataclasses.asdict(schedule),
      "tasks": names,
      "jax_version": jax.__version__,
      **report,
      "build_seconds": round(time.perf_counter() - start, 1),
      "sha256": file_hashes(tmp),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _install(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"Digits testbed: built in {manifest['build_seconds']:.0f} s")
  if schedule.evaluate:
    print(
      f"Digits testbed: average test accuracy of the zero-shot / fine-tuned models: "
      f"{report['zero_shot_accuracy']['average']:.3f} / {report['finetuned_accuracy']['average']:.3f} "
      f"(per task in {directory / MANIFEST})"
    )
  return _testbed(directory, names)


def _install(tmp: Path, directory: Path) -> None:
  """Renames the complete build `tmp` to `directory`. What is there already (a half-built or corrupt
  directory) is renamed aside first and deleted; a good build another process completed meanwhile is
  kept instead of ours."""
  old = None
  if directory.exists():
    if not verify(directory):
      return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{os.getpid()}.old.", dir=directory.parent))
    os.rename(directory, old / "build")
  try:
    os.rename(tmp, directory)
  except OSError:  # another process installed its build between our checks; keep it if it is good
    if not directory.exists() or verify(directory):
      raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


def file_hashes(directory: str | os.PathLike) -> dict[str, str]:
  """sha256 of every file of a build directory but testbed.json: {relative posix path: hex digest}."""
  directory = Path(directory)
  hashes = {}
  for path in sorted(p for p in directory.rglob("*") if p.is_file()):
    relative = path.relative_to(directory).as_posix()
    if relative == MANIFEST:
      continue
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    hashes[relative] = digest.hexdigest()
  return hashes


def verify(directory: str | os.PathLike) -> list[str]:
  """What is wrong with a cached build, one line per file (naming it); [] when every file recorded in
  testbed.json is there with the sha256 recorded at build time."""
  directory = Path(directory)
  manifest_path = directory / MANIFEST
  if not manifest_path.is_file():
    return [f"{directory}: no {MANIFEST} (an interrupted build left it)"]
  try:
    recorded = json.loads(manifest_path.read_text())["sha256"]
    if not isinstance(recorded, dict) or not recorded:
      raise ValueError("empty")
  except (OSError, ValueError, KeyError, TypeError) as error:
    return [f"{manifest_path}: unreadable or records no file hashes ({type(error).__name__}: {error})"]
  problems = []
  actual = file_hashes(directory)
  for relative, digest in sorted(recorded.items()):
    if relative not in actual:
      problems.append(f"{directory / relative}: missing")
    elif actual[relative] != digest:
      problems.append(f"{directory / relative}: sha256 differs from the one recorded in {MANIFEST} (corrupt)")
  return problems


def _testbed(directory: Path, names: tuple[str, ...]) -> Testbed:
  return Testbed(
    directory=str(directory),
    model_config=str(directory / "model_config.json"),
    pretrained=str(directory / "pretrained.safetensors"),
    finetuned_template=str(directory / "finetuned" / "{task}.safetensors"),
    tasks=names,
  )


def _remove_abandoned(directory: Path) -> None:
  """Deletes temporary build directories of `directory` left by processes that no longer run."""
  for tmp in directory.parent.glob(f".{directory.name}.*"):
    pid = tmp.name[len(directory.name) + 2 :].partition(".")[0]
    if pid.isdigit() and not _running(int(pid)):
      shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _fingerprint(schedule: Schedule, seed: int) -> str:
  """Hash of what a build depends on: schedule, seed, model config and the code that makes the files."""
  # pylint: disable-next=g-import-not-at-top
  from adarank_jax.interop import keymap, openclip, openclip_config, state_dict

  digest = hashlib.sha256(json.dumps([dataclasses.asdict(schedule), seed]).encode())
  code = [
    Path(m.__file__)
    for m in (
      digit_tasks,
      clip_tokenizer,
      preprocess,
      clip,
      functional,
      heads_lib,
      keymap,
      openclip,
      openclip_config,
      state_dict,
    )
  ]
  for path in sorted(PACKAGE_DIR.glob("*.py")) + code + [PACKAGE_DIR / schedule.model_config]:
    digest.update(path.read_bytes())
  return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# The build.


def _build_into(out: Path, names: tuple[str, ...], schedule: Schedule, seed: int) -> dict[str, Any]:
  """Trains and writes every file of a testbed into `out`; returns what the manifest records."""
  from adarank_jax.interop import openclip, openclip_config  # pylint: disable=g-import-not-at-top

  clock = _Clock()
  shutil.copyfile(PACKAGE_DIR / schedule.model_config, out / "model_config.json")
  config = openclip_config.load_config(out / "model_config.json")
  tokenize = clip_tokenizer.Tokenizer(context_length=config.text.context_length)
  graphdef, params = functional.split(clip.CLIP(config, rngs=nnx.Rngs(seed)))
  train = _stack(names, "train", config.vision.image_size)
  clock.lap("setup (tokenizer, model init, preprocessed data)")

  # Model init draws from JAX's PRNG; batch sampling from numpy on the host (no random ops to compile).
  rng_pretrain, rng_finetune = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
  captions = np.stack(
    [tokenize([t.format(w) for t in digit_tasks.PRETRAIN_TEMPLATES]) for w in digit_tasks.DIGIT_WORDS]
  )  # (10, K, L)
  captions = captions[..., : captions.argmax(-1).max() + 1]  # drop the all-padding tail (causal: no effect)
  params = _pretrain(
    graphdef,
    params,
    train["images"],
    jnp.asarray(digit_tasks.digit_values("train")),
    jnp.asarray(captions),
    schedule=schedule,
    rng=rng_pretrain,
  )
  openclip.export_openclip(params, out / "pretrained.safetensors")
  clock.lap(f"pretraining ({schedule.pretrain_steps} steps)")

  heads, class_mask = _heads(graphdef, params, names, tokenize)
  visual_graphdef, _ = functional.split(
    nnx.eval_shape(lambda: clip.VisionTransformer(config.vision, rngs=nnx.Rngs(0)))
  )
  tuned = _finetune(
    visual_graphdef, params["visual"], heads, class_mask, train, schedule=schedule, rng=rng_finetune
  )
  (out / "finetuned").mkdir()
  for t, name in enumerate(names):
    openclip.export_openclip(
      {**params, "visual": _task_slice(tuned, t)}, out / "finetuned" / f"{name}.safetensors"
    )
  clock.lap(f"fine-tuning ({len(names)} x {schedule.finetune_steps} steps)")

  if not schedule.evaluate:
    return {"seconds": clock.laps}
  test = _stack(names, "test", config.vision.image_size)
  accuracy = jax.jit(functools.partial(_accuracy, visual_graphdef))
  zero_shot, finetuned = [], []
  for t in range(len(names)):
    task_test = (heads[t], class_mask[t], test["images"][t], test["labels"][t])
    zero_shot.append(accuracy(params["visual"], *task_test))
    finetuned.append(accuracy(_task_slice(tuned, t), *task_test))
  clock.lap("evaluation")
  return {
    "zero_shot_accuracy": _rounded(names, zero_shot),
    "finetuned_accuracy": _rounded(names, finetuned),
    "seconds": clock.laps,
  }


class _Clock:
  """Wall-clock seconds per build phase, printed as they end."""

  def __init__(self):
    self.laps: dict[str, float] = {}
    self._last = time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.laps[name] = round(now - self._last, 1)
    self._last = now
    print(f"Digits testbed: {name}: {self.laps[name]:.1f} s")


def _task_slice(stacked: Any, t: int) -> Any:
  """Task `t`'s tree from a tree whose leaves have a leading task axis."""
  return jax.tree.map(lambda leaf: leaf[t], stacked)


def _rounded(names: Sequence[str], values: Sequence[jax.Array]) -> dict[str, float]:
  values = [float(v) for v in values]
  return {**{n: round(v, 4) for n, v in zip(names, values)}, "average": round(float(np.mean(values)), 4)}


def _stack(names: Sequence[str], split: str, image_size: int) -> dict[str, jax.Array]:
  """Every task's split through the CLIP eval transform: images (T, N, S, S, 3), labels (T, N)."""
  images, labels = [], []
  for name in names:
    source = registry.get(name).open_source(split)
    records = [source[i] for i in range(len(source))]
    images.append(np.stack([preprocess.clip_eval(record["image"], image_size) for record in records]))
    labels.append(np.asarray([record["label"] for record in records]))
  return {"images": jnp.asarray(np.stack(images)), "labels": jnp.asarray(np.stack(labels))}


def _heads(graphdef, params, names, tokenize) -> tuple[jax.Array, jax.Array]:
  """Zero-shot heads of the pretrained CLIP, zero-padded to the largest class count.

  Returns:
    heads: (T, C_max, D) rows scaled by exp(logit_scale); class_mask: (T, C_max) bool, True = real class.
  """
  encode_text = jax.jit(functools.partial(functional.call, graphdef, method="encode_text"))
  heads = []
  for name in names:
    task = registry.get(name)
    heads.append(
      np.asarray(
        heads_lib.zero_shot_head(
          encode_text_fn=lambda tokens: encode_text(params, jnp.asarray(tokens)),
          tokenize_fn=tokenize,
          classnames=task.classnames,
          templates=task.templates,
          logit_scale=float(np.asarray(params["logit_scale"])),
        )
      )
    )
  width = max(len(h) for h in heads)
  padded = np.zeros((len(heads), width, heads[0].shape[1]), np.float32)
  class_mask = np.zeros((len(heads), width), bool)
  for t, head in enumerate(heads):
    padded[t, : len(head)], class_mask[t, : len(head)] = head, True
  return jnp.asarray(padded), jnp.asarray(class_mask)


def _task_logits(visual_graphdef, visual, head, class_mask, images) -> jax.Array:
  """(B, C_max) logits of one task's head; padded classes get -1e9."""
  logits = heads_lib.classify(functional.call(visual_graphdef, visual, images), head)
  return jnp.where(class_mask, logits, -1e9)


def _accuracy(visual_graphdef, visual, head, class_mask, images, labels) -> jax.Array:
  """Top-1 accuracy of one task on (N, S, S, 3) preprocessed images."""
  logits = _task_logits(visual_graphdef, visual, head, class_mask, images)
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def _optimizer(lr: float, steps: int, weight_decay: float) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, steps // 10), decay_steps=steps)
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      schedule, weight_decay=weight_decay, mask=lambda tree: jax.tree.map(lambda leaf: leaf.ndim >= 2, tree)
    ),
  )


def _pretrain(
  graphdef, params, images, digits, captions, *, schedule: Schedule, rng: np.random.Generator
) -> Any:
  """Contrastive pretraining of both towers and the logit scale.

  Each step draws `pretrain_batch` images (any task distribution) and one caption per digit (a
  random template each), and minimises the symmetric InfoNCE loss between them: an image's positive
  is its digit's caption; a caption's positives are all the images of its digit (equal weights).

  Args:
    images: (T, N, S, S, 3) preprocessed train images of every task distribution.
    digits: (N,) the digit each image shows (the same across tasks).
    captions: (10, K, L) tokens of K caption templates per digit.
    rng: draws the batches.

  Returns:
    The pretrained CLIP param tree (numpy leaves).
  """
  num_tasks, num_images = images.shape[:2]
  num_digits, num_templates = captions.shape[:2]
  tx = _optimizer(schedule.pretrain_lr, schedule.pretrain_steps, 0.0)

  def loss_fn(params, task, index, template):
    logits, _ = functional.call(
      graphdef, params, images[task, index], captions[jnp.arange(num_digits), template]
    )  # (B, 10)
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, digits[index]).mean()
    positives = jax.nn.one_hot(digits[index], num_digits).T  # (10, B)
    text_to_image = optax.softmax_cross_entropy(logits.T, positives / positives.sum(1, keepdims=True))
    present = positives.sum(1) > 0
    return 0.5 * (image_to_text + jnp.sum(jnp.where(present, text_to_image, 0.0)) / present.sum())

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, task, index, template):
    loss, grads = jax.value_and_grad(loss_fn)(params, task, index, template)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params["logit_scale"] = jnp.minimum(params["logit_scale"], np.log(100.0))  # OpenCLIP's clamp
    return params, opt_state, loss

  opt_state = tx.init(params)
  for _ in range(schedule.pretrain_steps):
    params, opt_state, loss = step(
      params,
      opt_state,
      rng.integers(num_tasks, size=schedule.pretrain_batch),
      rng.integers(num_images, size=schedule.pretrain_batch),
      rng.integers(num_templates, size=num_digits),
    )
  print(f"Digits testbed: pretrained {schedule.pretrain_steps} steps, final InfoNCE loss {float(loss):.3f}")
  return jax.device_get(params)


def _finetune(
  visual_graphdef, visual, heads, class_mask, train, *, schedule: Schedule, rng: np.random.Generator
) -> Any:
  """Fine-tunes one copy of the image tower per task through its frozen head, all tasks at once.

  Args:
    visual: pretrained image-tower tree.
    heads: (T, C_max, D); class_mask: (T, C_max).
    train: images (T, N, S, S, 3), labels (T, N).
    rng: draws the batches.

  Returns:
    The T fine-tuned towers stacked on a leading axis: every leaf (T, ...).
  """
  num_tasks, num_images = train["labels"].shape
  tx = _optimizer(schedule.finetune_lr, schedule.finetune_steps, 0.1)

  def task_step(visual, opt_state, head, mask, images, labels, index):

    def loss_fn(visual):
      logits = _task_logits(visual_graphdef, visual, head, mask, images[index])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(visual)
    updates, opt_state = tx.update(grads, opt_state, visual)
    return optax.apply_updates(visual, updates), opt_state, loss

  step = jax.jit(jax.vmap(task_step), donate_argnums=(0, 1))
  stacked = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_tasks,) + leaf.shape), visual)
  opt_state = jax.vmap(tx.init)(stacked)
  for _ in range(schedule.finetune_steps):
    stacked, opt_state, loss = step(
      stacked,
      opt_state,
      heads,
      class_mask,
      train["images"],
      train["labels"],
      rng.integers(num_images, size=(num_tasks, schedule.finetune_batch)),
    )
  print(
    f"Digits testbed: fine-tuned {schedule.finetune_steps} steps, final cross-entropy per task: "
    f"{', '.join(f'{x:.3f}' for x in np.asarray(loss))}"
  )
  return jax.device_get(stacked)
