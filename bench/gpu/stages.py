"""The stages of the GPU run (bench/gpu/measure.py runs them in its plan's order, after its import preflight):
the models, the timed computations next to their FLOP floors, captured results checked against eager ones,
cold starts, the profile, the CUDA tests, a second GPU.

Every stage is `stage(run, name, *args)`. Eager rows run on a session without loop capture (`without_capture`:
`open_session` captures on CUDA), and FLOPs are counted there; captured rows run on a copy of it with the
product's LoopGraphs. Each row of a photo edit or inversion records whether its output is finite, and a
captured or compiled row the largest |difference| from the eager output of the same device, model and dtype.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from icd import pipeline
from icd.app.bench import SOURCE, TARGET, cold_start_s, matmul_tflops, time_ms
from icd.app.session import Session, open_session
from icd.editing import edit_plan
from icd.models.cache import icd_home
from icd.models.hub import resolve_model
from icd.models.loading import DTYPES, PRECISIONS
from icd.models.official import DIRECTIONS
from icd.pipeline import EditResult
from icd_export.compiled import INDUCTOR
from icd_export.engines import TorchEngine
from icd_export.graphs import CudaRecorder, LoopGraphs

ROOT = Path(__file__).resolve().parents[2]
TARGETS_MS = {("sd15", "photo_edit_p2p"): 60.0, ("sd15", "invert"): 25.0, ("sdxl", "photo_edit_swap"): 250.0,
              ("sd15", "cold_start_fused"): 3000.0}
METHODS = ("p2p", "swap", "none")
LABELS = {"invert": "invert: photo to x_T", **{f"photo_edit_{method}": f"photo edit, {method}: invert + edit + decode"
                                              for method in METHODS}}


class Skipped(Exception):
    """A stage with nothing to do on this machine (measure.py records it as skipped, with this reason)."""


@dataclass
class Run:
    """What the stages share: options, the models, the open sessions, FLOP counts, eager callables and outputs."""

    args: object  # measure.py's options
    results: object  # measure.py's Results
    device: torch.device
    dtypes: tuple[str, ...]
    sizes: dict[str, int]
    models: dict[str, Path] = field(default_factory=dict)
    sessions: dict = field(default_factory=dict)  # (kind, dtype, device) -> the eager session
    captured: dict = field(default_factory=dict)  # (kind, dtype, device) -> the session with captured loops
    flops: dict = field(default_factory=dict)
    eager: dict = field(default_factory=dict)  # (kind, name, dtype, device) -> the eager callable
    references: dict = field(default_factory=dict)  # (kind, dtype, device, name) -> the eager output of the check
    builders: dict = field(default_factory=dict)

    @property
    def dry(self) -> bool:
        return self.args.dry_run

    def deadline_left(self) -> float:
        return self.results.data["started"] + self.args.deadline - time.time()

    def pixels(self, kind: str, seed: int = 0) -> torch.Tensor:
        """The photo every timed call edits (seed 0), or the one the checks edit (seed 1)."""
        size = self.sizes[kind]
        return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def session(self, kind: str, dtype: str, device: str | None = None) -> Session:
        """The eager session of a model, dtype and device (default: the run's), opened once through the product's
        loading path; the JSON's `opened` says whether the product's session captures loops (on CUDA it does)."""
        device = device or str(self.device)
        if (kind, dtype, device) not in self.sessions:
            started = time.perf_counter()
            opened = open_session(str(self.models[kind]), device, dtype, "torch", directions=DIRECTIONS)
            name = f"{kind}-{dtype}" + ("" if device == str(self.device) else f"-{device}")
            self.results.note("load_s", name, round(time.perf_counter() - started, 2))
            self.results.note("opened", name, {"product_session_captures_loops": opened.graphs is not None,
                                               "eager_session_captures_loops": False})
            self.sessions[kind, dtype, device] = without_capture(opened)
        return self.sessions[kind, dtype, device]

    def captured_session(self, kind: str, dtype: str, device: str | None = None) -> Session:
        """The eager session's model and UNets with every loop replayed as one captured graph, kept for the run."""
        key = (kind, dtype, device or str(self.device))
        if key not in self.captured:
            self.captured[key] = with_capture(self.session(*key))
        return self.captured[key]

    def measure(self, stage: str, session: Session, mode: str, name: str, fn, label: str, **extra) -> dict:
        """Time `fn` (see measure.py's docstring) and record one row; FLOPs are counted on the eager session and
        reused by the other modes of the same computation; photo edits and inversions are checked."""
        kind, dtype, device = identity(session)
        sync = torch.cuda.synchronize if session.model.device.type == "cuda" else (lambda: None)
        started = time.perf_counter()
        output = fn()
        sync()
        first_call_s = time.perf_counter() - started
        if mode == "eager":
            with FlopCounterMode(display=False) as counter:
                fn()
            self.flops[kind, name] = counter.get_total_flops()
            self.eager[kind, name, dtype, device] = fn
        ms = time_ms(fn, session.model.device, self.args.warmup, self.args.repeats)
        target = TARGETS_MS.get((kind, name)) if device == str(self.device) else None
        row = {"stage": stage, "model": kind, "size": self.sizes[kind], "name": name, "label": label, "dtype": dtype,
               "device": device, "mode": mode, "session_captures_loops": session.graphs is not None,
               "ms": round(ms, 3), "gflop": None, "floor_ms": None, "ratio": None, "target_ms": target,
               "met": None if target is None else ms <= target, "first_call_s": round(first_call_s, 3), **extra}
        if name in LABELS:
            row |= self.check(session, mode, name, output)
        self.results.add_row(row)
        self.floors(kind, name)
        return row

    def check(self, session: Session, mode: str, name: str, output) -> dict:
        """Eager: whether `output` is finite. Otherwise the same computation on another photo than the one its
        graphs were recorded with (a graph recorded empty, or whose inputs are not copied in, would return
        the recording call's result): whether that is finite, and its largest |difference| from eager."""
        if mode == "eager":
            return {"finite": bool(torch.isfinite(result_tensor(output)).all())}
        kind, dtype, device = identity(session)
        pixels, key = self.pixels(kind, seed=1), (kind, dtype, device, name)
        if key not in self.references:
            self.references[key] = result_tensor(edit_call(self.session(kind, dtype, device), pixels, name)())
        replayed = result_tensor(edit_call(session, pixels, name)())
        difference = (replayed.float() - self.references[key].float().to(replayed.device)).abs()
        return {"finite": bool(torch.isfinite(replayed).all()), "max_abs_diff_vs_eager": difference.max().item(),
                "diff_of": "x_T" if name == "invert" else "edited pixels in [-1, 1]"}

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


def identity(session: Session) -> tuple[str, str, str]:
    """(kind, dtype, device) of a session's model: what its rows and eager references are keyed by."""
    model = session.model
    return model.manifest.kind, PRECISIONS[model.dtype], str(model.device)


def result_tensor(output) -> torch.Tensor:
    """What a computation's check compares: x_T of an inversion, the edited pixels of a photo edit."""
    return output.edited if isinstance(output, EditResult) else output


def without_capture(opened: Session) -> Session:
    """The opened session's model and engine with no loop capture: what eager rows and FLOP counts run on."""
    return Session(opened.model, opened.engine)


def recorder(device: torch.device):
    """The product's graph recorder (icd_export.graphs) on a GPU, its CPU stand-in in a dry run."""
    if device.type == "cuda":
        return CudaRecorder()
    from tests.fixtures.recorders import Rerun

    return Rerun()


def with_capture(eager: Session, compile_mode: str | None = None, compiler: str = INDUCTOR) -> Session:
    """The eager session's model and UNets with every loop replayed as one captured graph, as `icd edit` runs
    on CUDA; `compile_mode` also compiles the UNets (by `compiler`) inside the loops."""
    device = eager.model.device
    engine = eager.engine
    if compile_mode is not None:
        unets = dict(zip(DIRECTIONS, engine.unets(eager.model, *DIRECTIONS)))
        engine = TorchEngine(compile_mode, compiler, unets=unets)
    return Session(eager.model, engine, LoopGraphs(device, recorder(device)))


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

def env(run: Run, stage: str) -> None:
    """Versions, the device, the driver and the install's log."""
    import diffusers
    import transformers

    found = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "diffusers": diffusers.__version__,
             "transformers": transformers.__version__, "cpus": os.cpu_count(), "device": str(run.device)}
    if run.device.type == "cuda":
        properties = torch.cuda.get_device_properties(run.device)
        found |= {"gpu": properties.name, "capability": f"{properties.major}.{properties.minor}",
                  "sms": properties.multi_processor_count, "memory_gib": round(properties.total_memory / 2**30, 1),
                  "gpus": torch.cuda.device_count()}
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
        found["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        found["matmul_tflops_measured"] = {name: round(matmul_tflops(run.device, DTYPES[name]), 1)
                                           for name in run.dtypes}
    if run.args.install_log and Path(run.args.install_log).is_file():
        found["install_log"] = Path(run.args.install_log).read_text()[-3000:]
    run.results.set("env", found)


def build_models(run: Run, stage: str) -> None:
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


def sdxl_model(run: Run, stage: str) -> None:
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


def load(run: Run, stage: str, kind: str, dtype: str) -> None:
    run.session(kind, dtype)


def eager_and_captured(run: Run, stage: str, kind: str, dtype: str, names: tuple[str, ...]) -> None:
    """Each computation ("invert", "photo_edit_<method>") eager, then with every loop one captured graph (its
    first call's seconds are an eager run; the warm-up records)."""
    eager, captured, pixels = run.session(kind, dtype), run.captured_session(kind, dtype), run.pixels(kind)
    for name in names:
        run.measure(stage, eager, "eager", name, edit_call(eager, pixels, name), LABELS[name])
        run.measure(stage, captured, "captured", name, edit_call(captured, pixels, name), LABELS[name])


def compile_captured(run: Run, stage: str, kind: str, dtype: str, names: tuple[str, ...], mode: str) -> None:
    """The UNets compiled in `mode` (no CUDA graphs of its own) inside loops captured whole, what `icd edit
    --compile` does on CUDA with one image size (which autotunes: `max-autotune-no-cudagraphs`, minutes a
    graph); the first call's seconds are the compile."""
    compiler = "eager" if run.dry else INDUCTOR  # inductor's CPU builds take minutes; this checks the wiring
    session, pixels = with_capture(run.session(kind, dtype), mode, compiler), run.pixels(kind)
    for name in names:
        run.measure(stage, session, "compile+captured", name, edit_call(session, pixels, name), LABELS[name],
                    compile_mode=mode, compiler=compiler)


def modules(run: Run, stage: str, kind: str, dtype: str) -> None:
    """UNet calls (eager and each one captured graph), text encoding, VAE encode and decode in the VAE's
    dtype as the product sets it."""
    session = run.session(kind, dtype)
    model, size = session.model, run.sizes[kind]
    vae = PRECISIONS[model.vae.dtype]
    for name, (label, fn) in unet_calls(session, size).items():
        run.measure(stage, session, "eager", name, fn, label)
        _, outputs, replay = recorder(model.device)(fn, model.device)
        run.measure(stage, session, "captured", name, replay, label + " (one graph)")
        del outputs, replay
    # The encoders themselves: `encode_text` keeps every prompt it has encoded, so its calls would be lookups.
    run.measure(stage, session, "eager", "text_encode", lambda: model.encode_prompts([SOURCE, TARGET], (size, size)),
                "text encoding, 2 prompts")
    pixels = run.pixels(kind)
    latents = model.encode_image(pixels)
    run.measure(stage, session, "eager", "vae_encode", lambda: model.encode_image(pixels),
                f"VAE encode from CPU pixels ({vae})", vae_dtype=vae)
    run.measure(stage, session, "eager", "vae_decode", lambda: model.decode_latents(latents),
                f"VAE decode to CPU pixels ({vae})", vae_dtype=vae)


def vae_precision(run: Run, stage: str) -> None:
    """The decoded pixels of every open session's VAE (in the dtype the product gives it) against an fp32 copy."""
    from bench.vae_precision import vae_levels

    for (kind, dtype, device), session in list(run.sessions.items()):
        latents = session.model.encode_image(run.pixels(kind))
        run.results.note("vae_precision", f"{kind}-{dtype}-{device}", vae_levels(session.model.vae, latents))


def throughput(run: Run, stage: str, kind: str, dtype: str) -> None:
    """pipeline.reconstruct of x_T repeated to batch 1, 4 and 8 (the batch of a folder of latents)."""
    session = run.session(kind, dtype)
    x_T = pipeline.invert(session, run.pixels(kind), SOURCE, 0)
    for batch in run.args.batches:
        rows = x_T.repeat(batch, 1, 1, 1)
        row = run.measure(stage, session, "eager", f"reconstruct_b{batch}",
                          lambda r=rows: pipeline.reconstruct(session, r, SOURCE), f"reconstruct, batch {batch}")
        row["images_per_s"] = round(batch / row["ms"] * 1000, 2)


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


def launches(run: Run, stage: str, kind: str, dtype: str) -> None:
    """Kernel launches per UNet call, plain and with Prompt-to-Prompt (torch.profiler), eager."""
    session = run.session(kind, dtype)
    unit = "CUDA kernels" if run.device.type == "cuda" else "ATen ops"
    for name, (label, fn) in unet_calls(session, run.sizes[kind]).items():
        fn()
        run.results.add_row({"stage": stage, "model": kind, "size": run.sizes[kind], "name": f"launches_{name}",
                             "label": f"{unit} per call: {label}", "dtype": dtype, "mode": "eager",
                             "session_captures_loops": False, "count": count_device_work(fn, run.device),
                             "unit": unit})


def profile_worst(run: Run, stage: str) -> None:
    """torch.profiler's top ops of the slowest target computation (the largest time over target, eager)."""
    import gzip
    import shutil
    import tempfile

    rows = [row for row in run.results.data["rows"] if row.get("target_ms") and row["mode"] == "eager"
            and (row["model"], row["name"], row["dtype"], row["device"]) in run.eager]
    if not rows:
        raise RuntimeError("no target computation was measured")
    worst = max(rows, key=lambda row: row["ms"] / row["target_ms"])
    fn = run.eager[worst["model"], worst["name"], worst["dtype"], worst["device"]]
    fn()
    cuda = run.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
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
                         "dtype": run.dtypes[0], "device": str(run.device), "mode": "process",
                         "session_captures_loops": None,  # the new process's own choice (on CUDA: it captures)
                         "ms": round(seconds * 1000, 1), "gflop": None, "floor_ms": None, "ratio": None,
                         "target_ms": target, "met": None if target is None else seconds * 1000 <= target})


def cold_start(run: Run, stage: str) -> None:
    """`icd edit` as a new process, to the written PNG: without artifacts, then with the exported fused weights
    (a dry run starts the fused one only). ONNX graphs would need onnxruntime's CUDA provider, which the GPU
    machine lacks (env.ort_providers)."""
    from icd_export.artifacts import Index
    from icd_export.build import export_model

    manifest = resolve_model(str(run.models["sd15"]))
    if not run.dry and not Index.open(manifest).entries:
        cold_row(run, stage, "cold_start_plain", "cold start: new process, teacher + LoRA fused at load",
                 edit_process_s(run, manifest.path, "--backend", "torch"))
    export_model(manifest, (run.dtypes[0],), onnx=False, device=run.device)
    cold_row(run, stage, "cold_start_fused", "cold start: new process, exported fused weights",
             edit_process_s(run, manifest.path, "--backend", "torch"))


def pytest_run(run: Run, stage: str, dtype: str) -> None:
    """The CLI's end-to-end tests (the mini model's edits, the demo) and the CUDA-only tests, on the run's
    device in `dtype` (ICD_DEVICE/ICD_DTYPE steer every command the tests run)."""
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


def second_device(run: Run, stage: str, dtype: str) -> None:
    """SD1.5 on the second GPU with the first one current (what a torchrun rank or serve worker on cuda:1 does
    if anything ignores its device): the inversion and the P2P photo edit, eager and captured, each replay
    checked against the eager output on that GPU. A dry run checks the wiring on the CPU."""
    if run.dry:
        other = "cpu"
    elif torch.cuda.device_count() < 2:
        raise Skipped(f"{torch.cuda.device_count()} GPU: no second device")
    else:
        other = "cuda:1"
    eager = run.session("sd15", dtype, other)
    if not run.dry:
        torch.cuda.set_device(run.device.index or 0)  # opening claimed cuda:1; the guards alone must place the work
    captured, pixels = run.captured_session("sd15", dtype, other), run.pixels("sd15")
    for name in ("invert", "photo_edit_p2p"):
        run.measure(stage, eager, "eager", name, edit_call(eager, pixels, name), LABELS[name])
        run.measure(stage, captured, "captured", name, edit_call(captured, pixels, name), LABELS[name])


def start(args, results, dtypes: tuple[str, ...], sizes: dict[str, int]) -> Run:
    """The run's shared state, once the preflight has imported torch: the device (one thread in a dry run)."""
    if args.dry_run:
        torch.set_num_threads(1)  # the tiny models gain nothing from a thread pool, which stalls a busy machine
    results.set("targets_ms", {f"{kind} {name}": ms for (kind, name), ms in TARGETS_MS.items()})
    return Run(args, results, torch.device("cpu" if args.dry_run else "cuda"), dtypes, sizes)


def perform(run: Run, stage) -> None:
    """One stage of measure.py's plan: its function here, called with its arguments."""
    with torch.inference_mode(stage.inference):
        globals()[stage.work](run, stage.name, *stage.args)
