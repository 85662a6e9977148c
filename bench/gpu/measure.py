"""The GPU truth run (issue 13): the product's speed on one GPU, each number next to its FLOP floor, and the
CLI's end-to-end tests on CUDA, in one call of at most ~9.5 minutes. `run.sh` installs the wheels and the
project first; bench/gpu/README.md says how to call it.

Random-weight SD1.5 (512x512) and SDXL (1024x1024) are built on the machine with the project's builder and
opened through the product's own loading path. Each timed callable runs once to warm up, once more under
torch.utils.flop_counter (its FLOPs; floor = FLOPs / the peak rate, 790 TFLOP/s bf16 dense on an H200),
then `repeats` times (median, CUDA events; `icd.app.bench.time_ms`). Modes: eager; captured (the product's
own loop capture, icd_export.graphs: each loop one CUDA graph over static buffers, VAE and text eager);
compile (the session's torch.compile path with CUDA graphs per call); compile+captured (compiled UNets
without CUDA graphs inside loops captured whole).

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
import gzip
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # tests.fixtures (the tiny models of --dry-run)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from icd import pipeline
from icd.editing import edit_plan  # noqa: E402
from icd.app.bench import SOURCE, TARGET, cold_start_s, matmul_tflops, time_ms  # noqa: E402
from icd.app.session import Session, open_session  # noqa: E402
from icd.models.hub import resolve_model  # noqa: E402
from icd.models.cache import icd_home  # noqa: E402
from icd.models.loading import DIRECTIONS, DTYPES, PRECISIONS  # noqa: E402
from icd_export.compiled import INDUCTOR  # noqa: E402
from icd_export.engines import TorchEngine  # noqa: E402
from icd_export.graphs import CudaRecorder, LoopGraphs, Rerun  # noqa: E402

PEAK_TFLOPS = 790.0  # an H200's dense bf16 (and fp16) matmul rate, as measured on one (KINDS.md)
TARGETS_MS = {("sd15", "photo_edit_p2p"): 60.0, ("sd15", "invert"): 25.0, ("sdxl", "photo_edit_swap"): 250.0,
              ("sd15", "cold_start_fused"): 3000.0}
METHODS = ("p2p", "swap", "none")
LABELS = {"invert": "invert: photo to x_T", **{f"photo_edit_{method}": f"photo edit, {method}: invert + edit + decode"
                                              for method in METHODS}}
EXIT_DEADLINE = 3


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


@dataclass
class Run:
    """What the stages share: options, the models, the open sessions, FLOP counts and the eager callables."""

    args: argparse.Namespace
    results: Results
    device: torch.device
    dtypes: tuple[str, ...]
    sizes: dict[str, int]
    models: dict[str, Path] = field(default_factory=dict)
    sessions: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    eager: dict = field(default_factory=dict)
    builders: dict = field(default_factory=dict)

    @property
    def dry(self) -> bool:
        return self.args.dry_run

    def deadline_left(self) -> float:
        return self.results.data["started"] + self.args.deadline - time.time()

    def pixels(self, kind: str) -> torch.Tensor:
        size = self.sizes[kind]
        return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def session(self, kind: str, dtype: str) -> Session:
        """The eager session of a model and dtype, opened once through the product's loading path."""
        if (kind, dtype) not in self.sessions:
            started = time.perf_counter()
            self.sessions[kind, dtype] = open_session(str(self.models[kind]), self.device.type, dtype, "torch",
                                                      directions=DIRECTIONS)
            self.results.note("load_s", f"{kind}-{dtype}", round(time.perf_counter() - started, 2))
        return self.sessions[kind, dtype]

    def measure(self, stage: str, kind: str, dtype: str, mode: str, name: str, fn, label: str, **extra) -> dict:
        """Time `fn` (see the module's docstring) and record one row; FLOPs are counted in eager mode and
        reused by the other modes of the same computation."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        started = time.perf_counter()
        fn()
        sync()
        first_call_s = time.perf_counter() - started
        key = (kind, name)
        if mode == "eager":
            with FlopCounterMode(display=False) as counter:
                fn()
            self.flops[key] = counter.get_total_flops()
            self.eager[key] = fn
        ms = time_ms(fn, self.device, self.args.warmup, self.args.repeats)
        target = TARGETS_MS.get(key)
        row = {"stage": stage, "model": kind, "size": self.sizes[kind], "name": name, "label": label, "dtype": dtype,
               "mode": mode, "ms": round(ms, 3), "gflop": None, "floor_ms": None, "ratio": None, "target_ms": target,
               "met": None if target is None else ms <= target, "first_call_s": round(first_call_s, 3), **extra}
        self.results.add_row(row)
        self.floors(kind, name)
        return row

    def floors(self, kind: str, name: str) -> None:
        """Each row of this computation gets its FLOPs and floor once the eager run has counted them (a
        captured or compiled row measured before the eager one gets them then)."""
        flops = self.flops.get((kind, name))
        if not flops:
            return
        floor_ms = flops / (self.args.peak_tflops * 1e12) * 1e3
        with self.results.lock:
            for row in self.results.data["rows"]:
                if row["model"] == kind and row["name"] == name and row.get("ms") is not None:
                    row.update(gflop=round(flops / 1e9, 3), floor_ms=float(f"{floor_ms:.4g}"),
                               ratio=round(row["ms"] / floor_ms, 2))


# ---- the computations ----

def photo_edit(session, pixels: torch.Tensor, method: str):
    """What `icd edit` does to a photo: invert under the source prompt, edit, decode the edited row."""
    x_T = pipeline.invert(session, pixels, SOURCE, 0)
    plan = edit_plan(session.manifest, SOURCE, TARGET, method=method)
    return pipeline.edit(session, x_T, plan, with_reconstruction=False)


def edit_call(session, pixels: torch.Tensor, name: str):
    """The call that `name` (a key of LABELS) times on `session`."""
    if name == "invert":
        return lambda: pipeline.invert(session, pixels, SOURCE, 0)
    return lambda: photo_edit(session, pixels, name.removeprefix("photo_edit_"))


def recorder(device: torch.device):
    """The product's graph recorder (icd_export.graphs): CUDA's on a GPU, its CPU stand-in in a dry run."""
    return CudaRecorder() if device.type == "cuda" else Rerun()


def captured_session(eager: Session, compile_mode: str | None = None, compiler: str = INDUCTOR) -> Session:
    """The eager session's model and UNets with every loop replayed as one captured graph, as `icd edit`
    runs on CUDA with one image size; `compile_mode` also compiles the UNets inside the loops."""
    device = eager.model.device
    return Session(eager.model, compiled_engine(eager, compile_mode, compiler), LoopGraphs(device, recorder(device)))


def compiled_engine(eager: Session, compile_mode: str | None, compiler: str) -> TorchEngine:
    """The eager session's UNets, compiled in `compile_mode` by `compiler` (None: eager)."""
    unets = dict(zip(DIRECTIONS, eager.engine.unets(eager.model, *DIRECTIONS)))
    return TorchEngine(compile_mode, compiler, unets=unets)


def unet_calls(session, size: int) -> dict:
    """The UNet calls of an edit: forward and reverse at batch 1, reverse at batch 2, Prompt-to-Prompt's
    steered reverse call (2 rows): name -> (label, fn)."""
    model, device = session.model, session.model.device
    x1 = torch.randn(model.latent_shape(size, size), generator=torch.Generator().manual_seed(1)).to(device)
    x2 = x1.repeat(2, 1, 1, 1)
    cond1 = model.encode_text([SOURCE], (size, size))
    cond2 = model.encode_text([SOURCE, TARGET], (size, size))
    forward, reverse = session.denoiser("forward"), session.denoiser("reverse")
    host = session.attention_host()
    steps = len(model.manifest.reverse_timesteps)
    controller = host.controller(model.tokenizers[0], SOURCE, TARGET, steps, latent_size=tuple(x1.shape[-2:]))

    def steered():
        with host.attached(controller):
            return host.denoiser(x2, 779, cond2, (0.0, 19.0))

    return {"unet_forward_b1": ("UNet call, forward, batch 1", lambda: forward(x1, 259, cond1, (0.0,))),
            "unet_reverse_b1": ("UNet call, reverse, batch 1", lambda: reverse(x1, 779, cond1, (19.0,))),
            "unet_reverse_b2": ("UNet call, reverse, batch 2", lambda: reverse(x2, 779, cond2, (0.0, 19.0))),
            "unet_p2p_b2": ("UNet call, reverse with P2P, 2 rows", steered)}


# ---- the stages ----

def stage_env(run: Run, stage: str) -> None:
    """Versions, the device, the driver and the install's log."""
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "cpus": os.cpu_count(), "device": str(run.device)}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError as err:
        env["onnxruntime"] = f"not importable: {err}"
    if run.device.type == "cuda":
        properties = torch.cuda.get_device_properties(run.device)
        env |= {"gpu": properties.name, "capability": f"{properties.major}.{properties.minor}",
                "sms": properties.multi_processor_count, "memory_gib": round(properties.total_memory / 2**30, 1)}
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
        env["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        env["matmul_tflops_measured"] = {name: round(matmul_tflops(run.device, DTYPES[name]), 1)
                                         for name in run.dtypes}
    if run.args.install_log and Path(run.args.install_log).is_file():
        env["install_log"] = Path(run.args.install_log).read_text()[-3000:]
    run.results.set("env", env)


def stage_build(run: Run, stage: str) -> None:
    """The models: random-weight SD1.5 here, SDXL in a background process (CPU work that overlaps the first
    SD1.5 stages); with --dry-run the tiny test models."""
    if run.dry:
        from tests.fixtures.tiny import TINY_KINDS, build_tiny_model

        for name, kind in TINY_KINDS.items():
            folder = icd_home() / "models" / name
            run.models[kind] = Path(resolve_model(name).path) if folder.is_dir() else build_tiny_model(folder, kind)
        return
    from icd.models.offline import build_random_model

    command = [sys.executable, "-c", "from icd.models.offline import build_random_model; build_random_model('sdxl')"]
    icd_home().mkdir(parents=True, exist_ok=True)
    log = open(icd_home() / "sdxl-build.log", "w+")  # a file: a full pipe would stall the build
    run.builders["sdxl"] = (subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "4"}, stdout=log,
                                             stderr=subprocess.STDOUT), log)
    run.models["sd15"] = build_random_model("sd15")


def stage_sdxl_model(run: Run, stage: str) -> None:
    """Waits for the background SDXL build (or builds it here if that failed)."""
    if run.dry:
        return
    from icd.models.offline import build_random_model

    if "sdxl" in run.builders:
        builder, log = run.builders.pop("sdxl")
        with log:
            builder.wait(timeout=max(run.deadline_left(), 1))
            log.seek(0)
            run.results.stage(stage, builder_rc=builder.returncode, builder_output=log.read()[-2000:])
    run.models["sdxl"] = build_random_model("sdxl")


def stage_load(kind: str, dtype: str):
    def load(run: Run, stage: str) -> None:
        run.session(kind, dtype)
    return load


def stage_eager(kind: str, dtype: str, names: tuple[str, ...]):
    """Inversion and photo edits in eager PyTorch ("invert", "photo_edit_<method>")."""
    def eager(run: Run, stage: str) -> None:
        session, pixels = run.session(kind, dtype), run.pixels(kind)
        for name in names:
            run.measure(stage, kind, dtype, "eager", name, edit_call(session, pixels, name), LABELS[name])
    return eager


def stage_captured(kind: str, dtype: str, methods: tuple[str, ...]):
    """The same with each loop replayed as one captured graph (the product's LoopGraphs); the first call's
    seconds include the recording."""
    def captured(run: Run, stage: str) -> None:
        session, pixels = captured_session(run.session(kind, dtype)), run.pixels(kind)
        for name in ("invert", *(f"photo_edit_{method}" for method in methods)):
            run.measure(stage, kind, dtype, "captured", name, edit_call(session, pixels, name), LABELS[name])
    return captured


def stage_modules(kind: str, dtype: str):
    """UNet calls (eager and each one captured graph), text encoding, VAE encode and decode in the VAE's
    dtype as the product sets it."""
    def modules(run: Run, stage: str) -> None:
        session = run.session(kind, dtype)
        model, size = session.model, run.sizes[kind]
        vae = PRECISIONS[model.vae.dtype]
        for name, (label, fn) in unet_calls(session, size).items():
            run.measure(stage, kind, dtype, "eager", name, fn, label)
            _, outputs, replay = recorder(model.device)(fn, model.device)
            run.measure(stage, kind, dtype, "captured", name, replay, label)
            del outputs, replay
        # The encoders themselves: `encode_text` keeps every prompt it has encoded, so its calls would be lookups.
        run.measure(stage, kind, dtype, "eager", "text_encode", lambda: model.encode_prompts([SOURCE, TARGET],
                    (size, size)), "text encoding, 2 prompts")
        pixels = run.pixels(kind)
        latents = model.encode_image(pixels)
        run.measure(stage, kind, dtype, "eager", "vae_encode", lambda: model.encode_image(pixels),
                    f"VAE encode from CPU pixels ({vae})", vae_dtype=vae)
        run.measure(stage, kind, dtype, "eager", "vae_decode", lambda: model.decode_latents(latents),
                    f"VAE decode to CPU pixels ({vae})", vae_dtype=vae)
    return modules


def stage_compile(kind: str, dtype: str, names: tuple[str, ...], loops_captured: bool = False):
    """The session's torch.compile path (the eager session's UNets, compiled in --compile-mode, CUDA graphs
    per call), or with `loops_captured` compiled without CUDA graphs inside loops captured whole (what
    `icd edit --compile` does on CUDA with one image size); the first call's seconds are the compile."""
    def compiled(run: Run, stage: str) -> None:
        eager = run.session(kind, dtype)
        mode = "max-autotune-no-cudagraphs" if loops_captured else run.args.compile_mode
        compiler = "eager" if run.dry else INDUCTOR  # inductor's CPU builds take minutes; this checks the wiring
        session = captured_session(eager, mode, compiler) if loops_captured else \
            Session(eager.model, compiled_engine(eager, mode, compiler))
        pixels = run.pixels(kind)
        # A dry run compiles the plain and the steered graph only: enough to check the wiring, in less time.
        for name in names[:2] if run.dry else names:
            run.measure(stage, kind, dtype, "compile+captured" if loops_captured else "compile", name,
                        edit_call(session, pixels, name), LABELS[name], compile_mode=mode, compiler=compiler)
    return compiled


def stage_throughput(kind: str, dtype: str):
    """pipeline.reconstruct of x_T repeated to batch 1, 4 and 8 (the batch of a folder of latents)."""
    def throughput(run: Run, stage: str) -> None:
        session = run.session(kind, dtype)
        x_T = pipeline.invert(session, run.pixels(kind), SOURCE, 0)
        for batch in run.args.batches:
            rows = x_T.repeat(batch, 1, 1, 1)
            row = run.measure(stage, kind, dtype, "eager", f"reconstruct_b{batch}",
                              lambda r=rows: pipeline.reconstruct(session, r, SOURCE),
                              f"reconstruct, batch {batch}")
            row["images_per_s"] = round(batch / row["ms"] * 1000, 2)
    return throughput


def count_device_work(fn, device: torch.device) -> int:
    """CUDA kernels (and copies) one call of `fn` launches; on a CPU, the ATen ops it dispatches."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        return sum(1 for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for event in profiler.events() if event.name.startswith("aten::"))


def stage_launches(kind: str, dtype: str):
    """Kernel launches per UNet call, plain and with Prompt-to-Prompt (torch.profiler)."""
    def launches(run: Run, stage: str) -> None:
        session = run.session(kind, dtype)
        unit = "CUDA kernels" if run.device.type == "cuda" else "ATen ops"
        for name, (label, fn) in unet_calls(session, run.sizes[kind]).items():
            fn()
            run.results.add_row({"stage": stage, "model": kind, "size": run.sizes[kind], "name": f"launches_{name}",
                                 "label": f"{unit} per call: {label}", "dtype": dtype, "mode": "eager",
                                 "count": count_device_work(fn, run.device), "unit": unit})
    return launches


def stage_profile(run: Run, stage: str) -> None:
    """torch.profiler's top ops of the slowest target computation (the largest time over target, eager)."""
    rows = [row for row in run.results.data["rows"] if row.get("target_ms") and row["mode"] == "eager"
            and (row["model"], row["name"]) in run.eager]
    if not rows:
        raise RuntimeError("no target computation was measured")
    worst = max(rows, key=lambda row: row["ms"] / row["target_ms"])
    fn = run.eager[worst["model"], worst["name"]]
    fn()
    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        fn()
        if cuda:
            torch.cuda.synchronize(run.device)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    profiler.export_chrome_trace(str(trace))
    with open(trace, "rb") as source, gzip.open(run.args.out / "profile-trace.json.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    run.results.set("profile", {"of": {key: worst[key] for key in ("model", "name", "dtype", "ms", "target_ms")},
                                "sorted_by": sort, "table": table})


def edit_process_s(run: Run, manifest: Path, *options: str) -> float:
    """Seconds from starting a new `icd edit` process to its PNG on disk (an edit of random pixels at the
    model's benchmark size, in the run's first dtype); `options` adds --backend or --compile."""
    size = run.sizes["sd15"]
    return cold_start_s(manifest, run.device.type, run.dtypes[0], size, size, *options,
                        timeout=max(run.deadline_left() - 2, 1))


def cold_row(run: Run, stage: str, name: str, label: str, seconds: float) -> None:
    target = TARGETS_MS.get(("sd15", name))
    run.results.add_row({"stage": stage, "model": "sd15", "size": run.sizes["sd15"], "name": name, "label": label,
                         "dtype": run.dtypes[0], "mode": "process", "ms": round(seconds * 1000, 1), "gflop": None,
                         "floor_ms": None, "ratio": None, "target_ms": target,
                         "met": None if target is None else seconds * 1000 <= target})


def stage_cold_start(run: Run, stage: str) -> None:
    """`icd edit` as a new process, to the written PNG: without artifacts and with the exported fused weights.
    (ONNX graphs would need onnxruntime's CUDA provider, which the GPU machine lacks: env.ort_providers; the
    inductor cache is the other fast start, `cold-start-compiled`.)"""
    from icd_export.artifacts import Index
    from icd_export.build import export_model

    manifest = resolve_model(str(run.models["sd15"]))
    precision = run.dtypes[0]
    if not run.dry and not Index.open(manifest).entries:  # a dry run starts one process: the fused one
        cold_row(run, stage, "cold_start_plain", "cold start: new process, teacher + LoRA fused at load",
                 edit_process_s(run, manifest.path, "--backend", "torch"))
    export_model(manifest, (precision,), onnx=False, device=run.device)
    cold_row(run, stage, "cold_start_fused", "cold start: new process, exported fused weights",
             edit_process_s(run, manifest.path, "--backend", "torch"))


def stage_cold_start_compiled(run: Run, stage: str) -> None:
    """`icd edit --compile` twice: the first process compiles into $ICD_HOME/compiled, the second loads the
    inductor cache (the cold start a user sees after the first)."""
    if run.dry:
        run.results.stage(stage, reason="dry run: inductor's CPU builds take minutes on a small machine")
        return
    first = edit_process_s(run, run.models["sd15"], "--backend", "torch", "--compile")
    cold_row(run, stage, "cold_start_compile_first", "new process, --compile, empty inductor cache", first)
    second = edit_process_s(run, run.models["sd15"], "--backend", "torch", "--compile")
    cold_row(run, stage, "cold_start_compile_cached", "cold start: new process, --compile, inductor cache", second)


def stage_pytest(dtype: str):
    """The CLI's end-to-end tests (the mini model's edits, the demo) and the CUDA-only tests, on the run's
    device in `dtype` (ICD_DEVICE/ICD_DTYPE steer every command the tests run)."""
    def tests(run: Run, stage: str) -> None:
        selection = run.args.tests_dry if run.dry else run.args.tests
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(selection)]
        environment = {**os.environ, "ICD_DEVICE": run.device.type, "ICD_DTYPE": dtype}
        limit = min(run.args.test_timeout, max(run.deadline_left() - 5, 1))
        try:
            done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=limit)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            rc, output = "timeout", err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        lines = output.strip().splitlines()
        run.results.stage(stage, command=" ".join(command[1:]), rc=rc, summary=lines[-1] if lines else "",
                          output_tail="\n".join(lines[-60:]))
        if rc != 0:
            raise RuntimeError(f"pytest exit {rc}: {lines[-1] if lines else 'no output'}")
    return tests


@dataclass(frozen=True)
class Stage:
    name: str
    run: object  # (Run, stage name) -> None
    estimate_s: float  # on the GPU: a stage that would not fit in the time left is skipped
    inference: bool = True  # under torch.inference_mode (not for export, which traces)


def plan(dtypes: tuple[str, ...]) -> list[Stage]:
    """Every stage, most important first: the targets (SD1.5 P2P photo edit, inversion, SDXL swap photo edit,
    cold start) in the first dtype, eager and captured, then the profile of the worst, the rest of the first
    dtype, the CUDA tests, the second dtype, throughput, the compiled path."""
    first, rest = dtypes[0], dtypes[1:]
    stages = [Stage("env", stage_env, 5), Stage("build-models", stage_build, 60),
              Stage(f"sd15-{first}-load", stage_load("sd15", first), 40),
              Stage(f"sd15-{first}-eager-targets", stage_eager("sd15", first, ("photo_edit_p2p", "invert")), 10),
              Stage(f"sd15-{first}-captured", stage_captured("sd15", first, METHODS), 15),
              Stage("sdxl-model", stage_sdxl_model, 60),
              Stage(f"sdxl-{first}-load", stage_load("sdxl", first), 60),
              Stage(f"sdxl-{first}-eager-targets", stage_eager("sdxl", first, ("photo_edit_swap", "invert")), 15),
              Stage(f"sdxl-{first}-captured", stage_captured("sdxl", first, ("swap", "p2p", "none")), 25),
              Stage("cold-start", stage_cold_start, 40, inference=False),
              Stage("profile", stage_profile, 10),
              Stage(f"sd15-{first}-eager-edits", stage_eager("sd15", first, ("photo_edit_swap", "photo_edit_none")), 8),
              Stage(f"sdxl-{first}-eager-edits", stage_eager("sdxl", first, ("photo_edit_p2p", "photo_edit_none")), 12),
              Stage(f"sd15-{first}-modules", stage_modules("sd15", first), 15),
              Stage(f"sdxl-{first}-modules", stage_modules("sdxl", first), 20),
              Stage(f"sd15-{first}-launches", stage_launches("sd15", first), 8),
              Stage(f"pytest-{first}", stage_pytest(first), 60)]
    for dtype in rest:
        stages += [Stage(f"pytest-{dtype}", stage_pytest(dtype), 60),
                   Stage(f"sd15-{dtype}-load", stage_load("sd15", dtype), 30),
                   Stage(f"sd15-{dtype}-eager", stage_eager("sd15", dtype, ("photo_edit_p2p", "invert",
                                                                            "photo_edit_swap", "photo_edit_none")), 10),
                   Stage(f"sd15-{dtype}-captured", stage_captured("sd15", dtype, METHODS), 15),
                   Stage(f"sd15-{dtype}-modules", stage_modules("sd15", dtype), 15)]
    stages += [Stage(f"sd15-{first}-throughput", stage_throughput("sd15", first), 15),
               Stage(f"sd15-{first}-compile", stage_compile("sd15", first, ("invert", "photo_edit_p2p",
                                                                            "photo_edit_swap")), 150)]
    for dtype in rest:
        stages += [Stage(f"sdxl-{dtype}-load", stage_load("sdxl", dtype), 50),
                   Stage(f"sdxl-{dtype}-eager", stage_eager("sdxl", dtype, ("photo_edit_swap", "invert",
                                                                            "photo_edit_p2p", "photo_edit_none")), 15),
                   Stage(f"sdxl-{dtype}-captured", stage_captured("sdxl", dtype, ("swap", "p2p", "none")), 25)]
    stages += [Stage(f"sd15-{first}-compile-captured", stage_compile("sd15", first, ("invert", "photo_edit_p2p"),
                                                                     loops_captured=True), 150),
               Stage(f"sdxl-{first}-compile", stage_compile("sdxl", first, ("photo_edit_swap",)), 150),
               Stage("cold-start-compiled", stage_cold_start_compiled, 120, inference=False)]
    return stages


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")),
                        help="folder of the JSON (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, the tiny test models, 64x64")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds of wall time from --started")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the run began (run.sh's start)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per number (10; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before them (2; dry run 0)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="the floors' rate")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode of the compile stages (the product picks max-autotune for fixed "
                             "sizes; its autotuning takes minutes per graph)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tests", default="tests/test_cli.py tests/test_no_wasted_work.py tests/test_loop_graphs.py "
                                           "-k 'mini or demo or cuda or one_line or info_and_help'",
                        help="pytest selection of the test stages")
    parser.add_argument("--tests-dry", default="tests/test_cli.py -k 'mini_edits_the_colour_under_the_mask and swap'",
                        help="pytest selection of the test stages in a dry run")
    parser.add_argument("--test-timeout", type=float, default=150.0, help="seconds per pytest run")
    parser.add_argument("--only", nargs="+", help="run only these stages (the rest are recorded as skipped)")
    parser.add_argument("--install-log", help="run.sh's pip log, kept in the JSON")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.dry_run else 10)
    args.warmup = (0 if args.dry_run else 2) if args.warmup is None else args.warmup
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = args.started or time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if "ICD_HOME" not in os.environ:
        os.environ["ICD_HOME"] = tempfile.mkdtemp(prefix="icd-gpu-home-")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)  # the tiny models gain nothing from a thread pool, which stalls a busy machine
        os.environ["OMP_NUM_THREADS"] = "1"  # nor do the processes of the cold-start and test stages
    dtypes = ("fp32", "bf16") if args.dry_run else ("fp16", "bf16")
    sizes = {"sd15": 64, "sdxl": 64} if args.dry_run else {"sd15": 512, "sdxl": 1024}
    stages = plan(dtypes)
    meta = {"script": "bench/gpu/measure.py", "argv": sys.argv[1:] if argv is None else argv,
            "mode": "dry-run" if args.dry_run else "gpu", "started": started, "deadline_s": args.deadline,
            "peak_tflops": args.peak_tflops, "repeats": args.repeats, "warmup": args.warmup, "sizes": sizes,
            "targets_ms": {f"{kind} {name}": ms for (kind, name), ms in TARGETS_MS.items()}}
    results = Results(args.out / "gpu.json", [stage.name for stage in stages], meta)
    results.save()
    run = Run(args, results, device, dtypes, sizes)

    def at_deadline():
        results.stop_at_deadline()
        print(f"deadline of {args.deadline:.0f} s reached: stopped", flush=True)
        os._exit(EXIT_DEADLINE)

    watchdog = threading.Timer(max(run.deadline_left(), 0), at_deadline)
    watchdog.daemon = True
    watchdog.start()
    for stage in stages:
        if args.only and stage.name not in args.only:
            results.stage(stage.name, status="skipped", reason="not in --only")
            continue
        estimate = 1.0 if args.dry_run else stage.estimate_s
        if run.deadline_left() < estimate:
            results.stage(stage.name, status="skipped", reason=f"deadline: {estimate:.0f} s needed, "
                                                              f"{max(run.deadline_left(), 0):.0f} s left")
            continue
        results.stage(stage.name, status="running", started_s=round(time.time() - started, 2))
        began = time.perf_counter()
        try:
            with torch.inference_mode(stage.inference):
                stage.run(run, stage.name)
            status = {"status": "ok"}
        except Exception as err:  # noqa: BLE001  (every failure is recorded, and the run goes on)
            status = {"status": "failed", "error": f"{type(err).__name__}: {str(err).strip()[:500]}",
                      "traceback": traceback.format_exc()[-4000:]}
        results.stage(stage.name, seconds=round(time.perf_counter() - began, 2), **status)
        print(f"[{time.time() - started:6.1f} s] {stage.name}: {status['status']} "
              f"{status.get('error', '')}", flush=True)
    watchdog.cancel()
    results.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
