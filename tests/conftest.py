"""Test setup: fully offline, before any Hugging Face library is imported."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment above)

# The tiny test models gain nothing from a thread pool, which stalls badly when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def icd_home(tmp_path_factory):
    """A fresh icd cache (ICD_HOME) per test module; the tiny models get built into it once."""
    home = tmp_path_factory.mktemp("icd-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICD_HOME", str(home))
        yield home
