"""The check every reader of a Hugging Face config.json dict here starts with."""

from collections.abc import Mapping, Sequence
from typing import Any


def single_architecture(config: Mapping[str, Any], allowed: Sequence[str] | None = None) -> str:
  """The one HF class `config['architectures']` names; ValueError unless exactly one (of `allowed`)."""
  architectures = config["architectures"]
  if (
    not architectures or len(architectures) != 1 or (allowed is not None and architectures[0] not in allowed)
  ):
    expected = "exactly one architecture" + ("" if allowed is None else f" of {list(allowed)}")
    raise ValueError(f"config.json must name {expected}, got {architectures!r}")
  return architectures[0]
