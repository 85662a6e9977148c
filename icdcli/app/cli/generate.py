"""`icd generate`: text to images in the model's 3-4 steps."""

from __future__ import annotations

import itertools
import secrets

import click

from icd.limits import MAX_SEED

from .common import (before_loading, check_engine, check_output, check_size, finish, job_settings, naming_options,
                     open_runner, resolve, write_grid)
from .options import IMAGE_NAMING, MODEL_RUN, uses

GENERATE_FIELDS = ("stem", "target", "seed", "guidance", "tau", "n")


@click.command()
@click.argument("prompt")
@click.option("-n", "--count", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="Number of images.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), help="Seed of the first image (the next ones use seed+1, "
              "...). Default: random.")
@uses("generate_guidance", "generate_tau")
@click.option("--grid", type=click.Path(dir_okay=False), metavar="FILE", help="Also write a contact sheet of the "
              "images, each labelled: the swept settings across and a row per seed, else the seeds in one row.")
@uses(*IMAGE_NAMING, *MODEL_RUN)
def generate(prompt, count, seed, guidance, tau, grid, name_template, format_name, quality, model, device, dtype,
             backend, compile, width, height, output, overwrite, skip_existing, as_json, no_server):
    """Generate images from a prompt in the model's 3-4 steps.

    \b
    Examples:
      icd generate "a lighthouse at dusk, oil painting" -n 4 -o out/
      icd generate "a lighthouse at dusk" -n 4 --guidance 3,7 --grid sheet.png --name "house-{n:02d}" -o out/
    """
    from .. import grid as sheets
    from ..batch import Item, plan
    from ..jobs import generate_file
    from ..naming import EDIT_PARTS, output_path, refuse_clashes, slug
    from ..planning import seeds_to_run

    names = naming_options(name_template, format_name, quality, GENERATE_FIELDS)
    check_output(output, count * len(guidance) * len(tau), naming=names)
    check_engine(device, dtype, backend, compile, not no_server)
    seeds = seeds_to_run((secrets.randbelow(2**31) if seed is None else seed,), count)
    model, manifest = resolve(model)
    check_size(manifest, width, height)
    swept = tuple(name for name, values in (("guidance", guidance), ("tau", tau)) if len(values) > 1)
    default = "{stem}-{seed}" + "".join(part for name, part in EDIT_PARTS if name in swept)
    items, many = [], count * len(guidance) * len(tau) > 1
    for number, (s, w, t) in enumerate(itertools.product(seeds, guidance, tau), start=1):
        values = {"stem": slug(prompt), "target": slug(prompt), "seed": s, "guidance": w, "tau": t, "n": number}
        name = names.fill(default, values) + (names.suffix or ".png")
        label = f"seed {s}" + "".join(f", {key} {values[key]:g}" for key in swept)
        items.append(Item(label, s, output_path(output, name, many), job=(w, t), values=values,
                          settings={"prompt": prompt, "seed": s, "guidance": w, "tau": t}))
    if names.template is not None:
        refuse_clashes(items, names.template, ("seed", *swept))
    varying = (*swept, *(("seed",) if len(seeds) > 1 else ()))
    sheet = None if grid is None else sheets.layout(grid, items, varying, with_inputs=False)
    items = plan(items, [], overwrite=overwrite, skip_existing=skip_existing)
    if sheet is not None:
        sheets.check_place(sheet, items, [], overwrite)
    before_loading(items, as_json, None if sheet is None else lambda as_json: sheets.describe(sheet, as_json))
    runner = open_runner(manifest, device, dtype, ("reverse",), backend, compile, static_shapes=True,
                         no_server=no_server)
    settings = job_settings(runner, model, width, height, overwrite, quality)
    finish(items, lambda item: (generate_file(settings, prompt, item.source, *item.job, item.output), []), as_json,
           settings.clock, None if sheet is None else lambda report: write_grid(sheet, report, overwrite, as_json))
