"""Generative merging end to end: Qwen2 causal LMs merged whole on each task's unlabeled prompts.

Tiny random Qwen2ForCausalLM checkpoints written here by transformers (sharded safetensors; each
fine-tuned model is the pretrained one plus noise), a word-level tokenizer and two tasks' prompt files
(one .jsonl, one .txt, and held-out prompts). In process: every row's perplexity and next-token entropy
against the same numbers computed with transformers, on the fine-tuned and on the exported models, and
the export's logits against the JAX model's. On the command line: merge, adapt, evaluate, export,
killed after its first checkpoint and resumed to the masks of an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from adarank_jax.core import tree_util
from adarank_jax.experiment import run, validate
from adarank_jax.interop import safetensors_dir
from adarank_jax.models import decoder, functional
from adarank_jax.storage import checkpoint
from configs import qwen2_generative
from tests import prompt_files, tiny_decoder

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 10
NOISE = 0.05
WORDS = prompt_files.WORDS
PROMPTS = {  # task -> (adaptation prompts, held-out prompts); lengths vary, some are truncated
  "animals": (
    [
      "the cat sat on a mat",
      "a big dog ran far away",
      "the red cat ran",
      "a small dog sat on the mat far away",
    ],
    ["the big cat sat", "a dog ran on a red mat"],
  ),
  "numbers": (
    ["one two three four", "two three", "four three two one one two three four", "one one two"],
    ["three four one", "two two three four one"],
  ),
}
METHODS = ("individual", "task_arithmetic", "ties", "adarank_ta")


def _checkpoints(root):
  """root/pretrained (a sharded Qwen2ForCausalLM + tokenizer), root/finetuned/<task>, root/prompts/."""
  tokenizer, pretrained = tiny_decoder.pretrained_causal_lm(root / "pretrained")
  config = pretrained.config
  for seed, task in enumerate(PROMPTS, start=1):
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
      for key, value in pretrained.state_dict().items():
        model.state_dict()[key].copy_(value + NOISE * torch.randn_like(value))
    model.save_pretrained(root / "finetuned" / task, max_shard_size="20KB")
  for task, (adapt, heldout) in PROMPTS.items():  # both kinds of file: .jsonl with a field, .txt
    prompt_files.write_jsonl(root / "prompts" / f"{task}.jsonl", adapt, field="prompt")
    prompt_files.write_jsonl(root / "prompts" / f"{task}_heldout.jsonl", heldout, field="prompt")
    prompt_files.write_txt(root / "prompts" / f"{task}.txt", adapt)
    prompt_files.write_txt(root / "prompts" / f"{task}_heldout.txt", heldout)
  return tokenizer


def _encode(tokenizer, texts):
  return tokenizer(texts, max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt")


def _transformers_scores(directory, tokenizer, texts):
  """(perplexity, mean next-token entropy) of texts under transformers' model, in float64."""
  model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  inputs = _encode(tokenizer, texts)
  with torch.no_grad():
    log_p = torch.log_softmax(model(**inputs).logits.double(), -1).numpy()
  mask = inputs["attention_mask"].numpy().astype(bool)
  ids = inputs["input_ids"].numpy()
  entropy = -(np.exp(log_p) * log_p).sum(-1)[mask].mean()
  target = mask[:, :-1] & mask[:, 1:]
  nll = -np.take_along_axis(log_p[:, :-1], ids[:, 1:, None], -1)[..., 0][target]
  return float(np.exp(nll.mean())), float(entropy)


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("generative")
  tokenizer = _checkpoints(root)
  config = qwen2_generative.get_config("quick=true")
  config.methods = METHODS
  config.tasks = tuple(PROMPTS)
  config.model.pretrained = str(root / "pretrained")
  config.model.finetuned = str(root / "finetuned" / "{task}")
  config.data.prompts = str(root / "prompts" / "{task}.jsonl")
  config.data.eval_prompts = str(root / "prompts" / "{task}_heldout.jsonl")
  config.data.prompt_field = "prompt"
  config.data.max_length = MAX_LENGTH
  config.adarank.layout = "config"
  validate.validate(config, export="hf")
  results = run.run(config, root / "work", continued=False, overwrite=False, export="hf")
  return root, tokenizer, results


def test_every_row_scores_as_transformers_on_the_fine_tuned_and_the_exported_models(generative_run):
  root, tokenizer, results = generative_run
  assert results["metric"] == "perplexity" and set(results["methods"]) == set(METHODS) - {"individual"}
  rows = {"individual": results["individual"], **results["methods"]}
  for method, scores in rows.items():
    for task, (_, heldout) in PROMPTS.items():
      directory = (
        root
        / ("finetuned" if method == "individual" else "work/export")
        / (task if method == "individual" else method)
      )
      perplexity, entropy = _transformers_scores(directory, tokenizer, heldout)
      metrics = results["metrics"][method][task]
      assert scores[task] == metrics["perplexity"] == pytest.approx(perplexity, rel=1e-5), (method, task)
      assert metrics["next_token_entropy"] == pytest.approx(entropy, rel=1e-5), (method, task)
  assert len({round(s["animals"], 4) for s in rows.values()}) == len(rows)  # the rows differ
  table = (root / "work" / "results.md").read_text()
  assert "Perplexity of each task's evaluation prompts" in table and "Mean next-token entropy" in table


def test_the_export_is_one_causal_lm_with_the_jax_models_logits_and_pretrained_embeddings(generative_run):
  root, tokenizer, _ = generative_run
  directory = root / "work" / "export" / "adarank_ta"
  inputs = _encode(tokenizer, PROMPTS["animals"][0])
  with torch.no_grad():
    expected = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()(**inputs).logits.numpy()
  config, tree = safetensors_dir.load(directory)
  graphdef, _ = functional.split(nnx.eval_shape(lambda: decoder.build(config, rngs=nnx.Rngs(0))))
  logits = jax.jit(lambda p, i, m: functional.call(graphdef, p, i, m))(
    tree, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
  )
  mask = inputs["attention_mask"].numpy().astype(bool)
  np.testing.assert_allclose(
    np.asarray(logits)[mask], expected[mask], rtol=1e-5, atol=1e-5 * np.abs(expected).max()
  )
  load = lambda d: {
    k: v for f in sorted(d.glob("*.safetensors")) for k, v in safetensors.numpy.load_file(f).items()
  }
  exported, pretrained = load(directory), load(root / "pretrained")
  for key in ("model.embed_tokens.weight", "lm_head.weight"):  # unmerged: the pretrained tensors
    np.testing.assert_array_equal(exported[key], pretrained[key], err_msg=key)
  key = "model.layers.1.mlp.down_proj.weight"
  assert not np.allclose(exported[key], pretrained[key], atol=1e-4), f"{key} not merged"
  again = transformers.AutoTokenizer.from_pretrained(directory)
  assert again("a dog ran")["input_ids"] == tokenizer("a dog ran")["input_ids"]


def test_adaptation_minimises_the_next_token_entropy(generative_run):
  root, _, _ = generative_run
  records = [json.loads(line) for line in (root / "work" / "metrics.jsonl").read_text().splitlines()]
  losses = [r["adarank_ta/loss"] for r in records if "adarank_ta/loss" in r]
  entropies = [[r[f"adarank_ta/entropy/{t}"] for t in PROMPTS] for r in records if "adarank_ta/loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses))
  np.testing.assert_allclose(losses, np.sum(entropies, axis=1), rtol=1e-6)  # the plain sum over tasks
  evals = [
    json.loads(line) for line in (root / "work" / "adarank_ta" / "evals.jsonl").read_text().splitlines()
  ]
  assert [e["step"] for e in evals] == [2, 4] and "next_token_entropy" in evals[0]["metrics"]["numbers"]


def test_bad_prompt_files_stop_the_run_before_any_checkpoint_is_read(tmp_path):
  (tmp_path / "prompts").mkdir()
  prompt_files.write_jsonl(tmp_path / "prompts" / "animals.jsonl", ["a dog"], field="prompt")
  (tmp_path / "prompts" / "numbers.jsonl").write_bytes(b'{"prompt": "one"}\n{"text": "two"}\n')
  config = qwen2_generative.get_config("quick=true")
  config.tasks = tuple(PROMPTS)
  config.model.pretrained = str(tmp_path / "nothing")  # never read: the prompts are checked first
  config.model.finetuned = str(tmp_path / "nothing" / "{task}")
  config.data.prompts = str(tmp_path / "prompts" / "{task}.jsonl")
  config.data.prompt_field = "prompt"
  with pytest.raises(validate.ConfigError, match=r"numbers.jsonl, line 2: no field 'prompt'"):
    run.run(config, tmp_path / "work", continued=False, overwrite=False, export="")
  config.data.eval_prompts = str(tmp_path / "prompts" / "{task}_heldout.jsonl")
  with pytest.raises(validate.ConfigError, match=r"data.eval_prompts: 2 prompt file\(s\) missing"):
    validate.validate(config, paths=True)


# ------------------------------------------------------------------------------------ command line


def _cli(root, workdir, *extra, wait=True):
  args = [
    sys.executable,
    "-m",
    "adarank_jax.main",
    "--config",
    str(ROOT / "configs/qwen2_generative.py") + ":quick=true",
    f"--workdir={workdir}",
    f"--config.model.pretrained={root / 'pretrained'}",
    f"--config.model.finetuned={root / 'finetuned' / '{task}'}",
    f"--config.tasks={tuple(PROMPTS)!r}",
    f"--config.data.prompts={root / 'prompts' / '{task}.txt'}",  # .txt: one prompt per line
    f"--config.data.max_length={MAX_LENGTH}",
    "--config.methods=('task_arithmetic','adarank_ta')",
    "--config.adarank.num_steps=8",
    "--config.adarank.eval_every=4",
    "--config.adarank.layout=config",  # two runs compared bit for bit: one layout in both
    "--export=hf",
    *extra,
  ]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  }
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_merges_adapts_exports_and_resumes_a_killed_run(tmp_path):
  tokenizer = _checkpoints(tmp_path)
  straight = _cli(tmp_path, tmp_path / "straight")
  assert straight.returncode == 0, straight.stdout + straight.stderr
  results = json.loads((tmp_path / "straight" / "results.json").read_text())
  assert set(results["methods"]) == {"task_arithmetic", "adarank_ta"} and results["metric"] == "perplexity"
  for method in results["methods"]:  # evaluated on the adaptation prompts (no data.eval_prompts)
    for task, (adapt, _) in PROMPTS.items():
      perplexity, entropy = _transformers_scores(tmp_path / "straight" / "export" / method, tokenizer, adapt)
      assert results["methods"][method][task] == pytest.approx(perplexity, rel=1e-5), (method, task)
      assert results["metrics"][method][task]["next_token_entropy"] == pytest.approx(entropy, rel=1e-5)

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
  assert again["methods"] == results["methods"] and again["metrics"] == results["metrics"]
