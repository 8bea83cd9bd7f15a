"""The torch-free CLIP tokenizer gives open_clip's SimpleTokenizer's tokens exactly."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from adarank_jax.data import clip_tokenizer, registry
from adarank_jax.data import digits as digits_tasks
from configs import common

LONG = "a photo of a " * 40 + "cat."
TRICKY = (
  "",
  " ",
  "\n\t  \n",
  "a photo of a cat.",
  "A   Photo\tof\n\na  CAT",
  "  leading and trailing  ",
  "&amp;lt;b&amp;gt; &lt;i&gt; &quot;quoted&quot; &#39;x&#39; &copy; &nbsp;nbsp",
  "âœ” No problems",
  "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
  "schÃ¶n",
  "Café naïve résumé Ærøskøbing",
  "İstanbul ß ﬁ",
  "東京タワーの写真",
  "한국어 문장",
  "Привет, мир!",
  "a photo of a 🐱 and a 🐶 👍🏽",
  "it's we'll they're I've I'm he'd can't IT'S",
  "rock’n’roll",
  "12345 3.14159 1,000,000 ٣٤٥ ½",
  "!!!??? ... --- *** (((a))) [x]{y} @#$%^&",
  '"{}" {} %s',
  "AM General Hummer SUV 2000",
  "aquarium_fish",
  "['happy', 'smiling']",
  "Type-S 16.4 F-450",
  "<start_of_text> hi <END_OF_TEXT>",
  "\x00\x07 control \u200b zero width \ufeff",
  LONG,
)


def _prompts() -> list[str]:
  names = common.TASKS_20 + digits_tasks.TASKS
  return [
    template.format(c)
    for name in names
    for c in registry.get(name).classnames
    for template in registry.get(name).templates
  ]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
  from open_clip import tokenizer  # pylint: disable=g-import-not-at-top

  return tokenizer.SimpleTokenizer


@pytest.fixture(scope="module")
def ours():
  return clip_tokenizer.Tokenizer()


def test_registry_prompts_match_open_clip(open_clip_tokenizer, ours):
  prompts = _prompts()
  assert len(prompts) > 6000
  np.testing.assert_array_equal(ours(prompts), open_clip_tokenizer(context_length=77)(prompts).numpy())


@pytest.mark.parametrize("context_length", [77, 8])
def test_tricky_strings_match_open_clip(open_clip_tokenizer, context_length):
  tokenizer = clip_tokenizer.Tokenizer(context_length=context_length)
  tokens = tokenizer(list(TRICKY))
  assert tokens.dtype == np.int32 and tokens.shape == (len(TRICKY), context_length)
  np.testing.assert_array_equal(
    tokens, open_clip_tokenizer(context_length=context_length)(list(TRICKY)).numpy()
  )
  assert tokens[-1, -1] == tokenizer.eot_token_id  # LONG is truncated, ending in <end_of_text>
  assert tokens[0, :3].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id, 0]


def test_encode_and_single_string_match_open_clip(open_clip_tokenizer, ours):
  reference = open_clip_tokenizer()
  for text in TRICKY:
    assert ours.encode(text) == reference.encode(text), text
  np.testing.assert_array_equal(ours("a photo of a cat."), reference("a photo of a cat.").numpy())
  assert ours("a photo of a cat.").shape == (1, 77)
  assert ours.encode("schÃ¶n") == ours.encode("SCHÖN")  # ftfy fixes the mojibake, then lower-cases


def test_import_loads_neither_torch_nor_open_clip():
  code = (
    "import sys; from adarank_jax.data import clip_tokenizer; clip_tokenizer.Tokenizer(); "
    "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, "
    "[m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')]"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_unreadable_bpe_path_names_it(tmp_path):
  missing = tmp_path / "missing_vocab.txt.gz"
  with pytest.raises(ValueError, match="missing_vocab.txt.gz"):
    clip_tokenizer.Tokenizer(bpe_path=missing)


def test_without_open_clip_asks_for_the_torch_extra(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"open_clip is not installed.*\[torch\].*bpe_path="):
    clip_tokenizer.Tokenizer()
