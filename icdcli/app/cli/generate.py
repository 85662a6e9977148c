"""`icd generate`: text to images in the model's 3-4 steps."""

from __future__ import annotations

import secrets

import click

from icd.limits import MAX_SEED

from .common import check_engine, check_output, check_size, finish, job_settings, open_runner, resolve
from .options import DEFAULT_MODEL, MODEL_RUN, uses


@click.command()
@click.argument("prompt")
@click.option("-n", "--count", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="Number of images.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), help="Seed of the first image (the next ones use seed+1, "
              "...). Default: random.")
@uses("generate_guidance", "generate_tau", *MODEL_RUN)
def generate(prompt, count, seed, guidance, tau, model, device, dtype, backend, compile, width, height, output,
             overwrite, skip_existing, as_json, no_server):
    """Generate images from a prompt in the model's 3-4 steps.

    \b
    Example:
      icd generate "a lighthouse at dusk, oil painting" -n 4 -o out/
    """
    from ..batch import Item, plan
    from ..jobs import generate_file, output_path, slug
    from ..planning import seeds_to_run

    check_output(output, count)
    check_engine(device, dtype, backend, compile, not no_server)
    seeds = seeds_to_run((secrets.randbelow(2**31) if seed is None else seed,), count)
    manifest = resolve(model)
    model = model or DEFAULT_MODEL
    check_size(manifest, width, height)
    items = plan([Item(f"seed {s}", s, output_path(output, f"{slug(prompt)}-{s}.png", count > 1))
                  for s in seeds], [], overwrite=overwrite, skip_existing=skip_existing)
    if not any(item.runnable for item in items):
        finish(items, None, as_json)
    runner = open_runner(manifest, device, dtype, ("reverse",), backend, compile, static_shapes=True,
                         no_server=no_server)
    settings = job_settings(runner, model, width, height, overwrite)
    finish(items, lambda item: (generate_file(settings, prompt, item.source, guidance, tau, item.output), []),
           as_json)
