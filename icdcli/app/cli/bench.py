"""`icd bench`: the time of every stage of an edit, whole edits, batches and a cold start."""

from __future__ import annotations

import json

import click

from icd.models.official import KINDS

from .common import quiet
from .options import DEFAULT_MODEL, threads_given, uses


@click.command()
@uses("model", "device", "dtype", "backend", "compile", "threads")
@click.option("--random-weights", type=click.Choice(KINDS), help="Measure the real SD1.5/SDXL "
              "architecture with random weights instead of --model (built once into the cache, no download).")
@click.option("--size", type=click.IntRange(min=64), help="Square image side in pixels. Default: the model's own "
              "resolution (512 for SD1.5, 1024 for SDXL, 64 for mini); on a CPU, 128 measures SD1.5 in minutes.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per stage.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs first.")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=(1, 2, 4), show_default=True,
              help="Batch sizes for the throughput rows (repeatable).")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Also time a new `icd edit` process from start to edited image.")
@click.option("--stages-only", is_flag=True, help="Only the single stages: no whole edits, batches or cold start "
              "(for CPUs).")
@uses("json", "quiet", "verbose")
def bench(model, device, dtype, backend, compile, random_weights, size, repeats, warmup, batches, cold_start,
          stages_only, as_json):
    """Time every stage of an edit (text, VAE, each UNet call), whole edits, batches and a cold start,
    each next to its floor (FLOPs over the measured matmul rate). A bar on a terminal names the stage
    being measured (not with -q or --json).

    \b
    Examples:
      icd bench --random-weights sd15             # on a GPU: SD1.5 at 512x512, fp16
      icd bench --random-weights sd15 --size 128 --repeats 3 --warmup 1 --stages-only   # on a CPU
      icd bench -m sd15 --backend tensorrt --json
    """
    from icd.models.offline import build_random_model

    from ..bench import format_report, run_bench
    from ..session import quiet_libraries

    quiet_libraries()
    model = str(build_random_model(random_weights)) if random_weights else model or DEFAULT_MODEL
    report = run_bench(model, backend=backend, device=device, dtype=dtype, size=size, warmup=warmup,
                       repeats=repeats, batches=batches, compile=compile, cold_start=cold_start,
                       stages_only=stages_only, threads=threads_given(), progress=not (quiet() or as_json))
    click.echo(json.dumps(report) if as_json else format_report(report))
