"""A command served by `icd serve` never imports torch, diffusers or transformers: a client's start-up is what a
shell loop pays per call (bench/shell_loop.py), and torch alone is most of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icd import editing
from icd.core.sampling import guidance_schedule
from icd.models.hub import resolve_model
from tests.fixtures.cli import icd
from tests.test_serve import EDIT, TINY, Served, _env, photo

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "safetensors.torch", "icd.pipeline", "icd.p2p",
                   "icd.models.loading")
# Runs `icd ARGS` as `python -m icd` does, then reports the exit code and which model libraries it imported.
PROBE = """
import json, runpy, sys
libraries = json.loads(sys.argv[2])
sys.argv = ["icd", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("icd", run_name="__main__")
except SystemExit as end:
    code = end.code
print(json.dumps({"code": code, "imported": [name for name in libraries if name in sys.modules]}))
"""


def run_probe(cwd: Path, *args: str) -> dict:
    """`icd ARGS` in a fresh process: its exit code, the model libraries it imported and its stderr."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(map(str, args))), json.dumps(MODEL_LIBRARIES)],
                          cwd=cwd, env=_env(), text=True, capture_output=True, timeout=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {**report, "stderr": done.stderr}


@pytest.fixture(scope="module")
def serving(icd_home):
    started = Served()
    yield started
    started.close()


def test_served_commands_import_no_model_library(serving, tmp_path):
    source = photo(tmp_path / "a.png")
    commands = {"edit": ("edit", source, *EDIT, "-o", "edited.png"),
                "invert": ("invert", source, "--prompt", "a red cat", "-o", "a.latent.safetensors", *TINY),
                "reconstruct": ("reconstruct", "a.latent.safetensors", "-o", "recon.png", *TINY),
                "edit a latent": ("edit", "a.latent.safetensors", "--tgt", "a blue cat", "--method", "none", *TINY,
                                  "-o", "from-latent.png"),
                "generate": ("generate", "a red cat", "--seed", "3", "-o", "made.png", *TINY)}
    for name, args in commands.items():
        report = run_probe(tmp_path, *args)
        assert report["code"] == 0, (name, report["stderr"])
        assert f"icd: info: using the server at {serving.path}" in report["stderr"], name
        assert report["imported"] == [], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.latent.safetensors", "a.png", "edited.png",
                                                          "from-latent.png", "made.png", "recon.png"]


def test_a_device_left_to_the_server_is_still_checked(serving, tmp_path):
    """With a server's socket present the client skips its own device check (it takes torch): a device that
    the server cannot take makes the client open the model here, where the check refuses it before loading."""
    source = photo(tmp_path / "a.png")
    result = icd("edit", source, "--src", "a red cat", "--tgt", "a blue cat", "-m", "tiny", "--device", "cuda:7",
                 cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith("icd: error: --device cuda:7: ") and len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_the_probe_sees_torch_where_a_command_imports_it(icd_home, tmp_path):
    report = run_probe(tmp_path, "info")
    assert report["code"] == 0, report["stderr"]
    assert "torch" in report["imported"]


@pytest.mark.parametrize("model", ["mini", "tiny"])
def test_recorded_guidance_steps_follow_the_core_schedule(icd_home, model):
    manifest = resolve_model(model)
    for guidance, tau in ((19.0, 0.8), (2.0, 0.0), (7.0, 1.0), (4.0, 0.52), (0.0, 0.5)):
        expected = [(jump.t, w) for jump, w in guidance_schedule(manifest.reverse_timesteps, guidance, tau)]
        assert editing.guidance_on_steps(manifest, guidance, tau) == expected
