"""Which inputs a run derives for its methods, and when each is released (run._input_chain, run._last_reads)."""

import pytest

from adarank_jax.experiment import methods, run
from configs import common

F32 = "float32"
VECTORS, VECTORS_AVG = ("vectors", "pretrained"), ("vectors", "average")
FACTORS, FACTORS_AVG = ("factors", "pretrained", None, F32), ("factors", "average", None, F32)


def _chains(config, names):
  return [run._input_chain(config, methods.get(name)) for name in names]


def test_chains_follow_what_each_method_needs():
  config = common.base()
  chains = dict(zip(methods.METHODS, _chains(config, methods.METHODS)))
  assert chains["zero_shot"] == ()
  assert chains["individual"] == chains["weight_averaging"] == ("finetuned",)
  assert chains["task_arithmetic"] == chains["adamerging_layer"] == ("finetuned", VECTORS)
  assert chains["cart"] == chains["adarank_cart"] == ("finetuned", VECTORS_AVG, FACTORS_AVG)
  assert chains["iso_c"] == chains["adarank_ta"] == ("finetuned", VECTORS, FACTORS)
  assert chains["adarank_iso_cts"] == ("finetuned", VECTORS, FACTORS, ("components", "pretrained", "iso_cts"))
  # A trained method's own rank and factor dtype make other factors than the static methods' full-rank ones.
  config.adarank.rank, config.adarank.factor_dtype = 16, "bfloat16"
  ta, static = _chains(config, ["adarank_ta", "iso_c"])
  assert ta[-1] == ("factors", "pretrained", 16, "bfloat16") and static[-1] == FACTORS


@pytest.mark.parametrize(
  "names, expected",
  [
    # The paper's runs: after the factors are made nothing else is held while AdaRank trains.
    (("individual", "adarank_ta"), {"finetuned": 1, VECTORS: 1, FACTORS: 1}),
    # baselines=true: the fine-tuned trees go after static CART made the last task vectors from them,
    # the task vectors after AdaMerging, and AdaRank reads the factors TSV-M made.
    (
      common.BASELINES + ("adarank_ta",),
      {"finetuned": 5, VECTORS_AVG: 5, FACTORS_AVG: 5, VECTORS: 10, FACTORS: 11},
    ),
    # AdaRank on Iso-CTS: the factors go once its components are made from them.
    (
      ("iso_cts", "adarank_iso_cts"),
      {"finetuned": 0, VECTORS: 0, FACTORS: 1, ("components", "pretrained", "iso_cts"): 1},
    ),
  ],
)
def test_each_input_is_held_until_its_last_read(names, expected):
  assert run._last_reads(_chains(common.base(), names)) == expected
