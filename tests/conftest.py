"""Test-wide settings: offline hubs, and a fixed small thread count so the 2-core CI machine is not oversubscribed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
