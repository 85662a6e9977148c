"""The prepared GPU run (bench/gpu/measure.py) works against the current code: its --dry-run runs every stage
on the CPU with the tiny models and writes the JSON the GPU run will write (one record per stage, the imports,
the rows' fields, the floors and targets, the checks of captured against eager results); its deadline skips
what does not fit and stops what runs over; a failed import lands in the JSON; and bench/gpu/table.py turns
that JSON into BENCHMARKS.md's table."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu.measure import EXIT_DEADLINE, EXIT_PREFLIGHT, REQUIRED, plan
from bench.gpu.stages import without_capture
from bench.gpu.table import render
from icd.app.session import Session
from icd_export.engines import TorchEngine
from icd_export.graphs import LoopGraphs

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "measure.py"
ROW_KEYS = {"stage", "model", "size", "name", "label", "dtype", "device", "mode", "session_captures_loops", "ms",
            "gflop", "floor_ms", "ratio", "target_ms", "met"}
STAGES = [stage.name for stage in plan(("fp32", "bf16"))]


def dry_run(home: Path, out: Path, *options: str, env: dict | None = None):
    """The script in a new process, as the GPU machine runs it; (process, its seconds, the JSON)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *options],
                          env={**os.environ, "ICD_HOME": str(home), **(env or {})}, capture_output=True, text=True,
                          timeout=900)
    return done, time.monotonic() - started, json.loads((out / "gpu.json").read_text())


@pytest.fixture(scope="module")
def full_run(icd_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    done, _, data = dry_run(icd_home, out)
    return done, data, out


def test_every_stage_runs_once_and_is_recorded(full_run):
    done, data, out = full_run
    assert done.returncode == 0, done.stdout[-3000:]
    assert list(data["stages"]) == STAGES  # one record per stage, in the plan's order
    failed = {name: stage.get("error") for name, stage in data["stages"].items() if stage["status"] != "ok"}
    assert failed == {}
    assert data["mode"] == "dry-run" and data["stopped"] is None and data["wall_s"] < data["deadline_s"]
    assert set(REQUIRED) <= set(data["imports"]) and "not importable" not in data["imports"]["diffusers"]
    assert {"python", "torch", "diffusers", "transformers", "device"} <= set(data["env"])
    assert set(data["load_s"]) == {"sd15-fp32", "sdxl-fp32", "sdxl-bf16", "sd15-bf16"}
    for name in ("pytest-fp32", "pytest-bf16"):
        assert data["stages"][name]["rc"] == 0 and "1 passed" in data["stages"][name]["summary"]
    assert data["profile"]["of"]["name"] in ("photo_edit_p2p", "invert", "photo_edit_swap")
    assert "Name" in data["profile"]["table"] and (out / "profile-trace.json.gz").stat().st_size > 0
    assert set(data["vae_precision"]) == {"sd15-fp32-cpu", "sdxl-fp32-cpu", "sdxl-bf16-cpu"}  # those open then
    assert data["vae_precision"]["sdxl-fp32-cpu"]["max_levels"] == 0  # an fp32 VAE is its own reference
    assert data["vae_precision"]["sdxl-bf16-cpu"]["vae_dtype"] == "bfloat16"


def test_rows_carry_floors_targets_and_checks(full_run):
    _, data, _ = full_run
    timed = [row for row in data["rows"] if "ms" in row]
    assert timed and all(ROW_KEYS <= set(row) and row["stage"] in STAGES for row in timed)
    assert {row["mode"] for row in timed} == {"eager", "captured", "compile+captured", "process"}
    for row in timed:
        if row["mode"] != "process":  # every computation's FLOPs were counted in eager mode
            assert row["gflop"] > 0 and row["ratio"] == pytest.approx(row["ms"] / row["floor_ms"], rel=1e-2)
    # eager rows ran on sessions without loop capture; captured rows on the product's
    assert {row["session_captures_loops"] for row in timed if row["mode"] == "eager"} == {False}
    assert {row["session_captures_loops"] for row in timed if row["name"] in ("invert", "photo_edit_p2p")
            and row["mode"] in ("captured", "compile+captured")} == {True}
    assert all(opened["eager_session_captures_loops"] is False for opened in data["opened"].values())
    checked = [row for row in timed if row["name"].startswith(("invert", "photo_edit_"))]
    assert checked and all(row["finite"] for row in checked)
    for row in checked:
        if row["mode"] == "eager":
            assert "max_abs_diff_vs_eager" not in row
        else:  # the replay (Rerun on the CPU) of every captured edit equals the eager one
            assert row["max_abs_diff_vs_eager"] < 1e-4 and row["diff_of"] in ("x_T", "edited pixels in [-1, 1]")
    p2p = next(row for row in timed if (row["model"], row["name"], row["mode"]) == ("sd15", "photo_edit_p2p", "eager"))
    assert p2p["target_ms"] == 60.0 and p2p["met"] == (p2p["ms"] <= 60.0)
    assert {(row["model"], row["name"]) for row in timed if row["target_ms"]} == {
        ("sd15", "photo_edit_p2p"), ("sd15", "invert"), ("sdxl", "photo_edit_swap"), ("sd15", "cold_start_fused")}
    assert {(row["dtype"], row["mode"]) for row in timed if row["stage"] == "sdxl-bf16-swap"} == {
        ("bf16", "eager"), ("bf16", "captured")}
    launches = {row["name"]: row["count"] for row in data["rows"] if "count" in row}
    assert launches["launches_unet_p2p_b2"] > launches["launches_unet_reverse_b2"] > 0  # P2P adds work


def test_eager_sessions_never_capture():
    graphs = LoopGraphs("cpu")
    opened = Session(model=object(), engine=TorchEngine(unets={"forward": "unet"}), graphs=graphs)
    eager = without_capture(opened)
    assert eager.graphs is None and eager.engine is opened.engine and eager.model is opened.model


def test_table_has_a_line_per_timed_row(full_run):
    _, data, _ = full_run
    text = render(data)
    lines = text.splitlines()
    assert "| stage | dtype | mode | ms | floor ms | ratio to floor | target | met? | max diff vs eager |" in lines
    timed = [row for row in data["rows"] if "ms" in row]
    body = [line for line in lines if line.startswith(("| sd15 ", "| sdxl ")) and line.count("|") == 10]
    assert len(body) == len(timed)
    assert any("| 60 ms | yes |" in line or "| 60 ms | no (+" in line for line in body)
    assert lines[0].startswith("dry-run run on cpu")


def test_a_deadline_too_short_skips_every_stage(icd_home, tmp_path):
    done, _, data = dry_run(icd_home, tmp_path, "--deadline", "0.5")
    assert done.returncode == 0
    assert {stage["status"] for stage in data["stages"].values()} == {"skipped"}
    assert all(stage["reason"].startswith("deadline: ") for stage in data["stages"].values())
    assert data["rows"] == []


def test_a_missing_library_fails_the_preflight_into_the_json(icd_home, tmp_path):
    # a folder first on the path whose `diffusers` raises on import, as a broken or missing wheel does
    (tmp_path / "broken" / "diffusers").mkdir(parents=True)
    (tmp_path / "broken" / "diffusers" / "__init__.py").write_text("raise ImportError('no wheel for diffusers')\n")
    done, _, data = dry_run(icd_home, tmp_path / "out", env={"PYTHONPATH": str(tmp_path / "broken")})
    assert done.returncode == EXIT_PREFLIGHT
    assert data["stages"]["preflight"]["status"] == "failed"
    assert data["stages"]["preflight"]["error"] == "ImportError: cannot import diffusers (the JSON's imports say why)"
    assert data["imports"]["diffusers"] == "not importable: ImportError: no wheel for diffusers"
    assert data["imports"]["torch"].startswith("2.")
    rest = [stage for name, stage in data["stages"].items() if name != "preflight"]
    assert rest and all(stage == {"status": "skipped", "reason": "the preflight failed: nothing else can run"}
                        for stage in rest)


def test_the_watchdog_stops_a_stage_that_runs_past_the_deadline(icd_home, tmp_path):
    stages = ["build-models", "sd15-fp32-load", "sd15-fp32-targets"]
    # 2 s: the preflight's imports and opening the tiny model take longer, so a stage is always running then
    done, seconds, data = dry_run(icd_home, tmp_path, "--deadline", "2", "--repeats", "200", "--only", *stages)
    assert done.returncode == EXIT_DEADLINE and "deadline of 2 s reached: stopped" in done.stdout
    assert data["stopped"] == "deadline" and 2 <= data["wall_s"] < 3.5
    statuses = [data["stages"][name]["status"] for name in STAGES]
    assert statuses.count("stopped") == 1 and "running" not in statuses and "pending" not in statuses
    assert statuses[STAGES.index("sd15-fp32-targets")] in ("stopped", "skipped")
    assert data["stages"]["env"] == {"status": "skipped", "reason": "not in --only"}
