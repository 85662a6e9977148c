"""Test setup: fully offline, before any Hugging Face library is imported."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)

# The tiny test models gain nothing from a thread pool, which stalls badly when the machine is busy.
torch.set_num_threads(1)
