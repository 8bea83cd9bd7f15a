"""The decoder family (Llama, Mistral, Qwen2 sequence classifiers) through the experiment end to end.

Tiny random checkpoints written here: the pretrained model a causal LM saved by transformers in sharded
safetensors, each fine-tuned one a sequence classifier whose body is the pretrained body plus noise and
whose head is fitted by least squares to the first FIT mock examples (so predictions vary and a wrongly
wired head would show); a byte-level BPE tokenizer trained here; mock GLUE data. Scores are checked
against transformers on the fine-tuned and on the exported directories. The command line is run for
Qwen2: merge, adapt, evaluate, export, killed after its first checkpoint and resumed to the masks of an
uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import tensorflow_datasets as tfds
import tokenizers
import torch
import transformers
from sklearn import metrics

from adarank_jax.core import tree_util
from adarank_jax.data import registry
from adarank_jax.experiment import run, validate
from adarank_jax.storage import checkpoint
from configs import llama_glue, mistral_glue, qwen2_glue
from tests import tiny_decoder

ROOT = Path(__file__).resolve().parents[2]
NUM_EXAMPLES = 16
FIT = 12
MAX_LENGTH = 24
NOISE = 0.05
TASKS = {"cola": 2, "mnli": 3}
METHODS = ("individual", "task_arithmetic", "adarank_cart")
# family -> (config class, causal LM, classifier, its own fields, the experiment config)
FAMILIES = {
  "qwen2": (
    transformers.Qwen2Config,
    transformers.Qwen2ForCausalLM,
    transformers.Qwen2ForSequenceClassification,
    dict(tie_word_embeddings=True),  # q/k/v biases are Qwen2's own
    qwen2_glue,
  ),
  "llama": (
    transformers.LlamaConfig,
    transformers.LlamaForCausalLM,
    transformers.LlamaForSequenceClassification,
    dict(attention_bias=True, tie_word_embeddings=False),
    llama_glue,
  ),
  "mistral": (
    transformers.MistralConfig,
    transformers.MistralForCausalLM,
    transformers.MistralForSequenceClassification,
    dict(sliding_window=8, tie_word_embeddings=False),  # shorter than the inputs: the window matters
    mistral_glue,
  ),
}


@pytest.fixture(scope="module", autouse=True)
def mock_glue():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _records(task):
  source = registry.get(task).open_source()
  return [source[i] for i in range(NUM_EXAMPLES)]


def _encode(tokenizer, task):
  records = _records(task)
  text_b = [r["text_b"] for r in records] if "text_b" in records[0] else None
  return tokenizer(
    [r["text_a"] for r in records],
    text_b,
    max_length=MAX_LENGTH,
    padding="max_length",
    truncation=True,
    return_tensors="pt",
  )


def _score(task, predictions):
  labels = np.array([r["label"] for r in _records(task)])
  if registry.get(task).metric == "matthews":
    return float(metrics.matthews_corrcoef(labels, predictions))
  return float(np.mean(labels == predictions))


def _predictions(directory, tokenizer, task):
  model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
  with torch.no_grad():
    return model(**_encode(tokenizer, task)).logits.numpy().argmax(-1)


def _tokenizer(directory):
  """A byte-level BPE tokenizer trained on a few sentences, with its own pad and eos tokens."""
  directory.mkdir(parents=True)
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(
    ["the cat sat on a mat", "a big dog ran far away", "abc def ghij jihgf edcba"],
    vocab_size=300,
    min_frequency=1,
    special_tokens=["<pad>", "</s>"],
    show_progress=False,
  )
  bpe.save(str(directory / "bpe.json"))
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_file=str(directory / "bpe.json"),
    pad_token="<pad>",
    eos_token="</s>",
    model_input_names=["input_ids", "attention_mask"],
  )
  (directory / "bpe.json").unlink()
  tokenizer.save_pretrained(directory)
  return tokenizer


def _checkpoints(root, family):
  """root/pretrained (a sharded causal LM + the tokenizer) and root/finetuned/<task> classifiers."""
  config_class, causal, classifier, own, _ = FAMILIES[family]
  tokenizer = _tokenizer(root / "pretrained")
  fields = dict(tiny_decoder.FIELDS, **own, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  pretrained = causal(config_class(**fields)).eval()
  pretrained.save_pretrained(root / "pretrained", max_shard_size="20KB")
  assert (root / "pretrained" / "model.safetensors.index.json").is_file()  # sharded, as people hold them
  for seed, (task, num_labels) in enumerate(TASKS.items(), start=1):
    torch.manual_seed(seed)
    model = classifier(config_class(**fields, num_labels=num_labels)).eval()
    state = model.state_dict()
    with torch.no_grad():
      for key, value in pretrained.state_dict().items():
        if key.startswith("model."):
          state[key].copy_(value + NOISE * torch.randn_like(value))
      inputs = _encode(tokenizer, task)
      last = (torch.arange(MAX_LENGTH) * (inputs["input_ids"] != tokenizer.pad_token_id)).argmax(-1)
      features = model.model(**inputs).last_hidden_state[torch.arange(NUM_EXAMPLES), last][:FIT]
      labels = np.array([r["label"] for r in _records(task)])[:FIT]
      w = np.linalg.lstsq(features.double().numpy(), np.eye(num_labels)[labels], rcond=None)[0]
      model.score.weight.copy_(torch.from_numpy(w.T))
    model.save_pretrained(root / "finetuned" / task)
  return tokenizer


@pytest.fixture(scope="module", params=list(FAMILIES))
def decoder_run(request, tmp_path_factory):
  family = request.param
  root = tmp_path_factory.mktemp(family)
  tokenizer = _checkpoints(root, family)
  config = FAMILIES[family][4].get_config("base=cart,quick=true")
  config.methods = METHODS
  config.model.pretrained = str(root / "pretrained")
  config.model.finetuned = str(root / "finetuned" / "{task}")
  config.tasks = tuple(TASKS)
  config.data.max_length = MAX_LENGTH
  validate.validate(config, export="hf")
  results = run.run(config, root / "work", continued=False, overwrite=False, export="hf")
  return root, tokenizer, results


def test_individual_row_and_every_export_give_transformers_scores(decoder_run):
  root, tokenizer, results = decoder_run
  for task in TASKS:
    predictions = _predictions(root / "finetuned" / task, tokenizer, task)
    assert len(set(predictions.tolist())) > 1, f"{task}: constant predictions would test nothing"
    assert results["individual"][task] == pytest.approx(_score(task, predictions), abs=1e-6), task
  assert set(results["methods"]) == set(METHODS) - {"individual"}
  for method, scores in results["methods"].items():
    for task in TASKS:
      predictions = _predictions(root / "work" / "export" / method / task, tokenizer, task)
      assert scores[task] == pytest.approx(_score(task, predictions), abs=1e-6), (method, task)


def test_exports_keep_the_averaged_embeddings_and_each_tasks_own_head(decoder_run):
  root, tokenizer, _ = decoder_run
  load = lambda d: {
    k: v for f in sorted(d.glob("*.safetensors")) for k, v in safetensors.numpy.load_file(f).items()
  }
  tuned = {t: load(root / "finetuned" / t) for t in TASKS}
  embeddings = "model.embed_tokens.weight"
  origins = {  # the unmerged embeddings stay at the method's origin
    "task_arithmetic": load(root / "pretrained")[embeddings],
    "adarank_cart": np.mean([s[embeddings] for s in tuned.values()], axis=0),
  }
  assert not np.allclose(*origins.values())  # the check below tells them apart
  for method, origin in origins.items():
    for task in TASKS:
      directory = root / "work" / "export" / method / task
      exported = load(directory)
      np.testing.assert_allclose(exported[embeddings], origin, atol=1e-6, err_msg=method)
      np.testing.assert_array_equal(exported["score.weight"], tuned[task]["score.weight"])
      key = "model.layers.1.mlp.down_proj.weight"
      assert not np.allclose(exported[key], tuned[task][key], atol=1e-4), f"{method} {key} not merged"
      again = transformers.AutoTokenizer.from_pretrained(directory)
      assert again("a merged model")["input_ids"] == tokenizer("a merged model")["input_ids"]


# ------------------------------------------------------------------------------------ command line

# The command line under mock GLUE data (the subprocess has no data sets of its own).
_HARNESS = """
import sys
import tensorflow_datasets as tfds
from absl import app
from adarank_jax import main
with tfds.testing.mock_data(num_examples=int(sys.argv[1]), policy=tfds.testing.MockPolicy.USE_CODE):
  app.run(main.main, argv=["adarank_jax.main", *sys.argv[2:]])
"""


def _cli(root, workdir, *extra, wait=True):
  args = [
    sys.executable,
    "-c",
    _HARNESS,
    str(NUM_EXAMPLES),
    "--config",
    str(ROOT / "configs/qwen2_glue.py") + ":quick=true",
    f"--workdir={workdir}",
    f"--config.model.pretrained={root / 'pretrained'}",
    f"--config.model.finetuned={root / 'finetuned' / '{task}'}",
    f"--config.tasks={tuple(TASKS)!r}",
    f"--config.data.max_length={MAX_LENGTH}",
    "--config.methods=('task_arithmetic','adarank_ta')",
    "--config.adarank.num_steps=8",
    "--config.adarank.eval_every=4",
    "--config.adarank.layout=config",  # two runs compared bit for bit: one layout in both
    "--export=hf",
    *extra,
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_merges_adapts_exports_and_resumes_a_killed_run(tmp_path):
  _checkpoints(tmp_path, "qwen2")
  straight = _cli(tmp_path, tmp_path / "straight")
  assert straight.returncode == 0, straight.stdout + straight.stderr
  results = json.loads((tmp_path / "straight" / "results.json").read_text())
  assert set(results["methods"]) == {"task_arithmetic", "adarank_ta"}
  assert (tmp_path / "straight" / "export" / "adarank_ta" / "mnli" / "config.json").is_file()

  proc = _cli(tmp_path, tmp_path / "killed", wait=False)
  step_dir = tmp_path / "killed" / "adarank_ta" / "checkpoints" / "2"
  deadline = time.time() + 500
  while not step_dir.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert step_dir.exists(), proc.communicate()[0].decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert not (tmp_path / "killed" / "results.json").exists()  # killed before the end
  resumed = _cli(tmp_path, tmp_path / "killed", "--resume")
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  masks = lambda w: tree_util.flatten(checkpoint.load_tree(w / "adarank_ta" / "masks"))
  a, b = masks(tmp_path / "straight"), masks(tmp_path / "killed")
  assert a.keys() == b.keys() and any("self_attn/q_proj" in k for k in a)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  again = json.loads((tmp_path / "killed" / "results.json").read_text())
  assert again["methods"] == results["methods"]
