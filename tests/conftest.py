"""Test setup: fully offline, before any Hugging Face library is imported."""

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny test models gain nothing from a thread pool, which stalls badly when the machine is busy: one thread
# for torch here (read when it loads) and in every session (icd.models.threads) and `icd` process the tests start.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from fixtures.downloads import Server  # noqa: E402
from fixtures.tiny import TINY_KINDS, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny test models (`tiny`, `tiny-sdxl`), built once per test run."""
    root = tmp_path_factory.mktemp("tiny-models")
    for name, kind in TINY_KINDS.items():
        build_tiny_model(root / name, kind=kind)
    return root


@pytest.fixture(scope="module")
def icd_home(tmp_path_factory, tiny_models):
    """A fresh icd cache (ICD_HOME) per test module, holding the tiny models, so `--model tiny` finds them."""
    home = tmp_path_factory.mktemp("icd-home")
    shutil.copytree(tiny_models, home / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICD_HOME", str(home))
        yield home


@pytest.fixture
def server():
    """A loopback file server for download tests."""
    server = Server()
    yield server
    server.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty icd cache with downloads allowed (they only ever reach the loopback server)."""
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "icd"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "icd"
