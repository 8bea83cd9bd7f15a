"""Unlabeled prompts of generative tasks: one file per task, read and checked before any compute.

A task's prompts are a `.jsonl` file (one JSON object per line; the prompt is the string under a
field the config names, "text" by default) or a `.txt` file (one prompt per line). Every line must
hold a prompt: an empty file, a blank line, a line that is not UTF-8, not JSON or not an object, a
missing field or one that is not a non-empty string is a `PromptFileError` naming the file and the
line. `open_prompts(path, field=...)` returns a random-access source, src[i] = {"text": str}, which
the data pipeline (`pipeline.eval_batches`, `pipeline.adaptation_batches`) batches like any task's
split: in file order for evaluation, shuffled per epoch from a seed for adaptation.

`PromptPreprocessor(tokenizer, max_length=...)` tokenizes one record with the model's own tokenizer
(`glue.load_tokenizer`: a local directory, pad = eos where it has no pad token), with its special
tokens, truncated on the right to `max_length` and right-padded to it:
{"input_ids": int32 (max_length,), "attention_mask": int32 (max_length,)}.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adarank_jax.data import glue

SUFFIXES = (".jsonl", ".txt")


class PromptFileError(ValueError):
  """A prompt file that cannot be used; the message names the file (and the line)."""


def read_prompts(path: str | os.PathLike[str], *, field: str = "text") -> list[str]:
  """The prompts of a .jsonl (the string under `field` of each line's object) or .txt file (each line),
  in file order; every problem of the first bad line raises PromptFileError naming file and line."""
  path = Path(path)
  if path.suffix not in SUFFIXES:
    raise PromptFileError(f"{path}: prompt files end in {' or '.join(SUFFIXES)}")
  try:
    data = path.read_bytes()
  except OSError as error:
    raise PromptFileError(f"{path}: cannot be read ({error.strerror or error})") from error
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":  # the newline that ends the last line
    lines.pop()
  if not lines:
    raise PromptFileError(f"{path}: the file is empty; expected one prompt per line")
  prompts = []
  for number, raw in enumerate(lines, start=1):
    where = f"{path}, line {number}"
    try:
      line = raw.removesuffix(b"\r").decode("utf-8")
    except UnicodeDecodeError as error:
      raise PromptFileError(f"{where}: not UTF-8 ({error.reason} at byte {error.start})") from error
    if not line.strip():
      raise PromptFileError(f"{where}: blank; every line must hold a prompt")
    prompts.append(line if path.suffix == ".txt" else _json_prompt(line, field, where))
  return prompts


def _json_prompt(line: str, field: str, where: str) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise PromptFileError(f"{where}: not JSON ({error.msg} at column {error.colno})") from error
  if not isinstance(record, dict):
    raise PromptFileError(f"{where}: a JSON {type(record).__name__}, expected an object with {field!r}")
  if field not in record:
    raise PromptFileError(f"{where}: no field {field!r} (it has {sorted(record)[:10]})")
  prompt = record[field]
  if not isinstance(prompt, str) or not prompt.strip():
    raise PromptFileError(f"{where}: field {field!r} is {prompt!r}, expected a non-empty string")
  return prompt


class PromptSource:
  """A task's prompts as a random-access source: src[i] = {"text": prompts[i]}."""

  def __init__(self, prompts: Sequence[str], *, path: str = ""):
    self.prompts, self.path = tuple(prompts), path

  def __len__(self) -> int:
    return len(self.prompts)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"text": self.prompts[index]}


def open_prompts(path: str | os.PathLike[str], *, field: str = "text") -> PromptSource:
  """`read_prompts` as a source."""
  return PromptSource(read_prompts(path, field=field), path=os.fspath(path))


class PromptPreprocessor:
  """record {"text"} -> {"input_ids", "attention_mask"}: int32 (max_length,), right-padded.

  Safe to call from worker threads (calls into the fast tokenizer are serialised by a lock);
  picklable for worker processes (each copy makes its own lock).
  """

  def __init__(self, tokenizer: Any, *, max_length: int):
    if max_length < 2:
      raise ValueError(f"PromptPreprocessor: max_length={max_length}; a next token needs at least 2")
    tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
    self.tokenizer, self.max_length = tokenizer, max_length
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {"tokenizer": self.tokenizer, "max_length": self.max_length}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["tokenizer"], max_length=state["max_length"])

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    with self._lock:
      arrays = glue.tokenize_texts(self.tokenizer, [record["text"]], None, max_length=self.max_length)
    return {k: arrays[k][0] for k in ("input_ids", "attention_mask")}
