"""OpenCLIP model-config JSONs -> `clip.CLIPConfig`: by name (open_clip's bundled configs) or path.

Only OpenCLIP's standard ViT CLIP is implemented (`models/clip.py`); every option of another architecture
(timm/HF towers, SigLIP, CoCa, CLIPA, layer scale, ...) is listed in one error naming the file.
"""

import difflib
import importlib.util
import json
import os
from typing import Any

from adarank_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

# open_clip 3.3.0's dataclass defaults (CLIPVisionCfg / CLIPTextCfg) of the fields read here.
_VISION_DEFAULTS = dict(
  image_size=224, patch_size=16, width=768, layers=12, head_width=64, mlp_ratio=4.0, norm_kwargs=None
)
_TEXT_DEFAULTS = dict(
  context_length=77,
  vocab_size=49408,
  width=512,
  heads=8,
  layers=12,
  mlp_ratio=4.0,
  norm_kwargs=None,
  proj_type="linear",
)
# Options whose other values select another architecture: option -> the values of the standard ViT CLIP.
_BLOCK_FIXED = dict(
  ls_init_value=(None,),
  output_tokens=(False,),
  act_kwargs=(None,),
  block_type=(None, "default"),
  qk_norm=(False,),
  scaled_cosine_attn=(False,),
  scale_heads=(False,),
  scale_attn_inner=(False,),
  scale_attn=(False,),
  scale_fc=(False,),
  final_ln_after_pool=(False,),
)
_VISION_FIXED = dict(
  _BLOCK_FIXED,
  attentional_pool=(False,),
  no_ln_pre=(False,),
  pos_embed_type=("learnable", "sin_cos_2d"),
  pool_type=("tok",),
  timm_model_name=(None,),
)
_TEXT_FIXED = dict(
  _BLOCK_FIXED,
  embed_cls=(False,),
  no_causal_mask=(False,),
  pool_type=("argmax",),
  proj_bias=(False,),
  hf_model_name=(None,),
  hf_tokenizer_name=(None, ""),
  tokenizer_kwargs=(None, {}, {"clean": "lower"}),
)  # data/clip_tokenizer.py is CLIP's BPE
_TOP_FIXED = dict(
  custom_text=(False,), init_logit_bias=(None,), multimodal_cfg=(None,), nonscalar_logit_scale=(False,)
)
# Options without effect on inference weights or outputs (training-only, tokenizer, or unused with the above).
_VISION_IGNORED = {
  "patch_dropout",
  "attn_pooler_queries",
  "attn_pooler_heads",
  "timm_model_pretrained",
  "timm_pool",
  "timm_proj",
  "timm_proj_bias",
  "timm_drop",
  "timm_drop_path",
}
_TEXT_IGNORED = {
  "tokenizer_mode",
  "pad_id",
  "eos_id",
  "hf_model_pretrained",
  "hf_proj_type",
  "hf_pooler_type",
}
_TOP_IGNORED = {"init_logit_scale"}


def _unsupported(cfg: dict, prefix: str, read: set[str], fixed: dict, ignored: set[str]) -> list[str]:
  """Descriptions of the options in `cfg` this port does not implement."""
  problems = []
  for key, value in cfg.items():
    if key in fixed:
      if value not in fixed[key]:
        problems.append(f"{prefix}{key}={value!r} (supported: {' or '.join(map(repr, fixed[key]))})")
    elif key not in read and key not in ignored:
      problems.append(f"{prefix}{key} (unknown option)")
  return problems


def _square(value: Any, key: str, problems: list[str]) -> int:
  if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
    value = value[0]
  if not isinstance(value, int):
    problems.append(f"{key}={value!r} (supported: an int, i.e. square)")
    return 1
  return value


def _ln_eps(norm_kwargs: dict | None, key: str, problems: list[str]) -> float:
  if norm_kwargs is None:
    return 1e-5
  if set(norm_kwargs) != {"eps"}:
    problems.append(f'{key}={norm_kwargs!r} (supported: None or {{"eps": x}})')
    return 1e-5
  return float(norm_kwargs["eps"])


def config_from_dict(raw: dict, *, source: str) -> CLIPConfig:
  """Parses an OpenCLIP model config (or an HF-hub open_clip_config.json with `model_cfg`).

  Raises:
    ValueError naming `source`: missing sections, or every option of a non-standard architecture.
  """
  cfg = {"quick_gelu": False, **(raw["model_cfg"] if "model_cfg" in raw else raw)}
  missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
  if missing:
    raise ValueError(f"{source}: not an OpenCLIP model config; missing keys {missing}.")
  vision = {**_VISION_DEFAULTS, **cfg["vision_cfg"]}
  text = {**_TEXT_DEFAULTS, **cfg["text_cfg"]}
  problems = (
    _unsupported(cfg, "", {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}, _TOP_FIXED, _TOP_IGNORED)
    + _unsupported(vision, "vision_cfg.", set(_VISION_DEFAULTS), _VISION_FIXED, _VISION_IGNORED)
    + _unsupported(text, "text_cfg.", set(_TEXT_DEFAULTS), _TEXT_FIXED, _TEXT_IGNORED)
  )
  if not isinstance(vision["layers"], int):
    problems.append(
      f"vision_cfg.layers={vision['layers']!r} (a list selects the ModifiedResNet tower; supported: an int)"
    )
  if text["proj_type"] not in ("linear", "none"):
    problems.append(f'text_cfg.proj_type={text["proj_type"]!r} (supported: "linear" or "none")')
  image_size = _square(vision["image_size"], "vision_cfg.image_size", problems)
  patch_size = _square(vision["patch_size"], "vision_cfg.patch_size", problems)
  vision_eps = _ln_eps(vision["norm_kwargs"], "vision_cfg.norm_kwargs", problems)
  text_eps = _ln_eps(text["norm_kwargs"], "text_cfg.norm_kwargs", problems)
  if problems:
    raise ValueError(
      f"{source}: unsupported OpenCLIP config; this port implements only the standard "
      f"ViT CLIP (pre-LN blocks, class-token pooling, causal text tower pooled at argmax). "
      f"Unsupported: {'; '.join(problems)}."
    )
  act = "quick_gelu" if cfg["quick_gelu"] else "gelu"
  return CLIPConfig(
    vision=VisionConfig(
      image_size=image_size,
      patch_size=patch_size,
      width=vision["width"],
      layers=vision["layers"],
      heads=vision["width"] // vision["head_width"],
      mlp_width=int(vision["width"] * vision["mlp_ratio"]),
      output_dim=cfg["embed_dim"],
      act=act,
      ln_eps=vision_eps,
    ),
    text=TextConfig(
      context_length=text["context_length"],
      vocab_size=text["vocab_size"],
      width=text["width"],
      layers=text["layers"],
      heads=text["heads"],
      mlp_width=int(text["width"] * text["mlp_ratio"]),
      output_dim=None if text["proj_type"] == "none" else cfg["embed_dim"],
      act=act,
      ln_eps=text_eps,
    ),
  )


def package_path(*parts: str, what: str, instead: str) -> str:
  """A file or folder open_clip ships, located without importing open_clip (or torch).

  Raises:
    ValueError: open_clip is not installed ("... so {what} cannot be found; {instead}").
  """
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"open_clip is not installed, so {what} cannot be found; {instead}")
  return os.path.join(spec.submodule_search_locations[0], *parts)


def config_dir() -> str:
  """open_clip's bundled model_configs folder."""
  return package_path(
    "model_configs", what="its model configs by name", instead="pass the path of a model-config JSON instead."
  )


def read_config(name_or_path: str | os.PathLike) -> tuple[dict, str]:
  """(the JSON dict, its path) of an OpenCLIP model config given by name ('ViT-B-32') or JSON path.

  Raises:
    ValueError: unknown name (with close matches) or unreadable file.
  """
  name = os.fspath(name_or_path)
  if name.endswith(".json") or os.path.isfile(name):
    path = name
  else:
    folder = config_dir()
    path = os.path.join(folder, f"{name}.json")
    if not os.path.isfile(path):
      known = sorted(f[: -len(".json")] for f in os.listdir(folder) if f.endswith(".json"))
      raise ValueError(
        f"Unknown OpenCLIP model config {name!r}; close matches: "
        f"{difflib.get_close_matches(name, known)}; all names: the JSONs in {folder}."
      )
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f), path
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the OpenCLIP model config: {e}") from e


def load_config(name_or_path: str | os.PathLike) -> CLIPConfig:
  """Reads and parses an OpenCLIP model config by name ('ViT-B-32', 'ViT-L-14-quickgelu') or JSON path.

  Raises:
    ValueError: unknown name (with close matches), unreadable file, or a non-standard architecture
      (timm/HF towers, SigLIP, CoCa, CLIPA, layer scale, ...), listing every unsupported option.
  """
  raw, path = read_config(name_or_path)
  return config_from_dict(raw, source=path)
