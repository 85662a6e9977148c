"""`icd invert` and `icd reconstruct`: photos to latent files (x_T and its record) and back."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from icd.errors import UsageError
from icd.limits import MAX_SEED

from ..naming import naming
from .common import (before_loading, check_engine, check_output, check_size, finish, job_settings, jobs_path,
                     naming_options, open_runner, resolve)
from .options import IMAGE_NAMING, MODEL_RUN, uses

FIELDS = ("stem", "seed", "n")  # what --name may use, in invert and reconstruct alike


@click.command()
@click.argument("images", nargs=-1)
@click.option("--prompt", "--src", "prompt", help="Prompt describing the photos (the source prompt of later edits; "
              "--src as in `icd edit`). Default: each image's caption in the metadata.jsonl of its folder (Hugging "
              "Face style: file_name, text).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the noise added before encoding.")
@click.option("--jobs", "jobs_file", type=click.Path(dir_okay=False), help="A job file: JSON lines or CSV with "
              "one inversion per row (image, source, seed, output; paths relative to the file); - reads it from "
              "standard input (paths relative to the current folder).")
@uses("name", *MODEL_RUN)
def invert(images, prompt, seed, jobs_file, name_template, model, device, dtype, backend, compile, width, height,
           output, overwrite, skip_existing, as_json, no_server):
    """Encode photos into latent files (x_T plus metadata) for fast repeated edits.

    \b
    Examples:
      icd invert photo.jpg --prompt "a pug on the grass"
      icd edit photo.latent.safetensors --tgt "a bear on the grass"
      icd invert photos/ -o latents/                  # captions from photos/metadata.jsonl
    """
    from icd.images import probe_image
    from icd.latents import LATENT_NAME

    from ..batch import plan
    from ..jobs import invert_file

    names = naming(name_template, None, FIELDS, {LATENT_NAME[1:]: LATENT_NAME})  # a template may end with it
    jobs_file = jobs_path(jobs_file)
    items = _job_items(jobs_file, images, prompt, output, names) if jobs_file else \
        _image_items(images, prompt, seed, output, names)
    check_output(output, max(len(items), 2 if jobs_file else 1), latent=True, naming=names)
    _captions(items)
    check_engine(device, dtype, backend, compile, not no_server)
    model, manifest = resolve(model)
    check_size(manifest, width, height)
    reads = [item.source for item in items] + ([Path(jobs_file)] if jobs_file else [])
    items = plan(items, reads, overwrite=overwrite, skip_existing=skip_existing,
                 check=lambda item: probe_image(item.source))
    for item in items:
        item.settings = {"prompt": item.job[1], "seed": item.job[0]}
    before_loading(items, as_json)
    settings = job_settings(open_runner(manifest, device, dtype, ("forward",), backend, compile,
                                        bool(width and height), no_server), model, width, height, overwrite)

    def work(item):
        item_seed, item_prompt = item.job
        return invert_file(settings, item.source, item_prompt, item_seed, item.output), []

    finish(items, work, as_json, settings.clock)


def _job_items(jobs_file: str, images, prompt, output, names) -> list:
    from icd.latents import LATENT_NAME

    from ..batch import Item
    from ..jobfile import InvertJob, read_jobs
    from ..naming import output_path, output_stem
    from ..planning import row_output

    if images or prompt:
        raise UsageError(f"--jobs {jobs_file} holds the images and prompts: drop "
                         f"{', '.join(flag for flag, value in (('IMAGES', images), ('--prompt', prompt)) if value)}")
    folder = Path(jobs_file).parent
    items = []
    for number, job in read_jobs(jobs_file, InvertJob):
        where = f"{jobs_file} row {number}"
        values = {"stem": output_stem(folder / job.image), "seed": job.seed, "n": number}
        written = row_output(jobs_file, job.output, where, "output", LATENT_NAME) if job.output else \
            output_path(output, names.fill("{stem}", values) + LATENT_NAME, True)
        items.append(Item(where, folder / job.image, written, job=(job.seed, job.source), values=values))
    return items


def _image_items(images, prompt, seed, output, names) -> list:
    from icd.latents import LATENT_NAME

    from ..batch import file_items
    from ..jobs import IMAGE_SUFFIXES, expand_inputs

    if not images:
        raise UsageError("no IMAGES: name image files, folders or globs (or give --jobs FILE)")
    items = file_items(expand_inputs(list(images), IMAGE_SUFFIXES), output, names, "{stem}", lambda _: LATENT_NAME,
                       FIELDS, lambda path: {"seed": seed})
    for item in items:
        item.job = (seed, prompt)
    return items


def _captions(items) -> None:
    """Give each item without a prompt its caption from its folder's metadata.jsonl."""
    from ..planning import captions_for

    needing = [item for item in items if not item.job[1]]
    found = captions_for([item.source for item in needing], "--prompt", {item.source: item.label for item in needing})
    for item in needing:
        item.job = (item.job[0], found[item.source])


@click.command()
@click.argument("latents", nargs=-1, required=True)
@uses(*IMAGE_NAMING, *(name for name in MODEL_RUN if name not in ("width", "height")))  # a latent keeps its size
def reconstruct(latents, name_template, format_name, quality, model, device, dtype, backend, compile, output,
                overwrite, skip_existing, as_json, no_server):
    """Decode latent files back into images with their own prompt and w = 0 (the faithful inversion).

    \b
    Example:
      icd reconstruct latents/ --name "{stem}-back" --format jpg --quality 90 -o back/
    """
    from icd.latents import LATENT_SUFFIX, read_latent_info

    from ..batch import file_items, plan
    from ..jobs import StageClock, check_latent, expand_inputs, reconstruct_file
    from ..naming import kept_suffix
    from ..planning import recorded_seed

    names = naming_options(name_template, format_name, quality, FIELDS)
    paths = expand_inputs(list(latents), {LATENT_SUFFIX})
    check_output(output, len(paths), naming=names)
    check_engine(device, dtype, backend, compile, not no_server)
    refs: dict[Path, str] = {}  # each latent's model: -m, else the one it records
    manifest_of = functools.cache(lambda ref: resolve(ref)[1])  # each model's manifest read (and fingerprinted) once
    settings_of: dict[str, object] = {}  # one per model, its runner found or opened at its first item

    def check(item):
        refs[item.source] = model or read_latent_info(item.source).model
        check_latent(item.source, manifest_of(refs[item.source]), refs[item.source])

    named = file_items(paths, output, names, "{stem}-recon", lambda path: names.suffix or kept_suffix(path),
                       FIELDS, lambda path: {"seed": recorded_seed(path)})
    items = plan(named, paths, overwrite=overwrite, skip_existing=skip_existing, check=check)
    before_loading(items, as_json)

    def work(item):
        model_ref = refs[item.source]
        if model_ref not in settings_of:
            runner = open_runner(manifest_of(model_ref), device, dtype, ("reverse",), backend, compile,
                                 no_server=no_server)
            settings_of[model_ref] = job_settings(runner, model_ref, overwrite=overwrite, quality=quality)
            settings_of[model_ref].clock = clock
        return reconstruct_file(settings_of[model_ref], item.source, item.output), []

    clock = StageClock()
    finish(items, work, as_json, clock)
