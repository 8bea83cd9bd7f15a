"""Every config field, its default and its meaning; experiment files only change values.

Library code never reads a ConfigDict: only adarank_jax/main.py and adarank_jax/experiment/ do, and they pass
explicit arguments on. Config files import no library module: they are plain values. Hyperparameters per experiment are the table of docs/algorithm.md, section 3.
"""

import ml_collections

# The papers' task lists (names of adarank_jax.data.registry; the registry checks them at validation).
TASKS_8 = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")
TASKS_14 = TASKS_8 + ("CIFAR100", "STL10", "Flowers102", "OxfordIIITPet", "PCAM", "FER2013")
TASKS_20 = TASKS_14 + ("EMNIST", "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "KMNIST")
GLUE_7 = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")
# The embedded demo's tasks (adarank_jax/data/digits.py, built in memory from scikit-learn's digits).
DIGITS_8 = (
  "Digits",
  "DigitsRotated",
  "DigitsMirrored",
  "DigitsInverted",
  "DigitsNoisy",
  "DigitsParity",
  "DigitsMagnitude",
  "DigitsMod3",
)

# The official code's SVD rule per architecture: which matrices are decomposed and masked. Paths are
# those of the merged tree (the image tower for CLIP, the whole model minus heads for the LMs).
DECOMPOSE = {
  "clip": (
    r"transformer/resblocks/\d+/attn/(in_proj|out_proj)/kernel",
    r"transformer/resblocks/\d+/mlp/(c_fc|c_proj)/kernel",
  ),
  # RoBERTa and BERT (body key 'roberta' or 'bert'): every merged weight matrix, i.e. every kernel
  # outside the (unmerged) embeddings. BERT classifiers also keep their pooler in the body.
  "roberta": (
    r"(roberta|bert)/encoder/layer/\d+/attention/self/(query|key|value)/kernel",
    r"(roberta|bert)/encoder/layer/\d+/attention/output/dense/kernel",
    r"(roberta|bert)/encoder/layer/\d+/(intermediate|output)/dense/kernel",
    r"(roberta|bert)/pooler/dense/kernel",
  ),
  "gpt2": (r"transformer/h/\d+/attn/(c_attn|c_proj)/kernel", r"transformer/h/\d+/mlp/(c_fc|c_proj)/kernel"),
  # Llama, Mistral and Qwen2 (our extension; GPT-2's rule carried over): every attention and MLP
  # projection matrix; norms and Qwen2's q/k/v biases are merged dense.
  "decoder": (
    r"model/layers/\d+/self_attn/(q|k|v|o)_proj/kernel",
    r"model/layers/\d+/mlp/(gate|up|down)_proj/kernel",
  ),
}
# What the official code leaves unmerged: it stays at the origin (pretrained for TA, average for CART).
# 'causal_lm': generative merging of decoders (our extension), the token embeddings and the LM head
# kept as the classifiers keep theirs.
UNMERGED = {
  "causal_lm": (r"model/embed_tokens/.*", r"lm_head/.*"),
  "clip": (),
  "roberta": (r"(roberta|bert)/embeddings/.*",),
  "gpt2": (r"transformer/(wte|wpe)/.*",),
  "decoder": (r"model/embed_tokens/.*",),  # as GPT-2's token embeddings
}


BASES = ("ta", "cart", "tsv_m", "iso_cts")  # the base merges AdaRank runs on (methods adarank_<base>)
# What baselines=true runs before AdaRank, in report order: the references, the static merges and
# AdaMerging (names of adarank_jax/experiment/methods.py).
BASELINES = (
  "zero_shot",
  "individual",
  "weight_averaging",
  "task_arithmetic",
  "ties",
  "cart",
  "tsv_m",
  "iso_c",
  "iso_cts",
  "adamerging_task",
  "adamerging_layer",
)


def parse_arg(arg, **defaults):
  """'base=cart,quick=True' -> ConfigDict with the types of `defaults` (big_vision's parse_arg)."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0", ""):
        raise ValueError(f"config argument {key}={value!r}: expected true or false")
      parsed[key] = value.lower() in ("true", "1", "")
    else:
      parsed[key] = type(default)(value)
  return parsed


def base():
  """All fields with defaults. Paths are empty: set them with --config.x=... or flags."""
  config = ml_collections.ConfigDict()
  config.name = ""  # experiment name, shown in reports
  config.architecture = "clip"  # 'clip' | 'roberta' | 'gpt2' | 'decoder' (Llama, Mistral, Qwen2)
  # 'classification' (the paper's: each task's head, the entropy of its class predictions on the
  # task's test split) | 'generative' (our extension: decoder causal LMs merged whole, the mean
  # next-token entropy on each task's prompt file; docs/algorithm.md, "Generative merging")
  config.task_type = "classification"
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "ViT-B-32"  # clip: an open_clip model-config name or a JSON file path
  config.model.pretrained = ""  # pretrained checkpoint: file (.pt/.bin/.safetensors) or HF dir
  config.model.finetuned = ""  # fine-tuned checkpoints, with {task} in the path
  config.model.run_pickled_code = False  # allow checkpoints that pickle whole modules (runs their code)
  config.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'

  config.tasks = TASKS_8  # task names, as in adarank_jax.data.registry
  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ""  # tfds data_dir that holds the prepared data sets
  config.data.tokenizer = ""  # LMs: local tokenizer directory ('' = the pretrained dir)
  config.data.max_length = 128  # LMs: tokens per example (generative: per prompt)
  config.data.prompts = ""  # generative: each task's unlabeled prompts, a .jsonl or .txt path with {task}
  config.data.eval_prompts = ""  # generative: each task's evaluation prompts, a path with {task}
  # ('' = data.prompts, as the paper evaluates on the test split it adapts on)
  config.data.prompt_field = "text"  # generative .jsonl files: the field that holds each prompt
  config.data.workers = 2  # preprocessing threads (per worker process, if any)
  config.data.processes = 0  # worker processes that decode and preprocess (0: threads of the run's
  # own process); a checkpoint's data state holds one entry per worker
  # process, so a run resumes with the same number
  config.cache_dir = ""  # zero-shot heads and other caches ('' = <workdir>/cache)
  config.export = ""  # also write each merged model under <workdir>/export: '' (no),
  # 'safetensors' | 'pt' (clip: OpenCLIP state dict), 'hf' (LMs);
  # the --export flag overrides it

  # A testbed built (once, cached) before the run; the embedded demo uses 'digits'.
  config.testbed = ml_collections.ConfigDict()
  config.testbed.name = ""  # '' (use model.*) | 'digits': the run builds (or reuses) the
  # digits testbed and takes model.name/pretrained/finetuned from it
  config.testbed.quick = False  # the seconds-long schedule (CI)
  config.testbed.seed = 0

  # Methods run in this order, each evaluated on every task: the names of adarank_jax/experiment/methods.py
  # (zero_shot, individual, weight_averaging, task_arithmetic, ties, cart, tsv_m, iso_c, iso_cts,
  # adamerging_task, adamerging_layer, adarank_ta, adarank_cart).
  config.methods = ("individual", "adarank_ta")

  config.merge = ml_collections.ConfigDict()
  config.merge.decompose = DECOMPOSE["clip"]  # regexes of the SVD-decomposed, masked matrices
  config.merge.unmerged = UNMERGED["clip"]  # regexes of tensors kept at the origin
  # Static methods' hyperparameters: config.merge.<method>.<keyword of its adarank_jax.core.baselines
  # function>, with the published defaults.
  config.merge.task_arithmetic = ml_collections.ConfigDict(dict(scaling=0.3))
  # TIES paper: mean of the agreeing entries with lambda 1; FusionBench: merge='sum', scaling=0.3.
  config.merge.ties = ml_collections.ConfigDict(dict(density=0.2, scaling=1.0, merge="mean"))
  config.merge.cart = ml_collections.ConfigDict(dict(scaling=2.0, rank_ratio=0.12))  # CART repo, B/32x8
  # TSV-M: alpha 1.0 (FusionBench); matrices: 'decomposed' (AdaRank repo) or 'all_2d' (FusionBench).
  config.merge.tsv_m = ml_collections.ConfigDict(dict(scaling=1.0, matrices="decomposed"))
  # Iso-C / Iso-CTS: alpha 1.5 (FusionBench, ViT-B/32 x 8), common fraction 0.8 (Iso-CTS code).
  config.merge.iso_c = ml_collections.ConfigDict(dict(scaling=1.5, matrices="decomposed"))
  config.merge.iso_cts = ml_collections.ConfigDict(
    dict(scaling=1.5, common_fraction=0.8, side="out", matrices="decomposed")
  )

  config.adarank = ml_collections.ConfigDict()
  config.adarank.ta = ml_collections.ConfigDict(dict(prior=0.3, initial_rank_ratio=1.0, learning_rate=1e-3))
  config.adarank.cart = ml_collections.ConfigDict(
    dict(prior=2.3, initial_rank_ratio=0.16, learning_rate=1e-3)
  )
  # AdaRank on TSV-M (not in the paper's code; docs/algorithm.md, section 9): all of each task's
  # whitened components on, every coefficient at TSV-M's alpha, so step 0 is static TSV-M.
  config.adarank.tsv_m = ml_collections.ConfigDict(
    dict(prior=1.0, initial_rank_ratio=1.0, learning_rate=1e-3)
  )
  # AdaRank on Iso-CTS (likewise an extension): T + 1 mask rows (the last for the common subspace),
  # all on, every coefficient at Iso-CTS's alpha.
  config.adarank.iso_cts = ml_collections.ConfigDict(
    dict(prior=1.5, initial_rank_ratio=1.0, learning_rate=1e-3)
  )
  config.adarank.mask_temperature = 10.0
  config.adarank.num_steps = 10_000
  config.adarank.batch_size_per_task = 16
  config.adarank.eval_every = 500  # evaluation points (all reported in the log)
  config.adarank.selection = "final"  # 'final' | 'validation' (best average accuracy on labelled
  # validation splits) | 'oracle' (best average TEST accuracy;
  # labelled so)
  config.adarank.factor_dtype = "float32"  # 'float32' | 'bfloat16' storage of U, s, V
  config.adarank.rank = 0  # keep the top-k components only (0 = full rank, as the paper)
  # The step's layout (same math; adarank_jax/core/layout.py, README "Performance"): 'auto' chooses it
  # for the machine at the start of each trained method (cached deltas when they fit in half the free
  # memory; the tower's call size and remat by timing a few steps of each), logs it and stores it in
  # <workdir>/<method>/layout.json, which a resumed run reuses; 'config' takes the three fields below.
  config.adarank.layout = "auto"
  config.adarank.cache_deltas = False  # keep each task's masked delta between steps: less rebuild
  # work, one more float32 matrix per task and decomposed matrix (+2.5 GB at ViT-B/32 x 8)
  config.adarank.tasks_per_forward = 1  # CLIP: the tower (traced once) runs on this many tasks' batches
  # at a time (0 = all at once)
  config.adarank.remat = True  # CLIP: recompute the tower's activations in the backward pass
  config.adarank.log_every = 50
  config.adarank.checkpoint_every = 500
  # Ablations (AdaRank paper, Tables 5-7): what is learned ('both' | 'masks': coefficients frozen at
  # the prior | 'coefficients': masks frozen at their initial state); the window is adarank.rank; the
  # fraction of each task's test split that adaptation draws from (a seeded subset; evaluation always
  # uses the whole split). The data fraction and the loop settings above serve AdaMerging too.
  config.adarank.learn = "both"
  config.adarank.data_fraction = 1.0

  # AdaMerging (Yang et al., 2024; official code): lambda clamped to [0, 1], prior 0.3, Adam lr 1e-3,
  # 500 steps of batch adarank.batch_size_per_task (16 per task in the official runs).
  config.adamerging = ml_collections.ConfigDict(dict(prior=0.3, learning_rate=1e-3, num_steps=500))

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 128
  config.eval.max_examples = 0  # 0 = the whole test split

  config.mesh = ml_collections.ConfigDict()
  # 'replicated' | 'task': shard the factor stacks by task | 'fsdp': shard the origin and the factor
  # stacks over a 'model' axis of model_devices devices (0 = all), the batches over every device
  config.mesh.factor_placement = "replicated"
  config.mesh.model_devices = 0
  config.mesh.multi_host = False  # call jax.distributed.initialize() first
  return config


def quick(config):
  """Shrinks a config to a smoke run of seconds (same code path)."""
  config.adarank.num_steps = 4
  config.adamerging.num_steps = 4
  config.adarank.eval_every = 2
  config.adarank.log_every = 1
  config.adarank.checkpoint_every = 2
  config.adarank.batch_size_per_task = 2
  config.eval.batch_size = 8
  config.eval.max_examples = 16
  return config


def experiment(
  arg,
  *,
  architecture,
  model,
  tasks,
  batch_size,
  num_steps,
  eval_every,
  ta,
  cart,
  cart_static=None,
  eval_batch_size=128,
):
  """A paper experiment from its numbers (docs/algorithm.md, section 3 table).

  Config args: base=ta|cart|tsv_m|iso_cts picks the AdaRank base merge; baselines=true adds the static baselines
  and AdaMerging (task-wise and layer-wise); quick=true shrinks the run to a smoke test.

  Args:
    ta, cart: dict(prior=..., initial_rank_ratio=..., learning_rate=...) of AdaRank on TA / on CART.
    cart_static: dict(scaling=..., rank_ratio=...) of static CART, where the CART repo has a config
      for it.
  """
  arg = parse_arg(arg, base="ta", baselines=False, quick=False)
  if arg.base not in BASES:
    raise ValueError(f"config argument base={arg.base!r}: expected one of {BASES}")
  config = base()
  config.architecture = architecture
  config.model.name = model
  config.tasks = tasks
  config.merge.decompose = DECOMPOSE[architecture]
  config.merge.unmerged = UNMERGED[architecture]
  config.adarank.ta.update(ta)
  config.adarank.cart.update(cart)
  config.adarank.batch_size_per_task = batch_size
  config.adarank.num_steps = num_steps
  config.adarank.eval_every = eval_every
  config.eval.batch_size = eval_batch_size
  if cart_static is not None:
    config.merge.cart.update(cart_static)
  config.methods = ("individual", f"adarank_{arg.base}")
  if arg.baselines:
    config.methods = BASELINES + (f"adarank_{arg.base}",)
  config.name = f"{model}_{len(tasks)}tasks_adarank_{arg.base}"
  if arg.quick:
    quick(config)
  return config


def decoder_experiment(arg, *, model):
  """AdaRank on a Llama, Mistral or Qwen2 sequence classifier over the 7 GLUE tasks (configs/llama_glue.py
  and its siblings). Our extension, with no paper numbers: GPT-2's hyperparameters and rule (DECOMPOSE,
  UNMERGED), unconfirmed for decoders. Config args as for `experiment`."""
  return experiment(
    arg,
    architecture="decoder",
    model=model,
    tasks=GLUE_7,
    batch_size=8,
    num_steps=5_000,
    eval_every=500,
    ta=dict(prior=0.3, initial_rank_ratio=1.0, learning_rate=5e-5),
    cart=dict(prior=1.3, initial_rank_ratio=0.01, learning_rate=5e-5),
    eval_batch_size=64,
  )


def generative_experiment(arg, *, model):
  """AdaRank merging Llama, Mistral or Qwen2 causal LMs whole (configs/qwen2_generative.py and its
  siblings): the objective per task is the mean next-token entropy of the merged model on the task's
  unlabeled prompts (our extension, not the paper's: docs/algorithm.md, "Generative merging"). The
  matrices decomposed are the classifiers' (DECOMPOSE['decoder']), the embeddings and lm_head stay at the
  origin (UNMERGED['causal_lm']); the schedule and learning rates are the decoder classifiers', unconfirmed
  here. No tasks are set: give them (--config.tasks) with their prompt files (--config.data.prompts).
  Config args as for `experiment`."""
  config = decoder_experiment(arg, model=model)
  config.task_type = "generative"
  config.tasks = ()
  config.merge.unmerged = UNMERGED["causal_lm"]
  config.name = config.name.replace(f"{len(GLUE_7)}tasks", "generative")
  return config
