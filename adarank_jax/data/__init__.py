"""Data: the task registry (tfds builders, splits, class names, templates), CLIP preprocessing, fixed-shape
padded batches with prefetching, and GLUE tokenization. Modules are imported explicitly, e.g.
`from adarank_jax.data import registry`; importing this package imports nothing heavy.
"""
