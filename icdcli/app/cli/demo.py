"""`icd demo`: the whole chain on a sample, offline, with a before/after picture."""

from __future__ import annotations

from pathlib import Path

import click

from .common import job_settings, open_model, quiet, resolve
from .options import DEMO_MODEL, uses


@click.command()
@click.option("-o", "--output", type=click.Path(file_okay=False), default="icd-demo", show_default=True,
              help="Folder for the demo's files.")
@uses("model", "device", "dtype", "threads", "overwrite", "quiet", "verbose")
def demo(output, model, device, dtype, overwrite):
    """Invert, edit and reconstruct a sample, offline, and write a before/after picture.

    The default `mini` model ships with icd: it was trained by bench/miniature/recipe.py on a miniature
    world of coloured shapes, and turns a red circle into a blue one. It knows only that world, not
    photos (for those, `icd pull sd15`). Other models edit the bundled photo.
    """
    from icd.models.official import DIRECTIONS

    from ..demo import run_demo
    from ..runner import LocalRunner

    model, manifest = resolve(model, DEMO_MODEL)
    settings = job_settings(LocalRunner(open_model(manifest, device, dtype, DIRECTIONS)), model, overwrite=overwrite)
    for path in run_demo(settings, Path(output)):
        if not quiet():
            click.echo(path)
