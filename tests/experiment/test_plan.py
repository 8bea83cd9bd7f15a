"""The memory planner (experiment/plan.py) against the arrays a run really places, and --dry_run.

On 8 forced CPU devices (a subprocess: XLA_FLAGS must be set before jax starts) the planned bytes per
device of weights, factors and state equal the bytes of one device's shards once a real random tiny
Qwen2's origin and factors are placed with `train.place_frozen`, for every option of the plan.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers

from adarank_jax.experiment import plan
from configs import qwen2_glue

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("cola", "sst2", "mnli")


@pytest.fixture(scope="module", name="model_dir")
def _model_dir(tmp_path_factory):
  """A directory holding only the config.json of a tiny Qwen2 causal LM: all the planner reads."""
  directory = tmp_path_factory.mktemp("tiny_qwen2")
  config = transformers.Qwen2Config(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    architectures=["Qwen2ForCausalLM"],
  )
  (directory / "config.json").write_text(json.dumps(config.to_dict()))
  return directory


def _config(model_dir):
  config = qwen2_glue.get_config()
  config.model.pretrained = str(model_dir)
  config.tasks = TASKS
  config.mesh.factor_placement = "fsdp"
  config.mesh.model_devices = 4
  config.data.max_length = 16
  return config


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from flax import nnx
    from adarank_jax.core import decomposition, train, tree_util
    from adarank_jax.core.task_vectors import task_vectors
    from adarank_jax.experiment import loading, plan
    from adarank_jax.models import decoder, functional
    from configs import qwen2_glue

    config = qwen2_glue.get_config()
    config.model.pretrained, config.tasks = sys.argv[1], ('cola', 'sst2', 'mnli')
    config.mesh.factor_placement, config.mesh.model_devices, config.data.max_length = 'fsdp', 4, 16
    rows = plan.plan(config, devices=8, device_memory=1e9, compile=False)  # compiled: the dry run's test
    shape = plan.decoder_config(config)
    _, tree = functional.split(decoder.build(shape, rngs=nnx.Rngs(0)))
    body = {'model': jax.tree.map(np.asarray, tree['model'])}
    rng = np.random.default_rng(0)
    tuned = [jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(x.dtype), body) for _ in range(3)]
    include = jax.tree.map(lambda x: not x, tree_util.select(body, config.merge.unmerged))
    origin, tau = task_vectors(body, tuned, origin='average', include=include)  # adarank_cart's origin
    mesh = train.make_mesh(model=4)
    one_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
    out = {'rows': [row.__dict__ for row in rows], 'real': []}
    for dtype, rank in (('float32', None), ('bfloat16', None), ('float32', int(rows[2].option.split()[0][5:]))):
      factors = decomposition.decompose(tau, tree_util.select(tau, config.merge.decompose), rank=rank,
                                        dtype=loading.DTYPES[dtype])
      placed = train.place_frozen((origin, factors), mesh, factor_placement='fsdp')
      state = train.init_state(factors, optimizer=train.make_optimizer(1e-3), num_tasks=3,
                               initial_rank_ratio=0.01, prior=1.3)
      heads = sum(shape.hidden_size * c * 4 for c in (2, 2, 3))
      out['real'].append(dict(weights=one_device(placed[0]) + heads, factors=one_device(placed[1]),
                              state=sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))))
    print(json.dumps(out))
""")


def test_planned_bytes_per_device_equal_the_placed_arrays(model_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(model_dir)], env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  rows, real = out["rows"], out["real"]
  assert [r["option"] for r in rows] == ["as configured", "factor_dtype=bfloat16", "rank=5 (top-16% window)"]
  for row, placed in zip(rows, real):
    assert {k: row[k] for k in placed} == placed, row["option"]
  assert real[1]["factors"] < real[0]["factors"] and real[2]["factors"] < real[0]["factors"]


def test_a_run_that_would_not_fit_stops_with_the_plan_and_the_option_that_fits(model_dir):
  config = _config(model_dir)
  rows = plan.plan(config, devices=8, device_memory=1e9, compile=False)
  between = (rows[0].total + rows[1].total) / 2  # bf16 factors fit, float32 ones do not
  plan.check(config, devices=8, device_memory=rows[0].total)  # exactly enough: no error
  with pytest.raises(plan.DoesNotFit) as error:
    plan.check(config, devices=8, device_memory=between)
  message = str(error.value)
  assert str(model_dir) in message and "--config.adarank.factor_dtype=bfloat16 would fit" in message
  assert "| as configured |" in message and "| no |" in message


def test_dry_run_plans_eight_devices_on_one_and_writes_nothing(model_dir, tmp_path):
  workdir = tmp_path / "run"
  args = [
    sys.executable,
    "-m",
    "adarank_jax.main",
    "--config",
    str(ROOT / "configs/qwen2_glue.py"),
    f"--workdir={workdir}",
    "--dry_run",
    "--plan_devices=8",
    "--plan_device_memory_gb=80",
    f"--config.model.pretrained={model_dir}",
    f"--config.model.finetuned={tmp_path / '{task}'}",
    f"--config.tasks={TASKS!r}",
    "--config.mesh.factor_placement=fsdp",
    "--config.data.max_length=16",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
    args, cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "compiling for 8 forced CPU devices" in result.stdout
  assert "| option (8 devices of 80 GB) |" in result.stdout and "fits as configured" in result.stdout
  rows = [
    line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "GB" not in line
  ]
  assert [r[0] for r in rows] == ["| as configured", "| factor_dtype=bfloat16", "| rank=5 (top-16% window)"]
  assert all(float(r[4]) > 0 for r in rows)  # the compiled step's activations, in GB
  assert not workdir.exists()
