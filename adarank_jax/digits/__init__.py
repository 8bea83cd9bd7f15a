"""An embedded merging benchmark: eight tasks made from scikit-learn's 8x8 digits, a tiny CLIP
pretrained on them and one fine-tuned model per task, written as OpenCLIP checkpoints.

  from adarank_jax.digits import testbed
  bed = testbed.build(cache_dir)     # registers the tasks; trains once (~100 s on 2 cores), then cached
  bed.model_config, bed.pretrained, bed.finetuned_paths, bed.tasks

`tasks` defines and registers the tasks; `testbed` trains and caches the checkpoints.
"""
