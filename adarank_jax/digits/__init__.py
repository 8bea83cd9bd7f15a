"""An embedded merging benchmark: eight tasks made from scikit-learn's 8x8 digits, a tiny CLIP
pretrained on them and one fine-tuned model per task, written as OpenCLIP checkpoints.

  from adarank_jax.digits import testbed
  bed = testbed.build(cache_dir)     # trains once (~50 s on 2 cores), then cached
  bed.model_config, bed.pretrained, bed.finetuned_paths, bed.tasks

The tasks are data sets like any other (`adarank_jax/data/digits.py`, built-in registry entries);
`testbed` trains and caches the checkpoints.
"""
