"""PEFT LoRA adapters as the fine-tuned inputs of generative merging, against PEFT's own merge_and_unload.

A tiny random Qwen2ForCausalLM and two adapters of it written by PEFT (get_peft_model + save_pretrained,
lora_B set non-zero; one rsLoRA of another rank). In process: the run's inputs for AdaRank on TA are the
exact factors of rank r (never a dense task vector), and at AdaRank's initial state (every component
on, TA's coefficient) the merged weights are W + lambda * sum_t (W_t - W), W_t PEFT's merge_and_unload.
On the command line: merge (TA), adapt (AdaRank on TA), evaluate and export; the TA export equals that
reference and the AdaRank export scores under transformers as the JAX model does. Bad adapter
directories stop the run at validation, naming the file and key.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import peft as peft_lib
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from adarank_jax.core import decomposition, lora, merging, train, tree_util
from adarank_jax.experiment import loading, run, validate
from adarank_jax.interop import hf, peft, safetensors_dir
from adarank_jax.models import decoder, functional
from configs import qwen2_generative
from tests import prompt_files, tiny_decoder

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 10
PROMPTS = {
  "animals": ["the cat sat on a mat", "a big dog ran far away", "the red cat ran", "a dog sat"],
  "numbers": ["one two three four", "two three", "four three two one one two", "one one two"],
}
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
ADAPTERS = {  # task -> LoraConfig fields
  "animals": dict(r=4, lora_alpha=8.0, use_rslora=False),
  "numbers": dict(r=2, lora_alpha=4.0, use_rslora=True),
}


def _load(directory):
  return {
    k: v
    for f in sorted(Path(directory).glob("*.safetensors"))
    for k, v in safetensors.numpy.load_file(f).items()
  }


def _inputs(root):
  """root/pretrained (sharded Qwen2ForCausalLM + tokenizer), root/adapters/<task> (PEFT), root/prompts/;
  returns (tokenizer, the base weights, each adapter's merge_and_unload weights), float64 numpy."""
  tokenizer, model = tiny_decoder.pretrained_causal_lm(root / "pretrained")
  merged = []
  for seed, (task, fields) in enumerate(ADAPTERS.items(), start=1):
    torch.manual_seed(seed)
    tuned = peft_lib.get_peft_model(
      copy.deepcopy(model), peft_lib.LoraConfig(**fields, target_modules=TARGETS, lora_dropout=0.0)
    )
    with torch.no_grad():
      for name, parameter in tuned.named_parameters():
        if "lora_B" in name:
          parameter.normal_(std=0.2)
    tuned.save_pretrained(root / "adapters" / task)
    merged.append({k: v.detach().double().numpy() for k, v in tuned.merge_and_unload().state_dict().items()})
  for task, prompts in PROMPTS.items():
    prompt_files.write_txt(root / "prompts" / f"{task}.txt", prompts)
  base = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
  return tokenizer, base, merged


def _reference(base, merged, scaling):
  """Task Arithmetic of the adapters by PEFT: W + scaling * sum_t (merge_and_unload_t - W)."""
  return {k: base[k] + scaling * sum(m[k] - base[k] for m in merged) for k in base}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  return root, *_inputs(root)


def _config(root):
  config = qwen2_generative.get_config("quick=true")
  config.tasks = tuple(PROMPTS)
  config.model.pretrained = str(root / "pretrained")
  config.model.finetuned = str(root / "adapters" / "{task}")
  config.data.prompts = str(root / "prompts" / "{task}.txt")
  config.data.max_length = MAX_LENGTH
  return config


def test_adarank_ta_reads_the_exact_factors_and_starts_at_peft_task_arithmetic(inputs):
  root, _, base, merged = inputs
  config = _config(root)
  config.methods = ("individual", "adarank_ta")
  validate.validate(config)
  setup = loading.load_causal_lm(
    pretrained=config.model.pretrained,
    finetuned=[str(root / "adapters" / t) for t in PROMPTS],
    tasks=tuple(PROMPTS),
    dtype="float32",
  )
  assert isinstance(setup.finetuned, lora.Adapted)
  made = run._Inputs(config, setup, {})
  individual = made.take(0)[0]
  for t, reference in enumerate(merged):  # each fine-tuned tree is PEFT's merge_and_unload
    flat = tree_util.flatten(individual[t])
    np.testing.assert_allclose(
      flat["model/layers/1/self_attn/o_proj/kernel"].T,
      reference["model.layers.1.self_attn.o_proj.weight"],
      atol=1e-6,
    )
  origin, factors = made.take(1)
  flat = tree_util.flatten(factors)
  kernels = [p for p in tree_util.flatten(setup.merged) if any(p.endswith(f"/{t}/kernel") for t in TARGETS)]
  assert sorted(flat) == sorted(kernels)  # the targeted kernels only: the others keep their origin
  assert all(decomposition.is_svd(f) and f.s.shape == (2, 4) for f in flat.values())  # rank r, padded
  hp = config.adarank.ta
  assert hp.initial_rank_ratio == 1.0 and hp.prior == config.merge.task_arithmetic.scaling
  state = train.init_state(
    factors,
    optimizer=train.make_optimizer(hp.learning_rate),
    num_tasks=2,
    initial_rank_ratio=1.0,
    prior=hp.prior,
  )
  params = merging.merge(
    origin,
    factors,
    state.mask_logits,
    state.coefficients,
    temperature=config.adarank.mask_temperature,
    mask_mode="hard",
  )
  expected = _reference(base, merged, hp.prior)
  for key, (path, _) in hf.linear_kernels(safetensors_dir.open_dir(root / "pretrained").config).items():
    np.testing.assert_allclose(
      np.asarray(tree_util.flatten(params)[path]).T, expected[key], atol=1e-5, err_msg=key
    )


def test_cli_merges_adapts_evaluates_and_exports_adapters(inputs):
  root, tokenizer, base, merged = inputs
  workdir = root / "work"
  args = [
    sys.executable,
    "-m",
    "adarank_jax.main",
    "--config",
    str(ROOT / "configs/qwen2_generative.py") + ":quick=true",
    f"--workdir={workdir}",
    f"--config.model.pretrained={root / 'pretrained'}",
    f"--config.model.finetuned={root / 'adapters' / '{task}'}",
    f"--config.tasks={tuple(PROMPTS)!r}",
    f"--config.data.prompts={root / 'prompts' / '{task}.txt'}",
    f"--config.data.max_length={MAX_LENGTH}",
    "--config.methods=('task_arithmetic','adarank_ta')",
    "--config.adarank.layout=config",
    "--export=hf",
  ]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  }
  done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["methods"]) == {"task_arithmetic", "adarank_ta"}
  assert all(np.isfinite(v) for scores in results["methods"].values() for v in scores.values())
  losses = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len([r for r in losses if "adarank_ta/loss" in r]) == 4  # adapted for quick's 4 steps
  exported = _load(workdir / "export" / "task_arithmetic")
  expected = _reference(base, merged, qwen2_generative.get_config().merge.task_arithmetic.scaling)
  for key, value in expected.items():  # the targeted kernels merged; everything else the pretrained tensor
    np.testing.assert_allclose(exported[key], value, rtol=0, atol=1e-5, err_msg=key)
  assert not np.allclose(
    exported["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
  )
  directory = workdir / "export" / "adarank_ta"
  inputs = tokenizer(
    PROMPTS["animals"], max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
  )
  with torch.no_grad():
    want = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()(**inputs).logits.numpy()
  config, tree = safetensors_dir.load(directory)
  graphdef, _ = functional.split(nnx.eval_shape(lambda: decoder.build(config, rngs=nnx.Rngs(0))))
  got = jax.jit(lambda p, i, m: functional.call(graphdef, p, i, m))(
    tree, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
  )
  mask = inputs["attention_mask"].numpy().astype(bool)
  np.testing.assert_allclose(np.asarray(got)[mask], want[mask], rtol=1e-5, atol=1e-5 * np.abs(want).max())
  for key in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):  # targeted by no adapter
    np.testing.assert_array_equal(_load(directory)[key], base[key].astype(np.float32), err_msg=key)


def _broken(root, tmp_path, task, edit):
  """A copy of the adapter directories with task's edited by `edit(directory)`."""
  adapters = tmp_path / "adapters"
  for t in PROMPTS:
    (adapters / t).mkdir(parents=True)
    for f in (peft.ADAPTER_CONFIG, peft.ADAPTER_WEIGHTS):
      (adapters / t / f).write_bytes((root / "adapters" / t / f).read_bytes())
  edit(adapters / task)
  return adapters


def _rewrite(directory, change):
  state = safetensors.numpy.load_file(directory / peft.ADAPTER_WEIGHTS)
  safetensors.numpy.save_file(change(state), directory / peft.ADAPTER_WEIGHTS)


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda d: (d / peft.ADAPTER_WEIGHTS).unlink(), r"numbers/adapter_model\.safetensors: missing"),
    (  # an adapter of a wider model
      lambda d: _rewrite(
        d,
        lambda s: {
          k: np.zeros((v.shape[0], 2 * v.shape[1]), v.dtype) if "lora_A" in k else v for k, v in s.items()
        },
      ),
      r"numbers/adapter_model\.safetensors: .*base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: shape \(2, 32\), expected \(r, n_in\) = \(2, 16\)",
    ),
    (  # a module the base lacks
      lambda d: _rewrite(
        d,
        lambda s: {
          **s,
          "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": s[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
          ],
        },
      ),
      r"base_model\.model\.model\.layers\.7\.self_attn\.q_proj\.lora_A\.weight: model\.layers\.7\.self_attn\.q_proj is not a Linear layer of Qwen2ForCausalLM",
    ),
    (  # PEFT's use_dora
      lambda d: (d / peft.ADAPTER_CONFIG).write_text(
        json.dumps({**json.loads((d / peft.ADAPTER_CONFIG).read_text()), "use_dora": True})
      ),
      r"numbers/adapter_config\.json: unsupported adapter: use_dora=True",
    ),
    (  # a full model beside an adapter
      lambda d: [f.unlink() for f in list(d.iterdir())] and (d / "config.json").write_text("{}"),
      r"2 fine-tuned .*|1 full models",
    ),
  ],
)
def test_bad_adapter_directories_stop_the_run_at_validation(inputs, tmp_path, edit, match):
  root = inputs[0]
  config = _config(root)
  config.model.finetuned = str(_broken(root, tmp_path, "numbers", edit) / "{task}")
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate(config)


def test_classification_configs_refuse_adapters_naming_modules_to_save(inputs, tmp_path):
  root = inputs[0]
  edit = lambda d: (d / peft.ADAPTER_CONFIG).write_text(
    json.dumps({**json.loads((d / peft.ADAPTER_CONFIG).read_text()), "modules_to_save": ["score"]})
  )
  config = _config(root)
  config.task_type = "classification"
  config.model.finetuned = str(_broken(root, tmp_path, "numbers", edit) / "{task}")
  with pytest.raises(validate.ConfigError) as error:
    validate.validate(config)
  message = str(error.value)
  assert (
    "are PEFT adapter directories; decoder classification merging needs each task's full fine-tuned model"
    in message
  )
  assert (
    "merge_and_unload" in message
    and "numbers/adapter_config.json: unsupported adapter: modules_to_save=['score']" in message
  )
