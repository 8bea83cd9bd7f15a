"""Loss, gradients and five Adam steps on 8 forced CPU devices equal those on 1 device, for every
factor placement (replicated, split by task, FSDP over a 'model' axis).

Each configuration runs in its own subprocess, because XLA_FLAGS must be set before jax is imported.
The trees are tiny: forced host devices make everything (the SVD included) several times slower.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from adarank_jax.core import merging, train, tree_util
    from adarank_jax.core.decomposition import decompose
    from adarank_jax.core.task_vectors import task_vectors

    T, BATCH, TEMP = 4, 16, 10.0
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
    base = {'enc': {'a': {'kernel': f32(8, 6), 'bias': f32(6)}, 'b': {'kernel': f32(6, 8)}}}
    finetuned = [jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), base)
                 for _ in range(T)]
    origin, tau = task_vectors(base, finetuned, origin='average')
    factors = decompose(tau, tree_util.select(tau, [r'.*/kernel']))
    heads = [f32(8, 3 + t) for t in range(T)]
    batches = tuple(f32(BATCH, 8) for _ in range(T))

    def task_logits_fn(params, t, x):
      enc = params['enc']
      h = jnp.tanh(x @ enc['a']['kernel'] + enc['a']['bias'])
      return (h @ enc['b']['kernel']) @ heads[t]

    mode, out_path = sys.argv[1], sys.argv[2]
    out = {'device_count': np.asarray(jax.device_count())}
    optimizer = train.make_optimizer(1e-3)
    loss_fn = train.make_loss_fn(logits_fn=train.per_task(task_logits_fn), temperature=TEMP, num_tasks=T)
    placements = ['replicated', 'task', 'task_cached', 'fsdp', 'fsdp_cached']
    for placement in (['single'] if mode == 'single' else placements):
      state = train.init_state(factors, optimizer=optimizer, num_tasks=T, initial_rank_ratio=0.5,
                               prior=0.3)
      # Move logits off the +-0.1 init so the masks and the gradients are not all alike.
      noise = np.random.default_rng(1)
      state = state._replace(mask_logits=jax.tree.map(
          lambda x: x + 0.05 * noise.normal(size=x.shape).astype(np.float32), state.mask_logits))
      frozen, data, mesh = (origin, factors), batches, None
      if placement != 'single':
        kind = placement.split('_')[0]
        mesh = train.make_mesh(task=2 if kind == 'task' else 1, model=4 if kind == 'fsdp' else 1)
        frozen = train.place_frozen(frozen, mesh, factor_placement=kind)
        state, data = train.place_state(state, mesh), train.place_batches(batches, mesh)
        u = frozen[1]['enc']['a']['kernel'].u
        rows = BATCH // mesh.shape['data']
        if kind == 'fsdp':  # the weights split 4 ways along their largest axis, the batch 8 ways
          assert u.addressable_shards[0].data.shape == (T, 2, 6), u.sharding
          kernel = frozen[0]['enc']['a']['kernel']
          assert kernel.addressable_shards[0].data.shape == (2, 6), kernel.sharding
          assert frozen[0]['enc']['a']['bias'].addressable_shards[0].data.shape == (6,)  # 6 % 4: whole
          rows = BATCH // 8
        else:
          expected = (1 if kind == 'replicated' else 2) * u.shape[0] // T
          assert u.addressable_shards[0].data.shape[0] == u.shape[0] // expected, u.sharding
        assert data[0].addressable_shards[0].data.shape[0] == rows
      if placement.endswith('cached'):  # the cache is computed where the (split) factors are
        state = state._replace(deltas=jax.jit(merging.init_deltas)(frozen[1], state.mask_logits))
        for d in state.deltas['enc']['a']['kernel']:  # the deltas and U^T
          if kind == 'task':
            assert d.addressable_shards[0].data.shape[0] == T // 2, d.sharding
      trainable = (state.mask_logits, state.coefficients)
      loss, grads = jax.jit(jax.value_and_grad(
          lambda tr: loss_fn(tr, frozen, data, state.deltas)[0]))(trainable)
      step = train.make_train_step(logits_fn=train.per_task(task_logits_fn), optimizer=optimizer,
                                   temperature=TEMP, num_tasks=T, mesh=mesh)
      new_state, metrics = step(frozen, state, data)
      out[f'{placement}/loss'] = np.asarray(loss)
      out[f'{placement}/step_loss'] = np.asarray(metrics['loss'])
      for i, leaf in enumerate(jax.tree.leaves((new_state.mask_logits, new_state.coefficients))):
        out[f'{placement}/new{i}'] = np.asarray(leaf)
      for _ in range(4):  # five Adam steps in all
        new_state, metrics = step(frozen, new_state, data)
      out[f'{placement}/step5_loss'] = np.asarray(metrics['loss'])
      for i, leaf in enumerate(jax.tree.leaves(grads)):
        out[f'{placement}/grad{i}'] = np.asarray(leaf)
      for i, leaf in enumerate(jax.tree.leaves((new_state.mask_logits, new_state.coefficients))):
        out[f'{placement}/step5_{i}'] = np.asarray(leaf)
    np.savez(out_path, **out)
""")


def _run(mode, tmp_path, devices):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  script = tmp_path / "sharded_step.py"
  script.write_text(SCRIPT)
  out = tmp_path / f"{mode}.npz"
  result = subprocess.run(
    [sys.executable, str(script), mode, str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return dict(np.load(out))


@pytest.fixture(scope="module", name="results")
def _results(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("sharding")
  return _run("single", tmp_path, 1), _run("sharded", tmp_path, 8)


@pytest.mark.parametrize("placement", ["replicated", "task", "task_cached", "fsdp", "fsdp_cached"])
def test_eight_devices_match_one(results, placement):
  single, sharded = results
  assert int(single["device_count"]) == 1 and int(sharded["device_count"]) == 8
  names = sorted(k.split("/", 1)[1] for k in single if "/" in k)
  assert len([n for n in names if n.startswith("grad")]) == 5  # 2 mask logits, 3 coefficients
  for name in names:
    np.testing.assert_allclose(
      sharded[f"{placement}/{name}"], single[f"single/{name}"], rtol=1e-5, atol=1e-5, err_msg=name
    )
  assert np.abs(single["single/grad0"]).max() > 1e-4
