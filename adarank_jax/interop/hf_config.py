"""Hugging Face config.json dicts -> the model configs of `adarank_jax.models`.

model_type roberta, bert -> roberta.RobertaConfig; gpt2 -> gpt2.GPT2Config; llama, mistral, qwen2 ->
decoder.DecoderConfig; clip_vision_model, clip -> clip.VisionConfig (the image tower; act 'quick_gelu' as HF
CLIP). transformers is imported lazily, only to fill HF's config defaults in (`complete`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from adarank_jax.models import clip, decoder, gpt2, roberta

ModelConfig = roberta.RobertaConfig | gpt2.GPT2Config | decoder.DecoderConfig | clip.VisionConfig

_POSITION_IDS = {"roberta": "padding_offset", "bert": "absolute"}


def single_architecture(config: Mapping[str, Any], allowed: Sequence[str] | None = None) -> str:
  """The one HF class `config['architectures']` names; ValueError unless exactly one (of `allowed`)."""
  architectures = config["architectures"]
  if (
    not architectures or len(architectures) != 1 or (allowed is not None and architectures[0] not in allowed)
  ):
    expected = "exactly one architecture" + ("" if allowed is None else f" of {list(allowed)}")
    raise ValueError(f"config.json must name {expected}, got {architectures!r}")
  return architectures[0]


def roberta_config(config: Mapping[str, Any], *, dtype: str = "float32") -> roberta.RobertaConfig:
  """The RobertaConfig of a complete HF config.json dict (model_type roberta or bert).

  `config` must hold every field HF writes (transformers' `to_dict()` form, see `complete`).
  """
  model_type = config["model_type"]
  if model_type not in _POSITION_IDS:
    raise ValueError(f"model_type {model_type!r} is not one of {sorted(_POSITION_IDS)}")
  # transformers 5 dropped this field (absolute only) but older config.json files carry it.
  if "position_embedding_type" in config and config["position_embedding_type"] != "absolute":
    raise ValueError(
      f"position_embedding_type {config['position_embedding_type']!r} is not supported (only 'absolute')"
    )
  architecture = single_architecture(config)
  return roberta.RobertaConfig(
    architecture=architecture,
    vocab_size=config["vocab_size"],
    hidden_size=config["hidden_size"],
    num_hidden_layers=config["num_hidden_layers"],
    num_attention_heads=config["num_attention_heads"],
    intermediate_size=config["intermediate_size"],
    hidden_act=config["hidden_act"],
    max_position_embeddings=config["max_position_embeddings"],
    type_vocab_size=config["type_vocab_size"],
    layer_norm_eps=config["layer_norm_eps"],
    pad_token_id=config["pad_token_id"],
    position_ids=_POSITION_IDS[model_type],
    num_labels=(len(config["id2label"]) if architecture.endswith("ForSequenceClassification") else None),
    dtype=dtype,
  )


def gpt2_config(config: Mapping[str, Any], *, dtype: str = "float32") -> gpt2.GPT2Config:
  """The GPT2Config of a complete HF config.json dict (model_type gpt2; see `complete`)."""
  if config["model_type"] != "gpt2":
    raise ValueError(f"model_type {config['model_type']!r} is not 'gpt2'")
  if config["add_cross_attention"]:
    raise ValueError("add_cross_attention=True (GPT-2 with cross-attention) is not supported")
  architecture = single_architecture(config)
  if architecture == "GPT2LMHeadModel" and not config["tie_word_embeddings"]:
    raise ValueError(
      "GPT2LMHeadModel with tie_word_embeddings=False is not supported (its lm_head would not be kept)"
    )
  return gpt2.GPT2Config(
    architecture=architecture,
    vocab_size=config["vocab_size"],
    n_positions=config["n_positions"],
    n_embd=config["n_embd"],
    n_layer=config["n_layer"],
    n_head=config["n_head"],
    n_inner=config["n_inner"],
    activation_function=config["activation_function"],
    layer_norm_epsilon=config["layer_norm_epsilon"],
    scale_attn_weights=config["scale_attn_weights"],
    scale_attn_by_inverse_layer_idx=config["scale_attn_by_inverse_layer_idx"],
    pad_token_id=config["pad_token_id"],
    num_labels=(len(config["id2label"]) if architecture == "GPT2ForSequenceClassification" else None),
    dtype=dtype,
  )


def decoder_config(config: Mapping[str, Any], *, dtype: str = "float32") -> decoder.DecoderConfig:
  """The DecoderConfig of a complete HF config.json dict (model_type llama, mistral or qwen2; see `complete`).

  transformers 5 keeps rope_theta and rope_scaling in `rope_parameters` (`complete` moves them there).
  head_dim is HF's: the field when set, else hidden_size // num_attention_heads. Which layers slide
  follows the modeling code: Mistral, every layer when sliding_window is set (it ignores layer_types);
  Qwen2, the layers of its layer_types (made from use_sliding_window and max_window_layers).
  """
  model_type = config["model_type"]
  if model_type not in decoder.MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not one of {list(decoder.MODEL_TYPES)}")
  rope = dict(config["rope_parameters"])
  rope.pop("type", None)  # transformers 4's name of rope_type, kept beside it by the conversion
  known = {f.name for f in dataclasses.fields(decoder.RopeParameters)}
  if set(rope) - known:
    raise ValueError(
      f"rope_parameters fields {sorted(set(rope) - known)} are not supported (only {sorted(known)})"
    )
  layers = config["num_hidden_layers"]
  if model_type == "qwen2":
    sliding_window, layer_types = config["sliding_window"], tuple(config["layer_types"])
  else:
    sliding_window = config["sliding_window"] if model_type == "mistral" else None
    layer_types = ("full_attention" if sliding_window is None else "sliding_attention",) * layers
  hidden, heads = config["hidden_size"], config["num_attention_heads"]
  head_dim = config["head_dim"] if "head_dim" in config and config["head_dim"] else hidden // heads
  architecture = single_architecture(config)
  return decoder.DecoderConfig(
    architecture=architecture,
    model_type=model_type,
    vocab_size=config["vocab_size"],
    hidden_size=hidden,
    intermediate_size=config["intermediate_size"],
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=config["num_key_value_heads"],
    head_dim=head_dim,
    hidden_act=config["hidden_act"],
    rms_norm_eps=config["rms_norm_eps"],
    rope_parameters=decoder.RopeParameters(**rope),
    attention_bias=model_type == "llama" and config["attention_bias"],
    mlp_bias=model_type == "llama" and config["mlp_bias"],
    tie_word_embeddings=config["tie_word_embeddings"],
    sliding_window=sliding_window,
    layer_types=layer_types,
    pad_token_id=config["pad_token_id"],
    num_labels=(len(config["id2label"]) if architecture.endswith("ForSequenceClassification") else None),
    dtype=dtype,
  )


def clip_vision_config(config: Mapping[str, Any]) -> clip.VisionConfig:
  """The image tower's VisionConfig of a complete CLIPVisionModel(WithProjection) or CLIPModel config."""
  if config["model_type"] == "clip":
    single_architecture(config, ("CLIPModel",))
    vision, output_dim = config["vision_config"], config["projection_dim"]
  else:
    architecture = single_architecture(config, ("CLIPVisionModel", "CLIPVisionModelWithProjection"))
    vision = config
    output_dim = config["projection_dim"] if architecture.endswith("WithProjection") else None
  if vision["num_channels"] != 3:
    raise ValueError(f"num_channels {vision['num_channels']} is not 3")
  return clip.VisionConfig(
    image_size=vision["image_size"],
    patch_size=vision["patch_size"],
    width=vision["hidden_size"],
    layers=vision["num_hidden_layers"],
    heads=vision["num_attention_heads"],
    mlp_width=vision["intermediate_size"],
    output_dim=output_dim,
    act=vision["hidden_act"],
    ln_eps=vision["layer_norm_eps"],
  )


_PARSERS = {
  "roberta": roberta_config,
  "bert": roberta_config,
  "gpt2": gpt2_config,
  "llama": decoder_config,
  "mistral": decoder_config,
  "qwen2": decoder_config,
  "clip_vision_model": clip_vision_config,
  "clip": clip_vision_config,
}
MODEL_TYPES = tuple(_PARSERS)


def complete(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config` with transformers' defaults filled in (its `to_dict()` form)."""
  import transformers  # pylint: disable=g-import-not-at-top

  fields = dict(config)
  return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields).to_dict()


def model_config(hf_config: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
  """The model config (RobertaConfig, GPT2Config, DecoderConfig or clip.VisionConfig) of an HF config.json dict.

  Raises:
    ValueError naming `source`: an unsupported model type or architecture, or an invalid config.
  """
  try:
    if "model_type" not in hf_config:
      raise ValueError("no model_type")
    if hf_config["model_type"] not in _PARSERS:
      raise ValueError(f"model type {hf_config['model_type']!r} is not one of {list(MODEL_TYPES)}")
    return _PARSERS[hf_config["model_type"]](complete(hf_config))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{source}: unsupported or invalid config: {type(e).__name__}: {e}") from e


def export_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """The config.json of an exported tree: unchanged, except that a CLIPModel's (whose text
  tower is not kept) becomes a CLIPVisionModelWithProjection config."""
  if hf_config["model_type"] != "clip":
    return dict(hf_config)
  full = complete(hf_config)
  return {
    **full["vision_config"],
    "model_type": "clip_vision_model",
    "architectures": ["CLIPVisionModelWithProjection"],
    "projection_dim": full["projection_dim"],
  }
