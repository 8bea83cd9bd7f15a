"""LoRA task vectors: the factored SVD against numpy's of the dense product, and PEFT adapter directories."""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as peft_lib
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from adarank_jax.core import baselines, decomposition, lora, merging, task_vectors, tree_util
from adarank_jax.interop import hf, peft
from adarank_jax.models import decoder, functional


def _factors(seed, r, n_in, n_out):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((r, n_in)).astype(np.float32), rng.standard_normal((n_out, r)).astype(np.float32)


def _dense64(a, b, scale):
  """The task vector of a kernel, in float64: scale * (B @ A)^T."""
  return scale * (b.astype(np.float64) @ a.astype(np.float64)).T


def _check_svd(svd, dense, k):
  u, s, vt = (np.asarray(x, np.float64) for x in svd)
  assert u.shape == (dense.shape[0], k) and s.shape == (k,) and vt.shape == (k, dense.shape[1])
  u_np, s_np, vt_np = np.linalg.svd(dense, full_matrices=False)
  top = s_np[0]
  np.testing.assert_allclose(s, s_np[:k], rtol=1e-5, atol=1e-5 * top)  # descending, as numpy's
  np.testing.assert_allclose(u @ np.diag(s) @ vt, dense, rtol=0, atol=1e-5 * np.abs(dense).max())
  np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)
  np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-5)
  for i in range(k):  # sign-invariant: each component s_i u_i v_i^T is numpy's
    if s_np[i] > 1e-3 * top and all(abs(s_np[i] - s_np[j]) > 1e-3 * top for j in range(k) if j != i):
      np.testing.assert_allclose(
        s[i] * np.outer(u[:, i], vt[i]), s_np[i] * np.outer(u_np[:, i], vt_np[i]), atol=1e-5 * top
      )


@pytest.mark.parametrize("r, n_in, n_out", [(4, 48, 32), (8, 24, 64), (8, 40, 6), (1, 16, 16)])
def test_factored_svd_equals_numpy_svd_of_the_product(r, n_in, n_out):
  a, b = _factors(r, r, n_in, n_out)
  svd = lora.decompose(a, b, alpha=16.0, r=r, use_rslora=False)
  _check_svd(svd, _dense64(a, b, 16.0 / r), min(r, n_in, n_out))
  np.testing.assert_allclose(
    lora.densify(a, b, alpha=16.0, r=r, use_rslora=False), _dense64(a, b, 16.0 / r), rtol=1e-5, atol=1e-5
  )


def test_rslora_scales_by_the_square_root_of_r():
  a, b = _factors(0, 16, 32, 24)
  assert lora.scaling(8.0, 16, use_rslora=False) == 0.5 and lora.scaling(8.0, 16, use_rslora=True) == 2.0
  plain = lora.decompose(a, b, alpha=8.0, r=16, use_rslora=False)
  rs = lora.decompose(a, b, alpha=8.0, r=16, use_rslora=True)
  np.testing.assert_allclose(rs.s, 4 * plain.s, rtol=1e-6)
  _check_svd(rs, _dense64(a, b, 2.0), 16)


def test_rank_deficient_factors():
  a, b = _factors(1, 4, 30, 20)
  a[2] = 2 * a[0]  # rank(A) = 3
  b[:, 3] = 0  # and B's last column is zero: rank(B A) = 2
  svd = lora.decompose(a, b, alpha=4.0, r=4, use_rslora=False)
  assert np.all(np.isfinite(svd.u)) and np.all(np.isfinite(svd.vt))
  np.testing.assert_allclose(svd.s[2:], 0, atol=1e-5 * svd.s[0])
  _check_svd(svd, _dense64(a, b, 1.0), 4)
  zero = lora.decompose(np.zeros_like(a), b, alpha=4.0, r=4, use_rslora=False)  # a fresh adapter: B A = 0
  np.testing.assert_array_equal(zero.s, 0)


def test_task_axis_matches_decomposition_layout():
  pairs = [_factors(seed, 4, 12, 10) for seed in (2, 3)]
  a, b = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
  svd = lora.decompose(a, b, alpha=8.0, r=4, use_rslora=False)
  assert [x.shape for x in svd] == [(2, 12, 4), (2, 4), (2, 4, 10)]
  for t in range(2):  # the same as one task at a time
    one = lora.decompose(a[t], b[t], alpha=8.0, r=4, use_rslora=False)
    np.testing.assert_allclose(svd.s[t], one.s, rtol=1e-6)
  tau = lora.densify(a, b, alpha=8.0, r=4, use_rslora=False)
  dense = decomposition.truncate(decomposition.decompose({"w": tau}, {"w": True}, method="xla")["w"], 4)
  np.testing.assert_allclose(svd.s, dense.s, rtol=1e-5)
  scale = np.abs(tau).max()
  np.testing.assert_allclose(
    decomposition.reconstruct(svd), decomposition.reconstruct(dense), atol=1e-5 * scale
  )
  assert lora.decompose(a, b, alpha=8.0, r=4, use_rslora=False, dtype=jnp.bfloat16).u.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"A \(2, 4, 12\), B \(2, 10, 3\) for r=4"):
    lora.decompose(a, b[..., :3], alpha=8.0, r=4, use_rslora=False)


# ------------------------------------------------------------------------------------ PEFT adapters

_LLAMA = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=32,
  pad_token_id=0,
)
_TARGETS = ("q_proj", "v_proj", "down_proj")


def _base(tmp_path):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA)).eval()
  model.save_pretrained(tmp_path / "base")
  return model


def _write_adapter(directory, model, *, seed, r, alpha, use_rslora, **fields):
  """A PEFT-layout adapter of `model` (as `PeftModel.save_pretrained` writes it); returns its torch factors."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, module in model.named_modules():
    if name.split(".")[-1] in _TARGETS:
      n_out, n_in = module.weight.shape
      state[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32)
      state[f"base_model.model.{name}.lora_B.weight"] = (
        rng.standard_normal((n_out, r)).astype(np.float32) * 0.1
      )
  config = dict(
    peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, use_rslora=use_rslora, use_dora=False,
    target_modules=list(_TARGETS), lora_dropout=0.0, bias="none", fan_in_fan_out=False, modules_to_save=None,
    rank_pattern={}, alpha_pattern={}, **fields,
  )  # fmt: skip
  directory.mkdir()
  (directory / peft.ADAPTER_CONFIG).write_text(json.dumps(config))
  safetensors.numpy.save_file(state, directory / peft.ADAPTER_WEIGHTS)
  return state


def test_reader_maps_modules_to_tree_paths(tmp_path):
  model = _base(tmp_path)
  config, _ = hf.load_hf(tmp_path / "base")
  state = _write_adapter(tmp_path / "a", model, seed=0, r=4, alpha=8.0, use_rslora=True)
  adapter = peft.read(tmp_path / "a", config)
  assert (adapter.r, adapter.lora_alpha, adapter.use_rslora) == (4, 8.0, True)
  assert len(adapter.factors) == 6
  a, b = adapter.factors["model/layers/1/self_attn/v_proj/kernel"]
  assert a.shape == (4, 32) and b.shape == (16, 4)  # 2 kv heads x head_dim 8
  np.testing.assert_array_equal(a, state["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])


def test_tree_inputs_equal_those_of_the_fine_tuned_trees():
  """lora.task_vectors (both origins) and lora.factors against task_vectors / decomposition of the trees
  `lora.Adapted` makes: adapters of different ranks, a kernel one of them does not target, a kernel left
  dense by `select`, an excluded one, and a truncated rank."""
  rng = np.random.default_rng(0)
  base = {
    "q": rng.standard_normal((12, 10)),
    "v": rng.standard_normal((12, 6)),
    "o": rng.standard_normal((6, 12)),
  }
  base = {k: v.astype(np.float32) for k, v in base.items()} | {"norm": np.ones(12, np.float32)}
  tasks = [
    lora.Task({"q": _factors(1, 3, 12, 10), "o": _factors(2, 3, 6, 12)}, 0.5, 3),
    lora.Task({"q": _factors(3, 2, 12, 10), "v": _factors(4, 2, 12, 6)}, 2.0, 2),
  ]
  trees = list(lora.Adapted(base, tasks))
  include = {"q": True, "v": True, "o": False, "norm": True}
  for origin in ("pretrained", "average"):
    want_origin, want_tau = task_vectors.task_vectors(base, trees, origin=origin, include=include)
    got_origin, got_tau = lora.task_vectors(base, tasks, origin=origin, include=include)
    assert set(got_tau) == {"q", "v"}  # the norm has a zero task vector: absent; "o" excluded
    for k in got_tau:
      np.testing.assert_allclose(got_tau[k], want_tau[k], atol=2e-5, err_msg=(origin, k))
    for k in base:
      np.testing.assert_allclose(got_origin[k], want_origin[k], atol=2e-5, err_msg=(origin, k))
  _, tau = lora.task_vectors(base, tasks, origin="pretrained")
  got = lora.factors(base, tasks, select={"q": True, "v": False, "o": True, "norm": False}, rank=2)
  assert got["q"].s.shape == (2, 2) and got["o"].s.shape == (2, 2) and got["v"].shape == (2, 12, 6)
  want = decomposition.decompose(tau, {"q": True, "v": False, "o": True}, rank=2)
  for k in ("q", "o"):
    np.testing.assert_allclose(got[k].s, want[k].s, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(
      decomposition.reconstruct(got[k]), decomposition.reconstruct(want[k]), atol=1e-4, err_msg=k
    )
  np.testing.assert_array_equal(got["o"].s[1], 0.0)  # adapter 1 does not target "o": zero components
  np.testing.assert_allclose(got["v"], tau["v"], atol=1e-6)
  with pytest.raises(
    tree_util.StructureError,
    match=r"adapter 0: q: A \(3, 12\), B \(10, 3\) for r=3; the base tree has a \(10, 12\)",
  ):
    lora.Adapted({"q": base["q"].T}, tasks[:1])


def _peft_adapter(model, directory, *, seed, r, alpha, use_rslora):
  """A real PEFT LoRA model of a copy of `model` (lora_B set non-zero), saved to `directory`; returns the
  merged weights of that copy (PEFT's own merge_and_unload) as float64 numpy arrays."""
  torch.manual_seed(seed)
  config = peft_lib.LoraConfig(
    r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(_TARGETS), lora_dropout=0.0
  )
  tuned = peft_lib.get_peft_model(copy.deepcopy(model), config)
  with torch.no_grad():
    for name, parameter in tuned.named_parameters():
      if "lora_B" in name:
        parameter.normal_(std=0.1)
  tuned.save_pretrained(directory)
  return {k: v.detach().double().numpy() for k, v in tuned.merge_and_unload().state_dict().items()}


def _jax_logits(config, tree, ids):
  graphdef, _ = functional.split(nnx.eval_shape(lambda: decoder.build(config, rngs=nnx.Rngs(0))))
  return np.asarray(
    jax.jit(functools.partial(functional.call, graphdef))(tree, jnp.asarray(ids), jnp.ones_like(ids))
  )


@pytest.mark.parametrize("count, lam", [(1, 1.0), (2, 0.7)])
def test_task_arithmetic_of_peft_adapters_equals_peft_merge_and_unload(tmp_path, count, lam):
  """Adapters written by PEFT itself (one plain, one rsLoRA), read by `peft.read`: Task Arithmetic through
  the exact factors (`lora.factors`, hard all-on masks, coefficient lambda) and through the dense task
  vectors (`lora.task_vectors`, baselines.task_arithmetic) equals W + lambda * sum_t (W_t - W), W_t
  PEFT's merge_and_unload of adapter t (one adapter at lambda = 1: merge_and_unload itself); the logits
  too. (PEFT's add_weighted_adapter(combination_type='linear') is not this sum: it mixes the A and B of
  the adapters separately, giving cross terms B_s A_t.)"""
  model = _base(tmp_path)
  config, base_tree = hf.load_hf(tmp_path / "base")
  specs = [dict(seed=1, r=4, alpha=8.0, use_rslora=False), dict(seed=2, r=2, alpha=4.0, use_rslora=True)]
  merged_by_peft = [_peft_adapter(model, tmp_path / f"a{i}", **spec) for i, spec in enumerate(specs[:count])]
  adapters = [peft.read(tmp_path / f"a{i}", config) for i in range(count)]
  assert [(a.r, a.use_rslora) for a in adapters] == [(s["r"], s["use_rslora"]) for s in specs[:count]]
  tasks = [a.task() for a in adapters]
  select = tree_util.select(base_tree, [r".*kernel"])
  factors = lora.factors(base_tree, tasks, select=select, dtype=jnp.float32)
  assert {np.shape(f.s) for f in tree_util.flatten(factors).values()} == {(count, 4)}  # r = 2 padded
  masks = jax.tree.map(lambda f: jnp.full(f.s.shape, 10.0), factors, is_leaf=decomposition.is_svd)
  coefficients = merging.init_coefficients(factors, num_tasks=count, prior=lam)
  ours = merging.merge(base_tree, factors, masks, coefficients, temperature=10.0, mask_mode="hard")
  origin, tau = lora.task_vectors(base_tree, tasks, origin="pretrained")
  dense = baselines.task_arithmetic(origin, tau, scaling=lam)

  base = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
  expected = {k: base[k] + lam * sum(m[k] - base[k] for m in merged_by_peft) for k in base}
  kernels = hf.linear_kernels(config)
  for merged in (ours, dense):
    flat = tree_util.flatten(merged)
    for key, (path, _) in kernels.items():
      np.testing.assert_allclose(np.asarray(flat[path]).T, expected[key], rtol=0, atol=1e-5, err_msg=key)
  assert all(
    (k.split(".")[-2] in _TARGETS) != np.array_equal(expected[k], base[k]) for k in kernels
  )  # the targeted kernels change, the others keep the base value
  untouched = tree_util.flatten(ours)["model/layers/0/mlp/up_proj/kernel"]  # targeted by no adapter
  np.testing.assert_array_equal(untouched, tree_util.flatten(base_tree)["model/layers/0/mlp/up_proj/kernel"])
  model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in expected.items()})
  ids = np.array([[5, 6, 7, 8, 9, 10]])
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
  assert np.abs(_jax_logits(config, ours, ids) - ref).max() <= 1e-5 * np.abs(ref).max()
  fine_tuned = lora.Adapted(base_tree, tasks)[0]  # the fine-tuned tree of adapter 0: merge_and_unload's
  for key, (path, _) in kernels.items():
    np.testing.assert_allclose(
      np.asarray(tree_util.flatten(fine_tuned)[path]).T, merged_by_peft[0][key], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda c, s: c.update(use_dora=True), r"adapter_config\.json: unsupported adapter: use_dora=True"),
    (lambda c, s: c.update(rank_pattern={"q_proj": 8}), r"rank_pattern=\{'q_proj': 8\}"),
    (lambda c, s: c.update(peft_type="IA3"), r"peft_type='IA3'"),
    (
      lambda c, s: s.pop("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"),
      r"adapter_model\.safetensors: 1 problem\(s\): base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_B"
      r"\.weight: missing",
    ),
    (
      lambda c, s: s.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 31))}
      ),
      r"q_proj\.lora_A\.weight: shape \(4, 31\), expected \(r, n_in\) = \(4, 32\)",
    ),
    (
      lambda c, s: s.update({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 64))}),
      r"embed_tokens\.lora_embedding_A: not a LoRA weight",
    ),
    (
      lambda c, s: s.update({"base_model.model.model.norm.lora_A.weight": np.zeros((4, 32))}),
      r"model\.norm is not a Linear layer of LlamaForCausalLM",
    ),
    (lambda c, s: c.update(target_modules=["q_proj", "v_proj"]), r"down_proj is not in target_modules"),
  ],
)
def test_reader_errors_name_the_file_and_key(tmp_path, edit, match):
  model = _base(tmp_path)
  config, _ = hf.load_hf(tmp_path / "base")
  _write_adapter(tmp_path / "a", model, seed=0, r=4, alpha=8.0, use_rslora=False)
  adapter_config = json.loads((tmp_path / "a" / peft.ADAPTER_CONFIG).read_text())
  state = safetensors.numpy.load_file(tmp_path / "a" / peft.ADAPTER_WEIGHTS)
  edit(adapter_config, state)
  (tmp_path / "a" / peft.ADAPTER_CONFIG).write_text(json.dumps(adapter_config))
  safetensors.numpy.save_file(
    {k: v.astype(np.float32) for k, v in state.items()}, tmp_path / "a" / peft.ADAPTER_WEIGHTS
  )
  with pytest.raises(ValueError, match=match):
    peft.read(tmp_path / "a", config)
