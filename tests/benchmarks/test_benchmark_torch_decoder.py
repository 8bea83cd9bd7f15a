"""On a decoder classifier, the PyTorch baseline of the official step (transformers) equals adarank_jax's step."""

import importlib
import json
import types

import jax
import numpy as np
import pytest
import torch

from adarank_jax.benchmarks import step as benchmark
from adarank_jax.benchmarks import torch_step as benchmark_torch
from adarank_jax.core import decomposition, task_vectors, train, tree_util

# A tiny Qwen2 (q/k/v biases: dense task vectors beside the decomposed kernels), 2 layers.
TINY = {
  "architectures": ["Qwen2ForCausalLM"],
  "model_type": "qwen2",
  "vocab_size": 64,
  "hidden_size": 32,
  "intermediate_size": 48,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "hidden_act": "silu",
  "max_position_embeddings": 64,
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "tie_word_embeddings": True,
}
TASKS, BATCH, SEQ_LEN, CLASSES = 3, 3, 8, 3
PRIOR, TEMPERATURE, LR = 0.3, 10.0, 1e-3
GRAD_RTOL, GRAD_SCALED_ATOL = 1e-3, 1e-4  # float32 rounding; atol relative to the leaf's max |grad|


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_qwen2")
  (path / "config.json").write_text(json.dumps(TINY))
  return str(path)


@pytest.fixture(scope="module")
def inputs(shape):
  # Noise 0.05: task vectors large enough that masking components visibly changes the loss.
  return benchmark.make_decoder_inputs(
    shape, tasks=TASKS, batch=BATCH, seq_len=SEQ_LEN, classes=CLASSES, noise=0.05
  )


@pytest.fixture(scope="module")
def jax_side(inputs):
  """adarank_jax on `inputs` as the CLI builds it: task vectors of the merged leaves, factors, loss."""
  include = jax.tree.map(lambda x: not x, tree_util.select(inputs.pretrained, inputs.unmerged))
  origin, tau = task_vectors.task_vectors(
    inputs.pretrained, [inputs.finetuned(t) for t in range(TASKS)], origin="pretrained", include=include
  )
  factors = decomposition.decompose(tau, tree_util.select(tau, inputs.decompose))
  logits_fn = inputs.logits_fn("per_task")
  loss_fn = train.make_loss_fn(logits_fn=logits_fn, temperature=TEMPERATURE, num_tasks=TASKS)
  return types.SimpleNamespace(
    frozen=(origin, factors),
    factors=factors,
    step=train.make_train_step(
      logits_fn=logits_fn, optimizer=train.make_optimizer(LR), temperature=TEMPERATURE, num_tasks=TASKS
    ),
    value_and_grad=jax.jit(jax.value_and_grad(loss_fn, has_aux=True)),
    batches=inputs.batches(),
  )


def _close(actual, expected, what):
  assert sorted(actual) == sorted(expected), what
  for path, want in expected.items():
    want = np.asarray(want)
    atol = GRAD_SCALED_ATOL * float(np.abs(want).max())
    np.testing.assert_allclose(actual[path], want, rtol=GRAD_RTOL, atol=atol, err_msg=f"{what} {path}")


def test_inputs_are_deterministic_and_padded(shape, inputs):
  again = benchmark.make_decoder_inputs(
    shape, tasks=TASKS, batch=BATCH, seq_len=SEQ_LEN, classes=CLASSES, noise=0.05
  )
  for a, b in zip(jax.tree.leaves(inputs.finetuned(2)), jax.tree.leaves(again.finetuned(2))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(inputs.input_ids, again.input_ids)
  np.testing.assert_array_equal(inputs.heads, again.heads)
  assert inputs.input_ids.shape == inputs.attention_mask.shape == (TASKS, BATCH, SEQ_LEN)
  assert inputs.heads.shape == (TASKS, TINY["hidden_size"], CLASSES)
  assert ((inputs.input_ids == benchmark.PAD_ID) == (inputs.attention_mask == 0)).all()
  assert inputs.attention_mask[:, 0].all() and not inputs.attention_mask.all()  # some rows padded
  assert set(inputs.pretrained) == {"model"}  # the merged body; heads apart, as load_lm


def test_torch_keys_follow_the_cli_rules(inputs):
  keys = benchmark_torch.decoder_keys(inputs)
  model = benchmark_torch.decoder_model(inputs)
  assert sorted(keys.values()) == sorted(k for k in model.state_dict() if k != "score.weight")
  decomposed = tree_util.flatten(tree_util.select(inputs.pretrained, inputs.decompose))
  unmerged = tree_util.flatten(tree_util.select(inputs.pretrained, inputs.unmerged))
  assert {p: benchmark_torch.decoder_is_decomposed(k) for p, k in keys.items()} == decomposed
  assert {p: benchmark_torch.decoder_is_unmerged(k) for p, k in keys.items()} == unmerged
  assert sum(decomposed.values()) == 7 * TINY["num_hidden_layers"]
  assert sum(unmerged.values()) == 1


def test_the_torch_model_holds_the_origin_not_a_copy(inputs):
  # Its own random init would stay in memory beside the origin (2 GB at Qwen2-0.5B) for nothing.
  torch_side = benchmark_torch.problem(inputs)
  origin = torch_side.state_dict(inputs.pretrained)
  benchmark_torch.share_origin(torch_side.model, origin)
  params = dict(torch_side.model.named_parameters())
  assert sorted(params) == sorted([*origin, "score.weight"])
  for key, tensor in origin.items():
    assert params[key].data_ptr() == tensor.data_ptr(), key
    assert not params[key].requires_grad, key
  with pytest.raises(AssertionError, match="keys the model does not have"):
    benchmark_torch.share_origin(torch_side.model, {"model.no_such.weight": torch.zeros(1)})


def test_torch_step_equals_jax_step(inputs, jax_side):
  # rho 0.5: half the components start masked off; cached deltas: the step's fastest CPU layout here.
  rho = 0.5
  state = train.init_state(
    jax_side.factors,
    optimizer=train.make_optimizer(LR),
    num_tasks=TASKS,
    initial_rank_ratio=rho,
    prior=PRIOR,
    cache_deltas=True,
  )
  official, batches = benchmark_torch.build(
    inputs, initial_rank_ratio=rho, prior=PRIOR, temperature=TEMPERATURE, lr=LR
  )
  masks0, coefs0 = official.values()
  _close(masks0, tree_util.flatten(state.mask_logits), "initial mask logits")
  _close(coefs0, tree_util.flatten(state.coefficients), "initial coefficients")

  (loss, _), (mask_grads, coef_grads) = jax_side.value_and_grad(
    (state.mask_logits, state.coefficients), jax_side.frozen, jax_side.batches, state.deltas
  )
  torch_loss, torch_mask_grads, torch_coef_grads = benchmark_torch.loss_and_grads(official, batches)
  np.testing.assert_allclose(torch_loss, float(loss), rtol=1e-5)
  _close(torch_mask_grads, tree_util.flatten(mask_grads), "mask-logit gradient")
  _close(torch_coef_grads, tree_util.flatten(coef_grads), "coefficient gradient")
  assert max(np.abs(g).max() for g in torch_mask_grads.values()) > 0

  new_state, metrics = jax_side.step(jax_side.frozen, state, jax_side.batches)
  np.testing.assert_allclose(official.step(batches), float(metrics["loss"]), rtol=1e-5)
  masks1, coefs1 = official.values()
  # Adam's first step moves every parameter by lr * g / (|g| + eps): both sides by the same amount.
  for ours, theirs in ((new_state.mask_logits, masks1), (new_state.coefficients, coefs1)):
    for path, value in tree_util.flatten(ours).items():
      np.testing.assert_allclose(theirs[path], np.asarray(value), rtol=0, atol=0.1 * LR, err_msg=path)

  # The masks matter: the full-rank start has another loss.
  full, full_batches = benchmark_torch.build(
    inputs, initial_rank_ratio=1.0, prior=PRIOR, temperature=TEMPERATURE
  )
  assert abs(benchmark_torch.loss_and_grads(full, full_batches)[0] - float(loss)) > 1e-4


def test_benchmark_command_runs_both_sides_and_prints_the_table(shape, monkeypatch, capsys):
  # Each side in this process (the command runs each in its own; the table is the same).
  monkeypatch.setattr(
    benchmark, "_subprocess", lambda module, argv: importlib.import_module(module).main(list(argv))
  )
  argv = ["--arch", shape, "--tasks", "2", "--batch", "2", "--seq-len", "8", "--classes", "3", "--steps", "1"]
  row = benchmark.main([*argv, "--baseline"])
  out = capsys.readouterr().out
  assert "| configuration | measure | PyTorch (official) | adarank_jax | ratio |" in out
  assert "x 2, batch 2 x 8 tokens" in out and "| | step (median) |" in out
  np.testing.assert_allclose(row["torch"]["loss"], row["jax"]["loss"], rtol=1e-5)
  assert row["jax"]["args"]["forward"] == "per_task"
  # The initial state is waited for and reported on its own row, not counted in the compile.
  assert row["jax"]["init_s"] > 0 and "| | state init (the delta cache) | |" in out


def test_every_suite_row_parses_and_names_a_shape():
  for name, rows in benchmark.SUITES.items():
    for label, argv in rows:
      args = benchmark._parse_args(argv)
      assert (benchmark.decoder_shape(args.arch) is not None) == ("tokens" in label), (name, label)
  gpu = [benchmark._parse_args(argv) for _, argv in benchmark.SUITES["gpu"]]
  assert all(args.torch_device == "cuda" for args in gpu)
  assert {args.arch for args in gpu} >= {shape for _, shape in benchmark.LARGE_DECODERS}


def test_a_baseline_row_names_the_window_and_the_factor_dtype():
  plain = benchmark._parse_args(["--arch", "ViT-B-32", "--tasks", "8", "--batch", "4"])
  assert benchmark.table_label(plain) == "ViT-B-32 x 8, batch 4"
  windowed = benchmark._parse_args(
    ["--arch", "ViT-B-32", "--tasks", "8", "--batch", "4", "--window", "0.16", "--factor-dtype", "bfloat16"]
  )
  assert benchmark.table_label(windowed) == "ViT-B-32 x 8, batch 4, window 16%, bfloat16 factors"


def test_a_cached_layout_that_would_not_fit_is_skipped_for_the_same_one_without_the_cache(shape, monkeypatch):
  # The first compiled step (the lone decoder layout, with the cache) is made to need 10 TB.
  real, calls = benchmark.layout.step_bytes, []

  def step_bytes(compiled):
    calls.append(compiled)
    return 10**13 if len(calls) == 1 else real(compiled)

  monkeypatch.setattr(benchmark.layout, "step_bytes", step_bytes)
  argv = ["--arch", shape, "--tasks", "2", "--batch", "2", "--seq-len", "8", "--classes", "3", "--steps", "1"]
  result = benchmark.main(argv)
  first, second = result["layouts"]
  assert "cached deltas on" in first["layout"] and "over 80% of the" in first["skipped"]
  assert first["step_s_median"] is None
  assert "cached deltas off" in second["layout"] and second["skipped"] is None
  assert result["layout_fields"]["cache_deltas"] is False and np.isfinite(result["loss"])
  # A layout the flags fix is run as given.
  calls.clear()
  fixed = benchmark.main([*argv, "--cache-deltas"])
  assert len(fixed["layouts"]) == 1 and fixed["layout_fields"]["cache_deltas"] is True
