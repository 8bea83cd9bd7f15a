import numpy as np
import pytest

from adarank_jax.core import tree_util


def _tree():
  return {
    "blocks": {
      0: {"attn": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}},
      1: {"attn": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}},
    },
    "proj": np.ones((3, 4)),
  }


def test_flatten_unflatten_round_trip_keeps_int_keys():
  flat = tree_util.flatten(_tree())
  assert "blocks/1/attn/kernel" in flat and len(flat) == 5
  back = tree_util.unflatten(flat)
  assert set(back["blocks"]) == {0, 1}
  assert tree_util.flatten(back).keys() == flat.keys()


def test_select_full_matches_paths():
  sel = tree_util.flatten(tree_util.select(_tree(), [r"blocks/\d+/attn/kernel"]))
  assert sel == {
    "blocks/0/attn/kernel": True,
    "blocks/0/attn/bias": False,
    "blocks/1/attn/kernel": True,
    "blocks/1/attn/bias": False,
    "proj": False,
  }
  # fullmatch, not search: a prefix alone selects nothing
  assert not any(tree_util.flatten(tree_util.select(_tree(), ["blocks"])).values())


def test_check_structure_names_source_and_every_problem():
  expected = {"a": (2, 3), "b": (3,), "c": (1,)}
  actual = {"a": np.ones((3, 2)), "b": np.ones(3), "d": np.ones(1)}
  with pytest.raises(tree_util.StructureError) as e:
    tree_util.check_structure(expected, actual, source="ckpt.pt")
  msg = str(e.value)
  assert "ckpt.pt" in msg and "missing keys (1): c" in msg and "unexpected keys (1): d" in msg
  assert "a: expected shape (2, 3), got (3, 2)" in msg
  tree_util.check_structure(expected, {"a": np.ones((2, 3)), "b": np.ones(3), "c": np.ones(1)}, source="ok")


def test_check_finite_names_keys():
  with pytest.raises(tree_util.NonFiniteError, match=r"f\.safetensors: NaN or Inf values in x, z"):
    tree_util.check_finite(
      {"x": np.array([np.nan]), "y": np.ones(2), "z": np.array([np.inf]), "i": np.arange(3)},
      source="f.safetensors",
    )
