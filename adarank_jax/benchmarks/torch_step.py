"""PyTorch baseline of the AdaRank training step, in the official formulation (for measurement only).

The variant is the benchmark's (`--arch`): the OpenCLIP image tower, or a Llama, Mistral or Qwen2 sequence
classifier of `transformers` (see "Decoders" below); everything else is one code path.

This module re-states, in PyTorch, the step of the official AdaRank vision code
(david3684/AdaRank, `vision/src/models/merge_vit/adaptive.py`; docs/algorithm.md, sections 3-4), so that
`adarank_jax.benchmarks.step` can be timed side by side with it on identical inputs. It is a baseline for
measurement and for an equality test (`tests/benchmarks/test_benchmark_torch.py`); it is not used by any
merging run.

The official formulation, as written here:
  - the model is an OpenCLIP image tower (`open_clip` `.visual`); its state dict is the origin
    theta_0 ('pretrained', Task Arithmetic) or the mean of the fine-tuned towers ('average', CART);
  - task vectors tau_t[k] = theta_t[k] - origin[k] for every tensor k of the tower (every tensor is
    merged);
  - the decomposed keys are those with ('attn' in key or 'mlp' in key) and not ('ln' in key or
    'bias' in key): the packed q|k|v `in_proj_weight`, `out_proj.weight`, `c_fc.weight` and
    `c_proj.weight` of every block. Each task's matrix gets a full thin SVD,
    `torch.linalg.svd(tau, full_matrices=False)`, one call per (key, task) as `_svd_vanilla` does;
  - trainable: one mask-logit tensor M_k of shape (T, r) per decomposed key (+0.1, or -0.1 at
    indices >= int(rho * r)), and one coefficient tensor lambda of shape (T, number of merged
    tensors), filled with `prior`;
  - every step: p = sigmoid(M / temperature); s_masked = p * s + ((p > 0.5) - p) * s, the second
    term detached (straight-through); W_k = origin_k + sum_t lambda_{t,k} (U_t * s_masked_t) @ Vt_t
    for decomposed keys, W_k = origin_k + sum_t lambda_{t,k} tau_t[k] for the others; the merged
    state dict runs through `torch.func.functional_call` once per task on that task's images;
    features are L2-normalised, logits = features @ head_t (heads carry CLIP's logit scale 100);
    loss = sum_t batch-mean entropy of softmax(logits); backward; Adam(lr, (0.9, 0.999)) step;
    zero_grad.

Inputs are those of the JAX benchmark (`adarank_jax.benchmarks.step.make_inputs`): a random-init Flax
`clip.VisionTransformer` converted to an OpenCLIP state dict, T copies with Gaussian noise, random
unit-norm heads times 100, and numpy images, NHWC for JAX, transposed to NCHW for torch.

Decoders (`step.make_decoder_inputs`; the official GPT-2 rule carried over, as the CLI's
`DECOMPOSE['decoder']` and `UNMERGED['decoder']`): the model is `transformers.XForSequenceClassification`
built from the benchmark's config fields, its body's state dict the merged one; `model.embed_tokens.weight`
gets no task vector (it stays at the origin); the decomposed keys are the attention and MLP projection
weights (('self_attn' or 'mlp' in the key) and not 'bias'); the rest (norms, Qwen2's q/k/v biases) are dense
task vectors. Task t's logits are `functional_call` of the classifier with the merged body and task t's
`score.weight`, on its token ids and attention mask (the score read at the last non-pad token, as
transformers does); the loss is the same sum of the tasks' entropies.

  python -m adarank_jax.benchmarks.torch_step --arch ViT-B-32 --tasks 8 --batch 4 --steps 3
  python -m adarank_jax.benchmarks.torch_step --arch qwen2_0.5b --tasks 4 --batch 4 --seq-len 128

prints the machine, the timings of the task vectors, the decomposition, the first step and the
median step, the peak host RSS, and one line `result: {json}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import torch

from adarank_jax.benchmarks import step as benchmark
from adarank_jax.benchmarks.step import DecoderInputs, Inputs
from adarank_jax.core import layout, tree_util
from adarank_jax.interop import hf, keymap
from adarank_jax.interop import openclip as openclip_interop

ORIGINS = ("pretrained", "average")


# ------------------------------------------------------------------------------------------ torch side


def openclip_visual(arch: str | os.PathLike) -> torch.nn.Module:
  """The OpenCLIP image tower of `arch` (random init, eval mode): a config name or a JSON path."""
  import open_clip  # pylint: disable=g-import-not-at-top

  name = os.fspath(arch)
  if name.endswith(".json") or os.path.isfile(name):
    with open(name, encoding="utf-8") as f:
      cfg = json.load(f)
    model = open_clip.model.CLIP(**cfg)
  else:
    model = open_clip.create_model(name, pretrained=None)
  return model.visual.eval()


def openclip_keys(tree: Mapping[Any, Any]) -> dict[str, str]:
  """Flat Flax path -> key of the OpenCLIP image tower (no 'visual.' prefix), for every leaf."""
  flat = tree_util.flatten(tree)
  state = openclip_interop.state_dict_from_tree(tree, prefix="")
  if len(state) != len(flat):
    raise AssertionError(f"openclip_keys: {len(flat)} paths map to {len(state)} keys")
  keys = {}
  for (path, leaf), (key, value) in zip(flat.items(), state.items()):  # same order by construction
    if np.size(leaf) != np.size(value) or sorted(np.shape(leaf)) != sorted(np.shape(value)):
      raise AssertionError(f"openclip_keys: {path} {np.shape(leaf)} vs {key} {np.shape(value)}")
    keys[path] = key
  return keys


def is_decomposed(key: str) -> bool:
  """The official rule: ('attn' or 'mlp' in the key) and neither 'ln' nor 'bias' in it."""
  return ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


def decoder_is_decomposed(key: str) -> bool:
  """Decoders: the attention and MLP projection weights, ('self_attn' or 'mlp' in the key), no 'bias'."""
  return ("self_attn" in key or "mlp" in key) and "bias" not in key


def decoder_is_unmerged(key: str) -> bool:
  """Decoders: the token embeddings get no task vector (GPT-2's wte carried over)."""
  return "embed_tokens" in key


def decoder_keys(inputs: DecoderInputs) -> dict[str, str]:
  """Flat Flax path -> HF key of the classifier, for every leaf of the merged body."""
  abstract, rules, _ = hf.key_layout(inputs.config)
  plan = keymap.resolve(rules, abstract, source=inputs.arch)
  keys = {}
  for path in tree_util.flatten(inputs.pretrained):
    _, names = plan[path]
    if len(names) != 1:
      raise AssertionError(f"decoder_keys: {path} maps to {names}")
    keys[path] = names[0]
  return keys


def decoder_state_dict(
  config: Any, head: np.ndarray, tree: Mapping[Any, Any], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
  """A Flax classifier body (of DecoderConfig `config`) as the transformers classifier's state dict,
  without the score, of float32 tensors (`head`, one task's score kernel, completes the tree to check)."""
  state = hf.state_dict_from_tree(config, {**tree, "score": {"kernel": head}})
  return {
    key: torch.from_numpy(np.array(value, np.float32)).to(device)
    for key, value in state.items()
    if key != "score.weight"
  }


def decoder_model(inputs: DecoderInputs) -> torch.nn.Module:
  """transformers' XForSequenceClassification of the benchmark's config fields (random init, eval mode)."""
  import transformers  # pylint: disable=g-import-not-at-top

  fields = dict(inputs.fields)
  config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  architecture = getattr(transformers, inputs.config.architecture)
  return architecture(config).eval()


def to_state_dict(tree: Mapping[Any, Any], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
  """A Flax image-tower tree as an OpenCLIP `.visual` state dict of float32 torch tensors.

  Arrays that are already contiguous, writable float32 are shared with the tree, not copied
  (kernels and convolutions are transposed, hence copied).
  """
  state = {}
  for key, value in openclip_interop.state_dict_from_tree(tree, prefix="").items():
    value = np.ascontiguousarray(value, np.float32)
    if not value.flags.writeable:  # e.g. a view of a JAX buffer
      value = value.copy()
    state[key] = torch.from_numpy(value).to(device)
  return state


def task_vectors(
  pretrained: Mapping[str, torch.Tensor],
  finetuned: Sequence[Mapping[str, torch.Tensor]],
  *,
  origin: str = "pretrained",
  unmerged: Callable[[str], bool] = lambda key: False,
) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
  """(origin state dict, key -> [tau_t for t]): tau_t = theta_t - origin for every tensor but the
  `unmerged` keys (they stay at the origin)."""
  if origin not in ORIGINS:
    raise ValueError(f"task_vectors: origin={origin!r}; expected one of {ORIGINS}")
  with torch.no_grad():
    if origin == "pretrained":
      base = dict(pretrained)
    else:
      base = {k: torch.stack([sd[k] for sd in finetuned]).mean(0) for k in pretrained}
    tau = {k: [sd[k] - base[k] for sd in finetuned] for k in base if not unmerged(k)}
  return base, tau


def svd_vanilla(
  tau: Mapping[str, Sequence[torch.Tensor]], decomposed: Callable[[str], bool] = is_decomposed
) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], dict[str, list[torch.Tensor]]]:
  """Full thin SVD of every `decomposed` key's task vectors, one call per (key, task).

  Returns:
    (svd: key -> [(U (m, r), s (r,), Vt (r, n)) for t], dense: key -> [tau_t for t]).
  """
  svd, dense = {}, {}
  with torch.no_grad():
    for key, per_task in tau.items():
      if decomposed(key):
        svd[key] = [tuple(torch.linalg.svd(x, full_matrices=False)) for x in per_task]
      else:
        dense[key] = list(per_task)
  return svd, dense


def initial_mask_logits(num_tasks: int, rank: int, initial_rank_ratio: float) -> torch.Tensor:
  """(T, r): +0.1, and -0.1 at indices >= int(rho * r) (rho == 0 means 1 / T)."""
  ratio = 1.0 / num_tasks if initial_rank_ratio == 0 else initial_rank_ratio
  logits = torch.full((num_tasks, rank), 0.1)
  logits[:, int(ratio * rank) :] = -0.1
  return logits


def entropy(logits: torch.Tensor) -> torch.Tensor:
  """Batch-mean Shannon entropy of softmax(logits)."""
  return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


# task_logits(merged state dict, t, task t's batch) -> (B, classes) logits of task t's head.
TaskLogits = Callable[[Mapping[str, torch.Tensor], int, Any], torch.Tensor]


def clip_logits(visual: torch.nn.Module, heads: torch.Tensor) -> TaskLogits:
  """The image tower with the merged state dict on task t's images; L2-normalised features @ heads[t]
  (heads (T, features, classes), logit scale included)."""

  def task_logits(merged, t, images):
    features = torch.func.functional_call(visual, merged, (images,))
    features = features / features.norm(dim=-1, keepdim=True)
    return features @ heads[t]

  return task_logits


def decoder_logits(model: torch.nn.Module, heads: torch.Tensor) -> TaskLogits:
  """The classifier with the merged body and task t's score weight (heads (T, classes, hidden)) on task
  t's {input_ids, attention_mask}: transformers' logits at the last non-pad token."""

  def task_logits(merged, t, batch):
    return torch.func.functional_call(model, {**merged, "score.weight": heads[t]}, (), dict(batch)).logits

  return task_logits


class OfficialStep:
  """The trainable masks and coefficients of the official step, and the step itself.

  Args:
    task_logits: task t's logits from the merged state dict (`clip_logits`, `decoder_logits`); the
      model's own parameters are never used where the merged state dict has the key.
    origin: key -> origin tensor, for every tensor of the merged model.
    svd: key -> T (U, s, Vt) from `svd_vanilla`.
    dense: key -> T task vectors, for the merged keys that are not decomposed.
    num_tasks: T.
    device: where the trainables live.
    prior: initial value of every coefficient.
    initial_rank_ratio: rho of the mask init.
    temperature: mask temperature.
    lr: Adam learning rate.
    paths: key -> Flax path, the names under which gradients and values are reported (default:
      the keys themselves).
  """

  def __init__(
    self,
    task_logits: TaskLogits,
    origin: Mapping[str, torch.Tensor],
    svd: Mapping[str, Sequence[tuple[torch.Tensor, ...]]],
    dense: Mapping[str, Sequence[torch.Tensor]],
    *,
    num_tasks: int,
    device: str | torch.device = "cpu",
    prior: float = 0.3,
    initial_rank_ratio: float = 1.0,
    temperature: float = 10.0,
    lr: float = 1e-3,
    paths: Mapping[str, str] | None = None,
  ):
    self.task_logits = task_logits
    self.origin = dict(origin)
    self.svd = {k: list(v) for k, v in svd.items()}
    self.dense = {k: list(v) for k, v in dense.items()}
    self.temperature = temperature
    self.num_tasks = num_tasks
    self.merged_keys = [k for k in self.origin if k in self.svd or k in self.dense]
    self.column = {k: i for i, k in enumerate(self.merged_keys)}
    self.paths = dict(paths) if paths is not None else {k: k for k in self.origin}
    self.mask_logits = {
      k: torch.nn.Parameter(
        initial_mask_logits(self.num_tasks, factors[0][1].shape[0], initial_rank_ratio).to(device)
      )
      for k, factors in self.svd.items()
    }
    self.coefficients = torch.nn.Parameter(
      torch.full((self.num_tasks, len(self.merged_keys)), float(prior), device=device)
    )
    self.optimizer = torch.optim.Adam(
      [*self.mask_logits.values(), self.coefficients], lr=lr, betas=(0.9, 0.999)
    )

  def merged_state_dict(self) -> dict[str, torch.Tensor]:
    """origin + sum_t lambda_t (straight-through masked SVD or dense tau), for every key."""
    merged = {}
    for key, base in self.origin.items():
      if key in self.svd:
        p = torch.sigmoid(self.mask_logits[key] / self.temperature)
        hard = (p > 0.5).float()
        weight = base
        for t, (u, s, vt) in enumerate(self.svd[key]):
          s_masked = p[t] * s + ((hard[t] - p[t]) * s).detach()
          weight = weight + self.coefficients[t, self.column[key]] * ((u * s_masked) @ vt)
        merged[key] = weight
      elif key in self.dense:
        weight = base
        for t, tau in enumerate(self.dense[key]):
          weight = weight + self.coefficients[t, self.column[key]] * tau
        merged[key] = weight
      else:
        merged[key] = base
    return merged

  def loss(self, batches: Sequence[Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum_t H_t, [H_t]) on the tasks' batches (batches[t] is task t's), differentiable."""
    merged = self.merged_state_dict()
    entropies = [entropy(self.task_logits(merged, t, batches[t])) for t in range(self.num_tasks)]
    return sum(entropies), entropies

  def step(self, batches: Sequence[Any]) -> float:
    """One training step (merge, forward, backward, Adam, zero_grad); the loss before the update."""
    loss, _ = self.loss(batches)
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad()
    return loss.item()

  def loss_and_grads(
    self, batches: Sequence[Any]
  ) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(loss, path -> d loss / d mask logits (T, r), path -> d loss / d coefficients (T,)).

    No optimizer step; the gradients are cleared afterwards.
    """
    self.optimizer.zero_grad()
    loss, _ = self.loss(batches)
    loss.backward()
    mask_grads = {self.paths[k]: v.grad.detach().cpu().numpy().copy() for k, v in self.mask_logits.items()}
    coef = self.coefficients.grad.detach().cpu().numpy()
    coef_grads = {self.paths[k]: coef[:, i].copy() for k, i in self.column.items()}
    self.optimizer.zero_grad()
    return loss.item(), mask_grads, coef_grads

  def values(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(path -> mask logits (T, r), path -> coefficients (T,)), numpy copies."""
    masks = {self.paths[k]: v.detach().cpu().numpy().copy() for k, v in self.mask_logits.items()}
    coef = self.coefficients.detach().cpu().numpy()
    return masks, {self.paths[k]: coef[:, i].copy() for k, i in self.column.items()}


def torch_images(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
  """(T, B, H, W, 3) NHWC numpy -> (T, B, 3, H, W) NCHW float32 torch."""
  nchw = np.ascontiguousarray(images.transpose(0, 1, 4, 2, 3), np.float32)
  return torch.from_numpy(nchw).to(device)


@dataclasses.dataclass
class Problem:
  """What the official step needs of a benchmark problem, as torch: the one place CLIP and decoders differ.

  Attributes:
    model: the torch module `task_logits` calls (its own parameters are replaced by the merged ones).
    paths: torch key -> flat Flax path, for every tensor of the merged model.
    state_dict: a Flax tree of the merged model -> its float32 torch state dict.
    decomposed: the keys the official rule decomposes.
    unmerged: the keys that get no task vector.
    task_logits: see `TaskLogits`.
    batches: T task batches (CLIP: (T, B, 3, H, W) NCHW images; decoders: T dicts of int64 tensors).
  """

  model: torch.nn.Module
  paths: dict[str, str]
  state_dict: Callable[[Mapping[Any, Any]], dict[str, torch.Tensor]]
  decomposed: Callable[[str], bool]
  unmerged: Callable[[str], bool]
  task_logits: TaskLogits
  batches: Any


def problem(inputs: Inputs | DecoderInputs, device: str | torch.device = "cpu") -> Problem:
  """The torch side of `inputs`: its model, key rules and batches (the inputs' trees are not kept)."""
  if isinstance(inputs, DecoderInputs):
    model = decoder_model(inputs).to(device)
    config, head = inputs.config, inputs.heads[0]
    as_long = lambda x: torch.from_numpy(x.astype(np.int64)).to(device)
    return Problem(
      model=model,
      paths={key: path for path, key in decoder_keys(inputs).items()},
      state_dict=lambda tree: decoder_state_dict(config, head, tree, device),
      decomposed=decoder_is_decomposed,
      unmerged=decoder_is_unmerged,
      task_logits=decoder_logits(model, torch.from_numpy(inputs.heads.transpose(0, 2, 1).copy()).to(device)),
      batches=[
        {"input_ids": as_long(ids), "attention_mask": as_long(mask)}
        for ids, mask in zip(inputs.input_ids, inputs.attention_mask)
      ],
    )
  visual = openclip_visual(inputs.arch).to(device)
  return Problem(
    model=visual,
    paths={key: path for path, key in openclip_keys(inputs.pretrained).items()},
    state_dict=lambda tree: to_state_dict(tree, device),
    decomposed=is_decomposed,
    unmerged=lambda key: False,
    task_logits=clip_logits(visual, torch.from_numpy(inputs.heads).to(device)),
    batches=torch_images(inputs.images, device),
  )


def share_origin(model: torch.nn.Module, origin: Mapping[str, torch.Tensor]) -> None:
  """Makes `model`'s parameters the `origin` tensors, without a copy, so that its random init does not stay
  in memory beside them: `functional_call` replaces every one of them with the merged tensor anyway.
  The decoders' `score.weight` (not in `origin`) keeps its own."""
  model.requires_grad_(False)
  result = model.load_state_dict(origin, strict=False, assign=True)
  if result.unexpected_keys:
    raise AssertionError(f"share_origin: keys the model does not have: {result.unexpected_keys[:5]}")


def build(
  inputs: Inputs | DecoderInputs,
  *,
  origin: str = "pretrained",
  initial_rank_ratio: float = 1.0,
  prior: float = 0.3,
  temperature: float = 10.0,
  lr: float = 1e-3,
  device: str | torch.device = "cpu",
) -> tuple[OfficialStep, Any]:
  """The official step on `inputs` (untimed), and the torch batches."""
  torch_side = problem(inputs, device)
  pretrained = torch_side.state_dict(inputs.pretrained)
  finetuned = [torch_side.state_dict(inputs.finetuned(t)) for t in range(inputs.num_tasks)]
  base, tau = task_vectors(pretrained, finetuned, origin=origin, unmerged=torch_side.unmerged)
  share_origin(torch_side.model, base)
  svd, dense = svd_vanilla(tau, torch_side.decomposed)
  step = OfficialStep(
    torch_side.task_logits,
    base,
    svd,
    dense,
    num_tasks=inputs.num_tasks,
    device=device,
    prior=prior,
    initial_rank_ratio=initial_rank_ratio,
    temperature=temperature,
    lr=lr,
    paths=torch_side.paths,
  )
  return step, torch_side.batches


def loss_and_grads(
  step: OfficialStep, batches: Any
) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """`step.loss_and_grads(batches)`: the loss and the gradients keyed by flat Flax paths."""
  return step.loss_and_grads(batches)


# ------------------------------------------------------------------------------------------ CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--arch", default="ViT-B-32", help="as the JAX benchmark's --arch (CLIP or a decoder shape)"
  )
  parser.add_argument("--tasks", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the first one")
  parser.add_argument("--batch", type=int, default=4, help="images (decoders: sequences) per task per step")
  parser.add_argument("--seq-len", type=int, default=128, help="decoders: tokens per sequence")
  parser.add_argument("--layers", type=int, default=None, help="decoders: replace the shape's layer count")
  parser.add_argument("--vocab", type=int, default=None, help="decoders: replace the shape's vocabulary size")
  parser.add_argument("--classes", type=int, default=10, help="classes of every random head")
  parser.add_argument("--origin", choices=ORIGINS, default="pretrained")
  parser.add_argument("--initial-rank-ratio", type=float, default=1.0)
  parser.add_argument("--prior", type=float, default=0.3)
  parser.add_argument("--noise", type=float, default=1e-3, help="std of the fine-tuning noise")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--device", default="cpu", help="torch device: 'cpu' or 'cuda'")
  parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: os.cpu_count())")
  return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _host_peak_rss_gb() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def main(argv: list[str] | None = None) -> dict[str, object]:
  """Builds the inputs, times the official step and returns (and prints) the results."""
  args = _parse_args(argv)
  torch.set_num_threads(args.threads or os.cpu_count() or 1)
  device = torch.device(args.device)
  host = layout.machine()
  result: dict[str, object] = {
    "args": vars(args),
    "machine": {
      "cpu": host["cpu"],
      "isa": host["isa"],
      "cpu_count": os.cpu_count(),
      "host": platform.machine(),
      "torch": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
    },
  }
  print("machine:", json.dumps(result["machine"]))
  result["host_peak_rss_imports_gb"] = _host_peak_rss_gb()  # JAX and torch imported

  inputs = benchmark.build_inputs(args, compute_dtype="float32")
  torch_side = problem(inputs, device)
  pretrained = torch_side.state_dict(inputs.pretrained)
  # One tree at a time, so the numpy and torch copies never all coexist.
  finetuned = [torch_side.state_dict(inputs.finetuned(t)) for t in range(inputs.num_tasks)]
  num_params = sum(v.numel() for v in pretrained.values())
  del inputs
  result["host_peak_rss_inputs_gb"] = _host_peak_rss_gb()
  print(
    f"{benchmark.config_label(args)}: {num_params / 1e6:.1f}M params in the merged model; inputs built "
    f"(host peak RSS so far {result['host_peak_rss_inputs_gb']} GB)"
  )

  _sync(device)
  start = time.perf_counter()
  base, tau = task_vectors(pretrained, finetuned, origin=args.origin, unmerged=torch_side.unmerged)
  _sync(device)
  result["task_vectors_s"] = time.perf_counter() - start
  share_origin(torch_side.model, base)
  del finetuned, pretrained
  start = time.perf_counter()
  svd, dense = svd_vanilla(tau, torch_side.decomposed)
  _sync(device)
  result["decompose_s"] = time.perf_counter() - start
  del tau
  print(f"task vectors {result['task_vectors_s']:.2f} s, decomposition {result['decompose_s']:.2f} s")

  official = OfficialStep(
    torch_side.task_logits,
    base,
    svd,
    dense,
    num_tasks=args.tasks,
    device=device,
    prior=args.prior,
    initial_rank_ratio=args.initial_rank_ratio,
    lr=1e-3,
    paths=torch_side.paths,
  )
  batches = torch_side.batches
  start = time.perf_counter()
  loss = official.step(batches)
  _sync(device)
  result["first_step_s"] = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = official.step(batches)  # .item() inside: the step has finished
    times.append(time.perf_counter() - start)
  result["step_s"] = times
  result["step_s_median"] = statistics.median(times) if times else None
  result["steps_per_s"] = 1.0 / result["step_s_median"] if times else None
  result["loss"] = loss
  result["host_peak_rss_gb"] = _host_peak_rss_gb()
  result["torch_threads"] = torch.get_num_threads()
  if device.type == "cuda":
    result["device_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
  print(
    f"first step {result['first_step_s']:.3f} s; median of {args.steps} steps "
    f"{result['step_s_median'] or 0:.3f} s = {result['steps_per_s'] or 0:.3f} steps/s; "
    f"loss {loss:.4f}; host peak RSS {result['host_peak_rss_gb']} GB"
  )
  print("result:", json.dumps(result))
  return result


if __name__ == "__main__":
  # The inputs are built with JAX on the host; keep JAX off any accelerator (no preallocation there).
  jax.config.update("jax_platforms", "cpu")
  main()
