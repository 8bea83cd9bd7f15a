"""AdaRank command line.

python -m adarank_jax.main --config configs/vitl14_t14.py --workdir runs/l14_t14 \
    --config.model.pretrained=... --config.model.finetuned='.../{task}/finetuned.pt' --config.data.data_dir=...
python -m adarank_jax.main --config configs/demo.py          # the embedded digits benchmark
"""

from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from adarank_jax import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "Output directory; default runs/<config.name>.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its last checkpoint.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete what --workdir holds and start over.")
_EXPORT = flags.DEFINE_enum("export", None, ["", "safetensors", "pt", "hf"],
                            "Also write each merged model: OpenCLIP state dict (clip) or HF directory; "
                            "default: config.export; --export= writes none.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO; -v 0 shows it again
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = Path(_WORKDIR.value or Path("runs") / config.name)
  if config.testbed.name == "digits":  # the embedded demo: build (or reuse) its checkpoints first
    from adarank_jax.digits import testbed  # pylint: disable=g-import-not-at-top
    testbed.build(testbed.default_cache_dir(), quick=config.testbed.quick, seed=config.testbed.seed)
  export = config.export if _EXPORT.value is None else _EXPORT.value
  validate.validate(config, export=export)
  continued = validate.check_workdir(config, workdir, resume=_RESUME.value, overwrite=_OVERWRITE.value)
  if config.mesh.multi_host:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  from adarank_jax import run  # pylint: disable=g-import-not-at-top  (heavy imports after validation)
  run.run(config, workdir, continued=continued, overwrite=_OVERWRITE.value, export=export)


if __name__ == "__main__":
  app.run(main)
