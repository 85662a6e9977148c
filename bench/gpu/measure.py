"""The GPU truth run (issues 13 and 21): the product's speed on one GPU, each number next to its FLOP floor,
captured results checked against eager ones, and the CLI's end-to-end tests on CUDA, in one call of at most
~9.5 minutes. `run.sh` installs the wheels and the project first; bench/gpu/README.md says how to call it.

This file imports nothing outside the standard library, so that its JSON exists whatever the machine lacks:
the first stage, `preflight`, imports torch, the libraries and icd (their versions, or why each failed, land
in the JSON's `imports`) and then bench/gpu/stages.py, which holds every other stage; when it fails the rest
is recorded as skipped. Random-weight SD1.5 (512x512) and SDXL (1024x1024) are built on the machine with the
project's builder and opened through the product's own loading path. Each timed callable runs once (its
output is kept, and checked: finite, and off eager its largest |difference| from the eager output), once
more under torch.utils.flop_counter on the eager session (its FLOPs; floor = FLOPs / the peak rate, 790
TFLOP/s bf16 dense on an H200), then `repeats` times (median, CUDA events; `icd.app.bench.time_ms`). Modes:
eager (a session without loop capture, whatever `open_session` does on CUDA); captured (the product's loop
capture, icd_export.graphs: each loop one CUDA graph over static buffers, VAE and text eager);
compile+captured (UNets compiled by inductor without CUDA graphs, inside loops captured whole); process (a
new `icd edit`).

The stages run most-important-first; the JSON in --out is rewritten after every stage, so a run stopped by
its deadline keeps what finished. A stage that would not fit in the time left is skipped; one still running
at the deadline is cut off by a watchdog (the JSON says which, and the process exits with status 3). Each
stage's failure is caught, its traceback recorded, and the run goes on.

--dry-run runs every stage on the CPU with the tiny test models at 64x64 (the check that this script works
against the current code; tests/test_gpu_script.py runs it). Usage:
    python bench/gpu/measure.py --out DIR [--dry-run] [--deadline 540] [--started EPOCH] [--only STAGE ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench.gpu.stages, and tests.fixtures (the tiny models of --dry-run)

PEAK_TFLOPS = 790.0  # an H200's dense bf16 (and fp16) matmul rate, as measured on one (KINDS.md)
EXIT_DEADLINE = 3
EXIT_PREFLIGHT = 4
# What the stages import: every one must import, or nothing else runs; the optional ones are only recorded.
REQUIRED = ("torch", "numpy", "PIL", "click", "pydantic", "safetensors", "huggingface_hub", "transformers",
            "diffusers", "peft", "icd", "icd_export")
OPTIONAL = ("onnx", "onnxruntime", "tensorrt")


class Results:
    """The run's JSON, rewritten whole (write, then rename) at every change, from the stages and the watchdog."""

    def __init__(self, path: Path, stage_names: list[str], meta: dict):
        self.path, self.lock = path, threading.RLock()
        self.data = {**meta, "stages": {name: {"status": "pending"} for name in stage_names}, "rows": [],
                     "stopped": None}

    def save(self) -> None:
        with self.lock:
            self.data["wall_s"] = round(time.time() - self.data["started"], 2)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.data, indent=1, default=str))
            os.replace(temporary, self.path)

    def stage(self, name: str, **fields) -> None:
        with self.lock:
            self.data["stages"][name].update(fields)
            self.save()

    def add_row(self, row: dict) -> None:
        with self.lock:
            self.data["rows"].append(row)

    def set(self, key: str, value) -> None:
        with self.lock:
            self.data[key] = value
            self.save()

    def note(self, section: str, key: str, value) -> None:
        with self.lock:
            self.data.setdefault(section, {})[key] = value
            self.save()

    def stop_at_deadline(self) -> None:
        """The watchdog's end: the running stage is marked stopped, the rest skipped, and the JSON written."""
        with self.lock:
            for record in self.data["stages"].values():
                if record["status"] == "running":
                    record.update(status="stopped", reason="still running at the deadline")
                elif record["status"] == "pending":
                    record.update(status="skipped", reason="deadline")
            self.data["stopped"] = "deadline"
            self.save()


@dataclass(frozen=True)
class Stage:
    name: str
    work: str  # the function of bench/gpu/stages.py that runs it, called as work(run, name, *args)
    args: tuple = ()
    estimate_s: float = 10.0  # on the GPU: a stage that would not fit in the time left is skipped
    inference: bool = True  # under torch.inference_mode (not for export, which traces)


def plan(dtypes: tuple[str, str]) -> list[Stage]:
    """Every stage, most important first: the imports; the four targets (SD1.5 P2P photo edit and inversion,
    SDXL swap photo edit, cold start) eager and captured in the first dtype; an SDXL swap photo edit in the
    second (bf16: its VAE in bf16, not fp32) and every open VAE against fp32; one SD1.5 compile+captured figure
    (inductor's default mode); the CUDA tests; a second GPU where there is one; the profile of the worst
    target. Then what fits: the other edits, the modules, launches, the second dtype's tests and SD1.5 edits,
    throughput. On an H200 the first fourteen stages are estimated at 455 s of the 540."""
    first, second = dtypes
    return [Stage("preflight", "preflight", estimate_s=15), Stage("env", "env", estimate_s=5),
            Stage("build-models", "build_models", estimate_s=40),
            Stage(f"sd15-{first}-load", "load", ("sd15", first), 20),
            Stage(f"sd15-{first}-targets", "eager_and_captured", ("sd15", first, ("photo_edit_p2p", "invert")), 15),
            Stage("sdxl-model", "sdxl_model", estimate_s=40),
            Stage(f"sdxl-{first}-load", "load", ("sdxl", first), 25),
            Stage(f"sdxl-{first}-targets", "eager_and_captured", ("sdxl", first, ("photo_edit_swap",)), 15),
            Stage("cold-start", "cold_start", estimate_s=25, inference=False),
            Stage(f"sdxl-{second}-load", "load", ("sdxl", second), 25),
            Stage(f"sdxl-{second}-swap", "eager_and_captured", ("sdxl", second, ("photo_edit_swap",)), 15),
            Stage("vae-precision", "vae_precision", estimate_s=5),
            Stage(f"sd15-{first}-compile-captured", "compile_captured",
                  ("sd15", first, ("photo_edit_p2p",), "default"), 120),
            Stage(f"pytest-{first}", "pytest_run", (first,), 90),
            Stage("second-device", "second_device", (first,), 40),
            Stage("profile", "profile_worst", estimate_s=10),
            Stage(f"sd15-{first}-edits", "eager_and_captured", ("sd15", first, ("photo_edit_swap", "photo_edit_none")),
                  10),
            Stage(f"sdxl-{first}-edits", "eager_and_captured",
                  ("sdxl", first, ("invert", "photo_edit_p2p", "photo_edit_none")), 20),
            Stage(f"sd15-{first}-modules", "modules", ("sd15", first), 15),
            Stage(f"sdxl-{first}-modules", "modules", ("sdxl", first), 20),
            Stage(f"sd15-{first}-launches", "launches", ("sd15", first), 8),
            Stage(f"pytest-{second}", "pytest_run", (second,), 90),
            Stage(f"sd15-{second}-load", "load", ("sd15", second), 20),
            Stage(f"sd15-{second}-edits", "eager_and_captured",
                  ("sd15", second, ("photo_edit_p2p", "invert", "photo_edit_swap", "photo_edit_none")), 15),
            Stage(f"sd15-{first}-throughput", "throughput", ("sd15", first), 15)]


def preflight(results: Results):
    """Import what the stages need, recording each module's version or why it failed (the optional ones are
    recorded only), then the stages themselves; returns bench/gpu/stages.py as a module."""
    found, missing = {}, []
    for name in REQUIRED + OPTIONAL:
        try:
            found[name] = str(getattr(importlib.import_module(name), "__version__", "imported"))
        except Exception as err:  # noqa: BLE001  (a broken wheel raises more than ImportError)
            found[name] = f"not importable: {type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            missing += [name] if name in REQUIRED else []
    results.set("imports", found)
    if missing:
        raise ImportError(f"cannot import {', '.join(missing)} (the JSON's imports say why)")
    return importlib.import_module("bench.gpu.stages")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")),
                        help="folder of the JSON (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, the tiny test models, 64x64")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds of wall time from --started")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the run began (run.sh's start)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per number (10; dry run 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before them (2; dry run 0)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="the floors' rate")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tests", default="tests/test_cli.py tests/test_no_wasted_work.py tests/test_loop_graphs.py "
                                           "-k 'mini or demo or cuda or one_line or info_and_help'",
                        help="pytest selection of the test stages")
    parser.add_argument("--tests-dry", default="tests/test_cli.py -k 'mini_edits_the_colour_under_the_mask and swap'",
                        help="pytest selection of the test stages in a dry run")
    parser.add_argument("--test-timeout", type=float, default=120.0, help="seconds per pytest run")
    parser.add_argument("--only", nargs="+", help="run only these stages (the rest are recorded as skipped; the "
                                                  "preflight always runs)")
    parser.add_argument("--install-log", help="run.sh's pip log, kept in the JSON")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.dry_run else 10)
    args.warmup = (0 if args.dry_run else 2) if args.warmup is None else args.warmup
    return args


def why_skipped(stage: Stage, args: argparse.Namespace, left: float, stage_module) -> str | None:
    """Why a stage does not run now, or None: no time left for it, or nothing to run it with."""
    estimate = 1.0 if args.dry_run else stage.estimate_s
    if left < estimate:
        return f"deadline: {estimate:.0f} s needed, {max(left, 0):.0f} s left"
    if stage_module is None and stage.work != "preflight":
        return "the preflight failed: nothing else can run"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = args.started or time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ICD_HOME", tempfile.mkdtemp(prefix="icd-gpu-home-"))
    if args.dry_run:
        os.environ["OMP_NUM_THREADS"] = "1"  # the tiny models gain nothing from threads; nor do the subprocesses
    dtypes = ("fp32", "bf16") if args.dry_run else ("fp16", "bf16")
    sizes = {"sd15": 64, "sdxl": 64} if args.dry_run else {"sd15": 512, "sdxl": 1024}
    planned = plan(dtypes)
    meta = {"script": "bench/gpu/measure.py", "argv": sys.argv[1:] if argv is None else argv,
            "mode": "dry-run" if args.dry_run else "gpu", "started": started, "deadline_s": args.deadline,
            "peak_tflops": args.peak_tflops, "repeats": args.repeats, "warmup": args.warmup, "sizes": sizes}
    results = Results(args.out / "gpu.json", [stage.name for stage in planned], meta)
    asked = [stage for stage in planned if not args.only or stage.name in args.only or stage.work == "preflight"]
    for stage in planned:
        if stage not in asked:
            results.stage(stage.name, status="skipped", reason="not in --only")
    results.save()

    def at_deadline():
        results.stop_at_deadline()
        print(f"deadline of {args.deadline:.0f} s reached: stopped", flush=True)
        os._exit(EXIT_DEADLINE)

    watchdog = threading.Timer(max(started + args.deadline - time.time(), 0), at_deadline)
    watchdog.daemon = True
    watchdog.start()
    stage_module = run = None
    for stage in asked:
        reason = why_skipped(stage, args, started + args.deadline - time.time(), stage_module)
        if reason:
            results.stage(stage.name, status="skipped", reason=reason)
            continue
        results.stage(stage.name, status="running", started_s=round(time.time() - started, 2))
        began = time.perf_counter()
        try:
            if stage.work == "preflight":
                stage_module = preflight(results)
                run = stage_module.start(args, results, dtypes, sizes)
            else:
                stage_module.perform(run, stage)
            status = {"status": "ok"}
        except Exception as err:  # noqa: BLE001  (every failure is recorded, and the run goes on)
            skipped = stage_module is not None and isinstance(err, stage_module.Skipped)
            status = {"status": "skipped", "reason": str(err)} if skipped else {
                "status": "failed", "error": f"{type(err).__name__}: {str(err).strip()[:500]}",
                "traceback": traceback.format_exc()[-4000:]}
        results.stage(stage.name, seconds=round(time.perf_counter() - began, 2), **status)
        print(f"[{time.time() - started:6.1f} s] {stage.name}: {status['status']} "
              f"{status.get('error', status.get('reason', ''))}", flush=True)
    watchdog.cancel()
    results.save()
    return 0 if stage_module is not None or results.data["stages"]["preflight"]["status"] == "skipped" else \
        EXIT_PREFLIGHT


if __name__ == "__main__":
    sys.exit(main())
