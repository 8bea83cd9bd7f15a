"""PEFT LoRA adapter directories -> LoRA factors under our tree paths (`adarank_jax.core.lora` makes them task vectors).

A directory written by PEFT's `save_pretrained` holds adapter_config.json and adapter_model.safetensors, whose
keys are `base_model.model.<module>.lora_A.weight` (r, n_in) and `base_model.model.<module>.lora_B.weight`
(n_out, r), <module> named as in the HF model the adapter was trained on (model.layers.0.self_attn.q_proj
of a LlamaForCausalLM). Every <module> must be a Linear layer of that architecture (`hf.linear_kernels`); its
factors are returned under the tree path of its kernel (model/layers/0/self_attn/q_proj/kernel).

Supported: LoRA with one r and lora_alpha for every module, with or without rsLoRA. Refused with an error
naming the file and the field or key: DoRA (use_dora), per-module rank_pattern / alpha_pattern,
fan_in_fan_out (Conv1D targets), trained biases (bias != 'none', lora_bias), modules_to_save (layers
trained in full beside the adapter), layers_to_transform, exclude_modules, other peft_types, and keys other
than lora_A/lora_B weights (embedding adapters, DoRA magnitudes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from adarank_jax.core import lora
from adarank_jax.interop import hf
from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.interop.hf_config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Fields supported only at PEFT's LoraConfig default, which also fills them in when a file predates them.
_FIXED = {
  "use_dora": False,
  "rank_pattern": {},
  "alpha_pattern": {},
  "fan_in_fan_out": False,
  "bias": "none",
  "lora_bias": False,
  "modules_to_save": None,
  "layers_to_transform": None,
  "exclude_modules": None,
}
_DEFAULTS = {"use_rslora": False, **_FIXED}
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A LoRA adapter of one model.

  Attributes:
    r, lora_alpha, use_rslora: PEFT's fields, shared by every module (see `lora.scaling`).
    factors: tree path of a kernel -> (A (r, n_in), B (n_out, r)), numpy arrays in their stored dtypes.
  """

  r: int
  lora_alpha: float
  use_rslora: bool
  factors: dict[str, tuple[np.ndarray, np.ndarray]]

  def task(self) -> lora.Task:
    """The adapter as a task vector (`lora.Task`: its factors and PEFT's scale)."""
    return lora.Task(self.factors, lora.scaling(self.lora_alpha, self.r, use_rslora=self.use_rslora), self.r)


def is_adapter_dir(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds an adapter_config.json: a PEFT adapter, read (and checked) by `read`."""
  return (Path(directory) / ADAPTER_CONFIG).is_file()


def _targeted(module: str, target_modules: Any) -> bool:
  """PEFT's rule: a list names module suffixes, a string is a regex of the whole name ('all-linear': any)."""
  if isinstance(target_modules, str):
    return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
  return any(module == t or module.endswith(f".{t}") for t in target_modules)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """adapter_config.json of `directory`, PEFT's defaults filled in; errors for what `read` does not support."""
  path = Path(directory) / ADAPTER_CONFIG
  if not path.is_file():
    raise state_dict_lib.CheckpointError(f"{directory}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
  try:
    config = {**_DEFAULTS, **json.loads(path.read_text())}
  except (OSError, json.JSONDecodeError) as e:
    raise state_dict_lib.CheckpointError(f"{path}: unreadable adapter config: {e}") from e
  problems = [
    f"{field}={config[field]!r} (supported: {value!r})"
    for field, value in _FIXED.items()
    if config[field] != value
  ]
  if config["peft_type"] != "LORA":
    problems.insert(0, f"peft_type={config['peft_type']!r} (supported: 'LORA')")
  if problems:
    raise ValueError(f"{path}: unsupported adapter: {'; '.join(problems)}")
  return config


def read(directory: str | os.PathLike, model: ModelConfig) -> Adapter:
  """The LoRA adapter in `directory` for a model of config `model` (the architecture it was trained on).

  Args:
    directory: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    model: our config of the base model, e.g. from `hf.load_hf(base_directory)[0]`.

  Returns:
    The adapter, its factors keyed by our tree paths.

  Raises:
    state_dict_lib.CheckpointError: a missing or unreadable file.
    ValueError naming the file and field or key: an unsupported adapter (see the module docstring), a key
      that is not a lora_A/lora_B weight, a module that is not a Linear layer of `model` or not in
      target_modules, a lora_A without its lora_B (or the reverse), or factors whose shapes do not fit r and
      the layer.
  """
  config = read_config(directory)
  weights = Path(directory) / ADAPTER_WEIGHTS
  state = state_dict_lib.load_state_dict(weights)
  kernels = hf.linear_kernels(model)
  r = config["r"]
  found: dict[str, dict[str, np.ndarray]] = {}
  problems = []
  for key in sorted(state):
    match = _KEY.fullmatch(key)
    if match is None:
      problems.append(f"{key}: not a LoRA weight (expected base_model.model.<module>.lora_A/lora_B.weight)")
      continue
    module, side = match.groups()
    if f"{module}.weight" not in kernels:
      problems.append(f"{key}: {module} is not a Linear layer of {model.architecture}")
    elif not _targeted(module, config["target_modules"]):
      problems.append(f"{key}: {module} is not in target_modules {config['target_modules']!r}")
    else:
      found.setdefault(module, {})[side] = state[key]
  factors = {}
  for module, sides in sorted(found.items()):
    prefix = f"base_model.model.{module}"
    missing = [f"{prefix}.lora_{x}.weight" for x in "AB" if x not in sides]
    if missing:
      problems.append(f"{', '.join(missing)}: missing (the adapter has only lora_{''.join(sides)})")
      continue
    path, (n_in, n_out) = kernels[f"{module}.weight"]
    a, b = sides["A"], sides["B"]
    if a.shape != (r, n_in):
      problems.append(f"{prefix}.lora_A.weight: shape {a.shape}, expected (r, n_in) = {(r, n_in)}")
    if b.shape != (n_out, r):
      problems.append(f"{prefix}.lora_B.weight: shape {b.shape}, expected (n_out, r) = {(n_out, r)}")
    factors[path] = (a, b)
  if not factors and not problems:
    problems.append("no lora_A/lora_B weights")
  if problems:
    raise ValueError(f"{weights}: {len(problems)} problem(s): " + "; ".join(problems))
  return Adapter(r=r, lora_alpha=config["lora_alpha"], use_rslora=config["use_rslora"], factors=factors)
