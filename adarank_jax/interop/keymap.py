r"""The one declared form of a file format's key map, and the one engine that applies it.

A key map is a tuple of `Rule`s (maxtext's split of "where" from "how"): a regex over '/'-joined tree
paths (the first rule that fully matches a path wins), the external key(s) as `re` replacement templates
('/' in the expanded key become '.'), and a `Hook` from one shared vocabulary:

  COPY        as is                                  (biases, LayerNorm scales, embeddings)
  LINEAR      (out, in) <-> (in, out)                (torch Linear weights vs kernels)
  CONV        OIHW <-> HWIO                          (the patch embedding)
  QKV_KERNEL  3 x (w, w) <-> (w, 3w), q|k|v columns  (HF's q_proj, k_proj, v_proj -> one in_proj)
  QKV_BIAS    3 x (w,) <-> (3w,)

  Rule(r"(.*)/in_proj/kernel", (r"\1.in_proj_weight",), LINEAR)     # OpenCLIP
  Rule(r"transformer/resblocks/(\d+)/attn/in_proj/kernel",          # HF CLIP vision
       tuple(rf"vision_model.encoder.layers.\1.self_attn.{x}_proj.weight" for x in "qkv"), QKV_KERNEL)

Given the architecture's abstract params (flat path -> shape and dtype), `tree_from_state_dict` checks a
state dict against the expected keys and shapes (every missing, unexpected and mis-shaped key at once),
dtypes and finiteness, each error naming the source, and only then builds the tree; `state_dict_from_tree`
is its inverse. Values keep their dtype, so state dict -> tree -> state dict is bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from adarank_jax.core import tree_util
from adarank_jax.interop import state_dict as state_dict_lib

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Hook:
  """How one tree leaf is made from its external tensors, and back."""

  to_tree: Callable[..., np.ndarray]  # external tensors -> tree leaf
  to_external: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # tree leaf -> external tensors
  external_shapes: Callable[[Shape], tuple[Shape, ...]]  # leaf shape -> external shapes


COPY = Hook(lambda a: a, lambda t: (t,), lambda s: (tuple(s),))
LINEAR = Hook(lambda w: w.T, lambda k: (k.T,), lambda s: (tuple(s[::-1]),))
CONV = Hook(
  lambda w: w.transpose(2, 3, 1, 0),
  lambda k: (k.transpose(3, 2, 0, 1),),
  lambda s: ((s[3], s[2], s[0], s[1]),),
)
QKV_KERNEL = Hook(
  lambda q, k, v: np.concatenate([q.T, k.T, v.T], axis=1),
  lambda t: tuple(p.T for p in np.split(t, 3, axis=1)),
  lambda s: ((s[1] // 3, s[0]),) * 3,
)
QKV_BIAS = Hook(
  lambda q, k, v: np.concatenate([q, k, v]), lambda t: tuple(np.split(t, 3)), lambda s: ((s[0] // 3,),) * 3
)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Tree paths fully matching `path` <-> the external keys `keys` (templates over its groups)."""

  path: str
  keys: tuple[str, ...]
  hook: Hook = COPY


KeyMap = tuple[Rule, ...]


def prefixed(keymap: KeyMap, path_prefix: str, key_prefix: str) -> KeyMap:
  """`keymap` for a sub-tree at `path_prefix` (e.g. 'visual/') whose keys start with `key_prefix`."""
  return tuple(
    Rule(re.escape(path_prefix) + r.path, tuple(key_prefix + k for k in r.keys), r.hook) for r in keymap
  )


def _c_array(array: np.ndarray) -> np.ndarray:
  return np.asarray(array, order="C")  # unlike np.ascontiguousarray, keeps 0-d arrays 0-d


@functools.lru_cache(maxsize=64)
def _compiled(keymap: KeyMap) -> tuple[tuple[re.Pattern, Rule], ...]:
  return tuple((re.compile(rule.path), rule) for rule in keymap)


def resolve(keymap: KeyMap, paths: Iterable[str], *, source: str) -> dict[str, tuple[Hook, tuple[str, ...]]]:
  """Tree path -> (hook, external keys); StructureError naming `source` for paths no rule matches."""
  plan, unmatched = {}, []
  for path in paths:
    for pattern, rule in _compiled(keymap):
      match = pattern.fullmatch(path)
      if match:
        plan[path] = (rule.hook, tuple(match.expand(k).replace("/", ".") for k in rule.keys))
        break
    else:
      unmatched.append(path)
  if unmatched:
    raise tree_util.StructureError(f"{source}: no key-map rule for tree paths {', '.join(sorted(unmatched))}")
  return plan


def expected_keys(keymap: KeyMap, abstract: Mapping[str, Any], *, source: str = "key map") -> dict[str, Any]:
  """External key -> (shape, dtype) of the architecture whose flat abstract params are `abstract`."""
  expected = {}
  for path, (hook, keys) in resolve(keymap, abstract, source=source).items():
    leaf = abstract[path]
    for key, shape in zip(keys, hook.external_shapes(tuple(leaf.shape)), strict=True):
      expected[key] = (shape, leaf.dtype)
  return expected


def tree_from_state_dict(
  keymap: KeyMap, abstract: Mapping[str, Any], state: Mapping[str, Any], *, source: str, hint: str = ""
) -> dict[str, Any]:
  """Checks `state` against the architecture, then builds its param tree.

  Args:
    keymap: the format's rules.
    abstract: flat tree path -> the architecture's leaf (anything with `shape` and `dtype`).
    state: external key -> array; every key is expected (filter buffers and other towers out first).
    source: the file or directory `state` came from, named in every error.
    hint: a line added to a StructureError of missing, unexpected or mis-shaped keys.

  Returns:
    Nested dict of numpy arrays in the tree layouts, stored dtypes.

  Raises:
    tree_util.StructureError: missing, unexpected or mis-shaped keys (all at once), or integer/bool arrays
      where the architecture has float weights.
    tree_util.NonFiniteError: NaN or Inf in a tensor.
  """
  plan = resolve(keymap, abstract, source=source)
  expected = expected_keys(keymap, abstract, source=source)
  try:
    tree_util.check_structure({k: shape for k, (shape, _) in expected.items()}, state, source=source)
  except tree_util.StructureError as e:
    if not hint:
      raise
    raise tree_util.StructureError(f"{e}\n  {hint}") from None
  state_dict_lib.check_dtypes({k: dtype for k, (_, dtype) in expected.items()}, state, source=source)
  tree_util.check_finite(state, source=source)
  return tree_util.unflatten(
    {
      path: _c_array(hook.to_tree(*(np.asarray(state[k]) for k in keys)))
      for path, (hook, keys) in plan.items()
    }
  )


def state_dict_from_tree(
  keymap: KeyMap, tree: Mapping[str, Any], *, source: str = "tree"
) -> dict[str, np.ndarray]:
  """Inverse of `tree_from_state_dict`: external key -> numpy array (dtypes kept). Not checked against an
  architecture (see `check_tree`)."""
  flat = {k: np.asarray(v) for k, v in tree_util.flatten(tree).items()}
  state = {}
  for path, (hook, keys) in resolve(keymap, flat, source=source).items():
    state.update(zip(keys, map(_c_array, hook.to_external(flat[path])), strict=True))
  return state


def check_tree(abstract: Mapping[str, Any], flat: Mapping[str, Any], *, source: str) -> None:
  """The checks of `tree_from_state_dict`, on a flat tree: paths and shapes, dtypes, finiteness."""
  tree_util.check_structure({k: tuple(v.shape) for k, v in abstract.items()}, flat, source=source)
  state_dict_lib.check_dtypes({k: v.dtype for k, v in abstract.items()}, flat, source=source)
  tree_util.check_finite(flat, source=source)
