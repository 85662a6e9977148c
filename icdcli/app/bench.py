"""`icd bench`: the time of each stage of an edit, end to end, in batches and from a cold start, each next
to its floor: its FLOPs (counted on meta-device copies of the modules, so nothing runs) over the best matmul
rate measured on the same device and dtype. The count is of direct convolutions and dense matmuls: a CPU's
Winograd convolutions can do fewer operations and beat it."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from icd import pipeline
from icd.editing import edit_plan
from icd.models.hub import resolve_model
from icd.models.loading import PRECISIONS, Model, resolve_device, resolve_dtype
from icd.models.official import DIRECTIONS
from icd_export.artifacts import tool_versions
from icd_export.build import export_model
from icd_export.registry import export_options
from icd_export.onnx import UNetGraph, input_names, random_inputs

from .session import Session, open_session

SOURCE, TARGET = "a photo of a cat on a sofa", "a photo of a dog on a sofa"


def time_ms(fn, device: torch.device, warmup: int, repeats: int, best: bool = False) -> float:
    """Median (or best) wall time of `fn()` in milliseconds, after `warmup` untimed runs; on a GPU the device
    is synchronized first and CUDA events bracket each run, so queued work is neither missed nor counted twice."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1000)
    return min(times) if best else statistics.median(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The best measured dense matmul rate, the yardstick of the floors."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, warmup=2, repeats=20 if device.type == "cuda" else 5, best=True)
    return 2 * n**3 / ms / 1e9


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.inference_mode()
def stage_flops(model: Model, width: int, height: int) -> dict[str, int]:
    """FLOPs of one call of each module at this size (UNet at batch 1, VAE one image, text two prompts)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel.from_config(model.unet_config)
        vae = AutoencoderKL.from_config(model.vae.config)
        encoders = [type(encoder)(encoder.config) for encoder in model.text_encoders]
    latent = model.latent_shape(width, height)
    inputs = {name: t.to(meta) for name, t in random_inputs(model.unet_config, 1, latent[2:], torch.float32).items()}
    args = [inputs[name] for name in input_names(model.unet_config)]
    ids = torch.zeros(2, 77, dtype=torch.long, device=meta)
    return {
        "unet": _flops(lambda: UNetGraph(unet)(*args)),
        "vae_encode": _flops(lambda: vae.encode(torch.zeros(1, 3, height, width, device=meta)).latent_dist.mean),
        "vae_decode": _flops(lambda: vae.decode(torch.zeros(latent, device=meta))),
        "text": sum(_flops(lambda e=encoder: e(ids, output_hidden_states=True)) for encoder in encoders),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def cold_start_s(manifest_path: Path, device: str, dtype: str, width: int, height: int, *options: str,
                 timeout: float | None = None) -> float:
    """Seconds from starting a new `icd edit` process (never through a server) to its edited image on disk
    (artifacts already built); `options` adds e.g. --backend or --compile."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        photo, output = Path(folder) / "photo.png", Path(folder) / "out.png"
        Image.effect_noise((width, height), 64).convert("RGB").save(photo)
        command = [sys.executable, "-c", "from icd.app.cli import main; main()", "edit", str(photo), "--src", SOURCE,
                   "--tgt", TARGET, "-m", str(manifest_path), "--device", device, "--dtype", dtype, "--width",
                   str(width), "--height", str(height), "--threads", str(torch.get_num_threads()),  # this run's
                   "--no-server", "-o", str(output), "-q", *options]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        if done.returncode != 0 or not output.is_file():
            lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
            raise RuntimeError(f"cold-start run {' '.join(options)} failed: {lines[-1]}")
    return seconds


def run_bench(model_ref: str, *, warmup: int, repeats: int, batches: tuple[int, ...], backend: str = "auto",
              device: str = "auto", dtype: str = "auto", size: int | None = None, compile: bool = False,
              cold_start: bool = True, stages_only: bool = False, threads: int | None = None,
              progress: bool = False) -> dict:
    """Measure one model at `size` x `size` pixels (default: its own resolution) on `threads` CPU threads
    (default: as sessions choose them); returns the report (see BENCHMARKS.md for its fields). `stages_only`
    skips the whole edits, the batches and the cold start (for slow devices); `progress` shows a bar."""
    from tqdm import tqdm

    manifest = resolve_model(model_ref)
    size = size or manifest.resolution
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    precision = PRECISIONS[torch_dtype]
    cold_start = cold_start and not stages_only
    engine_files = export_options(backend)
    # A bar labelled with each measurement, shown on a terminal only, as a batch's is; _measure adds its rows.
    with tqdm(total=int(cold_start), file=sys.stderr, unit="step", dynamic_ncols=True, leave=False,
              disable=not (progress and sys.stderr.isatty())) as bar:
        if any(engine_files.values()) or cold_start:  # what the engine or a fast start needs, before any timing
            bar.set_description("building the engine's files")
            export_model(manifest, (precision,), **engine_files, sizes=((size, size), (manifest.resolution,) * 2),
                         max_batch=max(batches), device=torch_device)
        bar.set_description("loading the model")
        started = time.perf_counter()
        session = open_session(manifest, device, dtype, backend, compile, static_shapes=True, directions=DIRECTIONS,
                               threads=threads)
        load_s = time.perf_counter() - started
        report = {"model": manifest.name, "kind": manifest.kind, "fingerprint": manifest.fingerprint,
                  "device": device_name(torch_device), "backend": session.engine.name, "dtype": precision,
                  "compile": compile, "size": [size, size], "warmup": warmup, "repeats": repeats,
                  "threads": torch.get_num_threads(), "versions": tool_versions(),
                  "matmul_tflops": matmul_tflops(torch_device, torch_dtype), "load_s": load_s}
        with torch.inference_mode():
            report |= _measure(session, torch_device, size, warmup, repeats, () if stages_only else batches,
                               report["matmul_tflops"], stages_only, bar)
        if cold_start:
            bar.set_description("cold start of a new `icd edit`")
            report["cold_start_s"] = cold_start_s(manifest.path, device, precision, size, size, "--backend",
                                                 session.engine.name)
            bar.update()
    return report


def _shown(bar, label: str, fn, device: torch.device, warmup: int, repeats: int) -> float:
    """`time_ms` of one row, named on the bar while it runs."""
    bar.set_description(label)
    ms = time_ms(fn, device, warmup, repeats)
    bar.update()
    return ms


def _measure(session: Session, device: torch.device, size: int, warmup: int, repeats: int, batches,
             tflops: float, stages_only: bool, bar) -> dict:
    model = session.model
    flops = stage_flops(model, size, size)
    steps = len(model.manifest.reverse_timesteps)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    cond1, cond2 = model.encode_text([SOURCE], (size, size)), model.encode_text([SOURCE, TARGET], (size, size))
    x1 = torch.randn(model.latent_shape(size, size), generator=generator).to(device)
    x_T = None if stages_only else pipeline.invert(session, pixels, SOURCE, 0)
    forward, reverse = session.denoiser("forward"), session.denoiser("reverse")
    w0, w1, w2 = torch.zeros(1), torch.full((1,), 19.0), torch.tensor([0.0, 19.0])
    text1 = flops["text"] // 2
    invert_flops = text1 + flops["vae_encode"] + steps * flops["unet"]
    p2p_flops = flops["text"] + steps * 2 * flops["unet"] + flops["vae_decode"]  # the edited row only
    swap_flops = flops["text"] + steps * flops["unet"] + flops["vae_decode"]
    stages = {
        # the encoders themselves: encode_text keeps the prompts it has encoded, so repeats would be lookups
        "text_encode": ("text encoding, 2 prompts", lambda: model.encode_prompts([SOURCE, TARGET], (size, size)),
                        flops["text"]),
        "vae_encode": ("VAE encode", lambda: model.encode_image(pixels), flops["vae_encode"]),
        "unet_forward_b1": ("UNet call, forward, batch 1", lambda: forward(x1, 259, cond1, w0), flops["unet"]),
        "unet_reverse_b1": ("UNet call, reverse, batch 1", lambda: reverse(x1, 779, cond1, w1), flops["unet"]),
        "unet_reverse_b2": ("UNet call, reverse, batch 2", lambda: reverse(x1.expand(2, -1, -1, -1), 779, cond2, w2),
                            2 * flops["unet"]),
        "vae_decode": ("VAE decode (to CPU pixels)", lambda: model.decode_latents(x1), flops["vae_decode"]),
    }

    def edit(method, latent=None):
        """What `icd edit` does: invert unless given x_T, edit, decode the edited row only."""
        x = pipeline.invert(session, pixels, SOURCE, 0) if latent is None else latent
        return pipeline.edit(session, x, edit_plan(model.manifest, SOURCE, TARGET, method=method),
                             with_reconstruction=False)

    end_to_end = {
        "invert": ("invert: photo to x_T", lambda: pipeline.invert(session, pixels, SOURCE, 0), invert_flops),
        "edit_p2p": ("p2p edit from x_T (2 rows, 1 decoded)", lambda: edit("p2p", x_T), p2p_flops),
        "edit_swap": ("swap edit from x_T", lambda: edit("swap", x_T), swap_flops),
        "photo_edit_p2p": ("photo edit, p2p: invert + edit", lambda: edit("p2p"), invert_flops + p2p_flops),
        "photo_edit_swap": ("photo edit, swap: invert + edit", lambda: edit("swap"), invert_flops + swap_flops),
    }

    bar.total += len(stages) + (0 if stages_only else len(end_to_end)) + len(batches)

    def timed(table):
        return {name: {"label": label, "ms": _shown(bar, label, fn, device, warmup, repeats), "gflop": count / 1e9,
                       "floor_ms": count / tflops / 1e9} for name, (label, fn, count) in table.items()}

    rows = {"stages": timed(stages), "end_to_end": {} if stages_only else timed(end_to_end), "throughput": {}}
    for batch in batches:
        ms = _shown(bar, f"reconstruct, batch {batch}", lambda b=batch: pipeline.reconstruct(
            session, x_T.repeat(b, 1, 1, 1), SOURCE), device, warmup, repeats)
        count = batch * (text1 + steps * flops["unet"] + flops["vae_decode"])
        rows["throughput"][str(batch)] = {"ms": ms, "images_per_s": batch / ms * 1000, "floor_ms": count / tflops / 1e9}
    return rows


def format_report(report: dict) -> str:
    """The report as a Markdown table, for people and for BENCHMARKS.md."""
    lines = [f"{report['model']} ({report['kind']}), {report['size'][0]}x{report['size'][1]}, {report['dtype']}, "
             f"backend {report['backend']}{' + torch.compile' if report['compile'] else ''}, {report['device']}; "
             f"median of {report['repeats']} after {report['warmup']} warm-up; matmul "
             f"{report['matmul_tflops']:.2f} TFLOP/s; warm load {report['load_s']:.1f} s",
             "", "| stage | ms | GFLOP | floor ms |", "| --- | ---: | ---: | ---: |"]
    for section in ("stages", "end_to_end"):
        for row in report[section].values():
            lines.append(f"| {row['label']} | {row['ms']:.1f} | {row['gflop']:.1f} | {row['floor_ms']:.1f} |")
    for batch, row in report["throughput"].items():
        lines.append(f"| reconstruct, batch {batch}: {row['images_per_s']:.2f} images/s | {row['ms']:.1f} | | "
                     f"{row['floor_ms']:.1f} |")
    if "cold_start_s" in report:
        cold_ms = report["cold_start_s"] * 1000
        lines.append(f"| cold start: new `icd edit` process to edited image on disk | {cold_ms:.0f} | | |")
    return "\n".join(lines)
