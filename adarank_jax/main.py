"""AdaRank command line.

python -m adarank_jax.main --config configs/vitl14_t14.py --workdir runs/l14_t14 \
    --config.model.pretrained=... --config.model.finetuned='.../{task}/finetuned.pt' --config.data.data_dir=...
python -m adarank_jax.main --config configs/demo.py          # the embedded digits benchmark
python -m adarank_jax.main --config configs/llama_glue.py --dry_run --plan_devices=8 --plan_device_memory_gb=80 \
    --config.model.pretrained=configs/shapes/llama3_8b --config.mesh.factor_placement=fsdp   # memory plan
"""

import logging as std_logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from adarank_jax.experiment import validate
from adarank_jax.storage import files

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py[:args]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "", "Output directory; default runs/<config.name>.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its last checkpoint.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete what --workdir holds and start over.")
_EXPORT = flags.DEFINE_enum(
  "export",
  None,
  ["", "safetensors", "pt", "hf"],
  "Also write each merged model: OpenCLIP state dict (clip) or HF directory; "
  "default: config.export; --export= writes none.",
)
_VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  "Print the detail too (or set ADARANK_VERBOSE=1): an error's traceback, each warning's source line, "
  "adarank_jax's DEBUG log (a corrupt checkpoint's full reader errors); without it an error is one "
  "'error: ...' message and a warning one 'warning: ...' line.",
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Print the bytes per device of the training step (weights, factors, state, activations) and whether "
  "it fits, from the config and the pretrained config.json alone (decoders); nothing is loaded or written.",
)
_PLAN_DEVICES = flags.DEFINE_integer(
  "plan_devices",
  0,
  "--dry_run: devices to plan for (0: this host's); more than the host has are "
  "compiled for as forced CPU devices in a child process.",
)
_PLAN_MEMORY = flags.DEFINE_float(
  "plan_device_memory_gb", 0.0, "--dry_run: memory of each device in GB (0: what the first device has free)."
)
# Runs of several processes (config.mesh.multi_host=True, one process per host): where the processes
# meet and who this one is. Left unset, jax.distributed.initialize() detects them on Cloud TPU, SLURM,
# Open MPI and Kubernetes jobs (README: "Several hosts").
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (or $JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config"])
VERBOSE_ENV = "ADARANK_VERBOSE"


def _describe(error: BaseException) -> str:
  """One line for the user: the message, and the path for a file-system error."""
  if isinstance(error, OSError) and error.filename is not None:
    what = error.strerror or str(error)
    return f"{error.filename}: {what}" + (f" (-> {error.filename2})" if error.filename2 else "")
  return str(error) or type(error).__name__


def _verbose() -> bool:
  return _VERBOSE.value or os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  """A warning as one line on stderr: 'warning: <message>' (with the category unless a UserWarning)."""
  del filename, lineno, line
  kind = "" if category is UserWarning else f"{category.__name__}: "
  print(f"warning: {kind}{message}", file=file or sys.stderr)


def main(argv):
  """Runs the experiment; any failure is one `error: ...` block on stderr and exit status 1."""
  try:
    _main(argv)
  except Exception as error:  # pylint: disable=broad-except
    if _verbose():
      traceback.print_exc()
    print(f"error: {_describe(error)}", file=sys.stderr)
    if not _verbose():
      print(f"  (rerun with --verbose or {VERBOSE_ENV}=1 for the traceback)", file=sys.stderr)
    return 1
  return 0


def _main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO; -v 0 shows it again
    logging.set_verbosity(logging.WARNING)
  if _verbose():
    std_logging.getLogger("adarank_jax").setLevel(std_logging.DEBUG)
  else:
    warnings.showwarning = _show_warning
  config = _CONFIG.value
  workdir = Path(_WORKDIR.value or Path("runs") / config.name)
  export = config.export if _EXPORT.value is None else _EXPORT.value
  validate.validate(config, export=export, paths=not _DRY_RUN.value)  # a plan reads config.json alone
  if _DRY_RUN.value:
    _dry_run(config)
    return
  continued = validate.check_workdir(config, workdir, resume=_RESUME.value, overwrite=_OVERWRITE.value)
  # One run per workdir: a second one stops here, naming the holder's pid. The OS drops the lock when
  # this process exits, however it exits.
  # (Multi-host runs share the workdir between their processes: no lock, no temp-file cleanup there.)
  created = not workdir.exists()
  lock = None if config.mesh.multi_host else files.WorkdirLock(workdir).acquire()
  if lock is not None:
    removed = files.remove_stale_temps(workdir)  # what atomic writes of a killed run left behind
    if removed:
      logging.warning("removed %d temporary file(s) of an interrupted run in %s", len(removed), workdir)
    # Again, now that no other run can change the workdir under us.
    continued = validate.check_workdir(config, workdir, resume=_RESUME.value, overwrite=_OVERWRITE.value)
  if config.mesh.multi_host:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only: their collectives
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
  from adarank_jax.experiment import run

  try:
    run.run(config, workdir, continued=continued, overwrite=_OVERWRITE.value, export=export)
  except BaseException:
    if created and lock is not None:  # a run refused before it wrote anything leaves no workdir behind
      files.remove_if_only_lock(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()


FORCE_DEVICES = "--xla_force_host_platform_device_count"


def _dry_run(config) -> None:
  """--dry_run: the memory plan of `experiment.plan`, printed. Planning more devices than this host
  has reruns this command in a child process with that many forced CPU devices (XLA:CPU's memory
  analysis then stands for the accelerators': theirs may differ)."""
  import jax  # pylint: disable=g-import-not-at-top

  from adarank_jax.experiment import plan  # pylint: disable=g-import-not-at-top

  devices = _PLAN_DEVICES.value or jax.device_count()
  if devices > jax.device_count():
    if FORCE_DEVICES in os.environ.get("XLA_FLAGS", ""):
      raise ValueError(f"--plan_devices={devices}: only {jax.device_count()} devices, forced ones included")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{FORCE_DEVICES}={devices}"}
    print(f"planning {devices} devices on {jax.device_count()}: compiling for {devices} forced CPU devices")
    child = subprocess.run([sys.executable, "-m", "adarank_jax.main", *sys.argv[1:]], env=env, check=False)
    if child.returncode:
      raise RuntimeError(f"the dry run for {devices} forced CPU devices failed (exit {child.returncode})")
    return
  memory = _PLAN_MEMORY.value * 1e9 or plan.device_memory()
  if memory is None:
    raise ValueError("--plan_device_memory_gb: this device does not report its memory; give it")
  print(
    f"model {config.model.pretrained}; {len(config.tasks)} tasks; method {plan.planned_method(config).name}"
  )
  print(
    f"mesh.factor_placement={config.mesh.factor_placement}; batch {config.adarank.batch_size_per_task} "
    f"x {config.data.max_length} tokens per task"
  )
  rows = plan.plan(config, devices=devices, device_memory=memory)
  print(plan.table(rows, devices=devices, device_memory=memory))
  print("fits as configured" if rows[0].total <= memory else "does not fit as configured")


if __name__ == "__main__":
  app.run(main)
