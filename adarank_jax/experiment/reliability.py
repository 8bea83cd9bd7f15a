"""Feeds the library bad inputs it makes itself, in a temporary directory, and prints what happened.

  python -m adarank_jax.experiment.reliability

One row per case: `case | expected | observed | pass`; the exit status is 1 if any case fails. Every case
is a cheap library-level call (no training, no CLI run): bad config numbers, integer weights, token ids
beyond the vocabulary, flipped checkpoint bytes, a corrupted testbed file, a torn jsonl record, a killed
export's temp file, a failed load followed by a corrected rerun, a second lock on a workdir.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = Path(__file__).resolve().parents[1] / "digits" / "tiny_clip_quick.json"


def _raises(call: Callable[[], object], error: type[BaseException], *needles: str) -> str:
  """'raised <Error>: <message>' if `call` raised `error` whose message holds every needle; else an
  AssertionError saying what happened."""
  try:
    call()
  except error as e:  # pylint: disable=broad-except
    message = str(e)
    missing = [n for n in needles if n not in message]
    if missing:
      raise AssertionError(f"{type(e).__name__} without {missing}: {message[:200]}") from e
    return f"{type(e).__name__}: {message}"
  raise AssertionError("no error")


def _short(text: str, width: int = 110) -> str:
  text = " ".join(text.split())
  return text if len(text) <= width else text[: width - 3] + "..."


def _tiny_clip_state(seed: int = 0) -> dict[str, np.ndarray]:
  from adarank_jax.core import tree_util
  from adarank_jax.interop import openclip, openclip_config  # pylint: disable=g-import-not-at-top
  from adarank_jax.models import clip  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  abstract = clip.abstract_params(openclip_config.load_config(TINY_CLIP))
  return openclip.state_dict_from_tree(
    tree_util.unflatten(
      {k: rng.normal(size=v.shape).astype(np.float32) for k, v in tree_util.flatten(abstract).items()}
    )
  )


# --------------------------------------------------------------------------------------------- cases


def non_finite_config(tmp: Path) -> str:
  from adarank_jax.experiment import validate
  from configs import demo  # pylint: disable=g-import-not-at-top

  config = demo.get_config("quick=true")
  config.adarank.ta.prior = float("nan")
  config.adarank.mask_temperature = float("inf")
  return _raises(
    lambda: validate.validate(config),
    validate.ConfigError,
    "adarank.ta.prior=nan",
    "adarank.mask_temperature=inf",
  )


def int_weights(tmp: Path) -> str:
  # pylint: disable-next=g-import-not-at-top
  from adarank_jax.interop import openclip, openclip_config, state_dict

  key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
  state = _tiny_clip_state()
  state_dict.save_state_dict(state, tmp / "pretrained.safetensors")
  state[key] = np.round(state[key] * 10).astype(np.int64)
  bad = tmp / "ft" / "Digits.safetensors"
  state_dict.save_state_dict(state, bad)
  config = openclip_config.load_config(TINY_CLIP)
  loader = _raises(lambda: openclip.load_openclip(bad, config), ValueError, str(bad), key, "int64")
  _raises(
    lambda: openclip.convert_checkpoints(
      TINY_CLIP, tmp / "pretrained.safetensors", {"Digits": bad}, tmp / "out"
    ),
    ValueError,
    key,
    "nothing was written",
  )
  if (tmp / "out").exists():
    raise AssertionError("the converter wrote output")
  return "loader and converter: " + loader


def out_of_vocabulary(tmp: Path) -> str:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from adarank_jax.experiment import loading
  from adarank_jax.interop import openclip_config  # pylint: disable=g-import-not-at-top
  from adarank_jax.models import clip, functional  # pylint: disable=g-import-not-at-top

  raw = json.loads(TINY_CLIP.read_text())
  raw["text_cfg"]["vocab_size"] = 128
  path = tmp / "tiny_clip_vocab128.json"
  path.write_text(json.dumps(raw))
  config = openclip_config.load_config(path)
  _, full = functional.split(clip.build(config, rngs=nnx.Rngs(0)))
  observed = _raises(
    lambda: loading.zero_shot_heads(
      config, full, ["DigitsParity"], cache_dir=tmp / "heads", source=f"model config {path}"
    ),
    ValueError,
    str(path),
    "vocab_size 128",
    "max token id",
  )
  if (tmp / "heads").exists() and any((tmp / "heads").iterdir()):
    raise AssertionError("a head was cached")
  return observed


def non_finite_head(tmp: Path) -> str:
  from adarank_jax.models import heads  # pylint: disable=g-import-not-at-top

  observed = _raises(
    lambda: heads.cached_zero_shot_head(
      tmp,
      key="k",
      encode_text_fn=lambda t: np.full((len(t), 3), np.nan),
      tokenize_fn=lambda texts: np.zeros((len(texts), 4), np.int32),
      classnames=["a"],
      templates=["{}"],
      logit_scale=0.0,
    ),
    ValueError,
    "NaN or Inf",
  )
  if list(tmp.iterdir()):
    raise AssertionError("a non-finite head was cached")
  return observed


def damaged_checkpoint(tmp: Path, *, damage: str) -> str:
  """damage='flip': one byte of the largest data file flipped; 'truncate': _METADATA cut in half."""
  from adarank_jax.storage import checkpoint

  def state(step):
    return {"w": np.arange(1000, dtype=np.float32) * 1e-3 + step, "step": np.array(step, np.int32)}

  manager = checkpoint.Manager(tmp / "ckpts")
  try:
    manager.save(3, state(3))
    manager.save(6, state(6))
    files = [p for p in (tmp / "ckpts" / "6").rglob("*") if p.is_file()]
    if damage == "flip":
      target = max((p for p in files if p.parent.name == "d"), key=lambda p: p.stat().st_size)
      raw = bytearray(target.read_bytes())
      raw[len(raw) // 2] ^= 0x10
      target.write_bytes(bytes(raw))
      names = (str(tmp / "ckpts" / "6"), "w: sha256")
    else:
      target = next(p for p in files if p.name == "_METADATA")
      target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
      names = (str(tmp / "ckpts" / "6"), "cannot be read")
    error = _raises(
      lambda: manager.restore(6, state(0), fallback=False), checkpoint.CorruptCheckpointError, *names
    )
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      restored = manager.restore(manager.latest_step(), state(0))  # what loop.fit does
    if int(restored["step"]) != 3 or not any("ckpts/3 instead of" in str(w.message) for w in caught):
      raise AssertionError(
        f"restored step {int(restored['step'])}, warnings {[str(w.message) for w in caught]}"
      )
  finally:
    manager.close()
  return (
    error.replace(" (its bytes changed after it was written)", "")
    + "; restore of the latest falls back to step 3 with a warning"
  )


def corrupt_testbed_file(tmp: Path) -> str:
  from adarank_jax.digits import testbed  # pylint: disable=g-import-not-at-top

  (tmp / "finetuned").mkdir()
  (tmp / "pretrained.safetensors").write_bytes(b"p" * 1000)
  (tmp / "finetuned" / "Digits.safetensors").write_bytes(b"f" * 1000)
  (tmp / testbed.MANIFEST).write_text(json.dumps({"sha256": testbed.file_hashes(tmp)}))
  if testbed.verify(tmp):
    raise AssertionError(f"a good build fails verification: {testbed.verify(tmp)}")
  target = tmp / "finetuned" / "Digits.safetensors"
  raw = bytearray(target.read_bytes())
  raw[500] ^= 0x01
  target.write_bytes(bytes(raw))
  problems = testbed.verify(tmp)
  if len(problems) != 1 or str(target) not in problems[0]:
    raise AssertionError(f"verify gave {problems}")
  return "verify: " + problems[0]


def torn_jsonl(tmp: Path) -> str:
  from adarank_jax.experiment import report

  path = tmp / "evals.jsonl"
  path.write_text('{"step": 2, "average": 0.5}\n{"step": 4, "aver')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    records = report.read_jsonl(path)
  if records != [{"step": 2, "average": 0.5}] or not any(
    "torn last record" in str(w.message) for w in caught
  ):
    raise AssertionError(f"records {records}")
  return f"{len(records)} record kept; warning: {caught[0].message}"


def killed_export_temp(tmp: Path) -> str:
  from adarank_jax.storage import files

  export = tmp / "export"
  export.mkdir()
  (export / "ties.safetensors").write_bytes(b"whole")
  stale = export / ".adarank_ta.safetensors.k1ll3d.tmp"
  stale.write_bytes(b"half")
  removed = files.remove_stale_temps(tmp)
  if removed != [stale] or not (export / "ties.safetensors").exists():
    raise AssertionError(f"removed {removed}")
  return f"removed {stale.name}; kept ties.safetensors"


def failed_load_then_rerun(tmp: Path) -> str:
  from adarank_jax.experiment import validate
  from adarank_jax.storage import files
  from configs import demo  # pylint: disable=g-import-not-at-top

  workdir = tmp / "w"
  # What a run whose checkpoints failed to load leaves: the lock file, no config.json.
  with files.WorkdirLock(workdir):
    pass
  corrected = demo.get_config("quick=true")
  corrected.model.pretrained = str(tmp / "fixed.safetensors")
  continued = validate.check_workdir(corrected, workdir, resume=False, overwrite=False)
  if continued is not False:
    raise AssertionError(f"check_workdir returned {continued}")
  _raises(
    lambda: validate.check_workdir(corrected, workdir, resume=True, overwrite=False),
    validate.ConfigError,
    "no run to resume",
  )
  return "corrected config starts fresh (check_workdir False); --resume says no run to resume"


def second_lock(tmp: Path) -> str:
  from adarank_jax.storage import files

  with files.WorkdirLock(tmp / "w"):
    observed = _raises(
      lambda: files.WorkdirLock(tmp / "w").acquire(), files.WorkdirBusyError, f"pid {os.getpid()}"
    )
  files.WorkdirLock(tmp / "w").acquire().release()
  return observed


CASES: tuple[tuple[str, str, Callable[[Path], str]], ...] = (
  ("non-finite config values", "ConfigError naming prior=nan, mask_temperature=inf", non_finite_config),
  (
    "int weights in a checkpoint",
    "loader and converter refuse, naming file and key; nothing written",
    int_weights,
  ),
  (
    "out-of-vocabulary token ids",
    "error naming the model config, max id vs vocab_size; nothing cached",
    out_of_vocabulary,
  ),
  ("non-finite zero-shot head", "error; never cached", non_finite_head),
  (
    "flipped checkpoint bytes",
    "CorruptCheckpointError naming dir and leaf; latest falls back",
    functools.partial(damaged_checkpoint, damage="flip"),
  ),
  (
    "truncated checkpoint _METADATA",
    "CorruptCheckpointError naming the dir; latest falls back",
    functools.partial(damaged_checkpoint, damage="truncate"),
  ),
  ("corrupted testbed cache file", "verify names the file", corrupt_testbed_file),
  ("torn jsonl", "last record dropped with a warning", torn_jsonl),
  ("killed export temp file", "remove_stale_temps deletes it, keeps the rest", killed_export_temp),
  ("failed load then corrected rerun", "rerun starts fresh, not 'different config'", failed_load_then_rerun),
  ("second lock on a workdir", "WorkdirBusyError naming the holder's pid", second_lock),
)


def run_cases(cases=CASES) -> list[tuple[str, str, str, bool]]:
  rows = []
  with tempfile.TemporaryDirectory(prefix="adarank_reliability.") as root:
    for i, (name, expected, case) in enumerate(cases):
      tmp = Path(root) / f"case{i}"
      tmp.mkdir()
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          observed, ok = case(tmp), True
      except Exception as error:  # pylint: disable=broad-except
        observed, ok = f"{type(error).__name__}: {error}", False
        if os.environ.get("ADARANK_RELIABILITY_VERBOSE"):
          traceback.print_exc()
      observed = observed.replace(str(tmp), "<tmp>").replace(root, "<tmp>")
      rows.append((name, expected, _short(observed, 200).replace("|", "/"), ok))
  return rows


def format_table(rows) -> str:
  lines = ["| case | expected | observed | pass |", "|---|---|---|---|"]
  lines += [
    f"| {name} | {expected} | {observed} | {'yes' if ok else 'NO'} |" for name, expected, observed, ok in rows
  ]
  return "\n".join(lines)


def main() -> int:
  if str(ROOT) not in sys.path:  # configs/ lives next to the package
    sys.path.insert(0, str(ROOT))
  with contextlib.redirect_stdout(sys.stderr):  # the cases' own prints (testbed, ...) stay off the table
    rows = run_cases()
  print(format_table(rows))
  failed = [name for name, _, _, ok in rows if not ok]
  print(
    f"\n{len(rows) - len(failed)} of {len(rows)} cases pass"
    + (f"; failed: {', '.join(failed)}" if failed else "")
  )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
