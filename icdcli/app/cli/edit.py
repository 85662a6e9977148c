"""`icd edit`: photos or latent files from a source prompt to a target prompt, one `EditPlan` per target and
seed (or per job-file row), resolved once before any model loads."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import click

from icd.errors import ICDError, UsageError
from icd.limits import MAX_SEED
from icd.models.official import DIRECTIONS

from ..grid import layout
from ..naming import FIELDS
from ..planning import edit_settings
from .common import (before_loading, check_engine, check_output, check_size, finish, job_settings, jobs_path,
                     naming_options, open_runner, parsed, resolve, write_grid)
from .options import DEFAULT_MODEL, IMAGE_NAMING, MODEL_RUN, uses

log = logging.getLogger("icd")
# The options a --from record gives defaults to besides the edit settings (those are its first `Given`).
RERUN_OPTIONS = ("model", "dtype", "backend", "width", "height")
# How the command line names the settings, for the errors of `resolve_edit`.
FLAGS = {"method": "--method", "cross_replace": "--cross-replace", "self_replace": "--self-replace",
         "amplify": "--amplify", "blend": "--mask-words/--blend"}


def _rerun_defaults(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--from IMAGE: the settings recorded in a result of `icd edit` come first (options given on the command
    line still win), its run options become this run's defaults, and its input (a path relative to the
    result's folder) the input when none is named."""
    if value is None:
        return None
    from icd.editing import recorded
    from icd.images import read_metadata
    from icd.latents import LATENT_SUFFIX

    folder = Path(value).parent
    try:
        record = read_metadata(value)
        if record.get("command") != "edit":
            raise ICDError(f"{value} holds no parameters of `icd edit`")
        ctx.meta["icd.rerun"] = recorded(record, folder)
        from_latent = str(record.get("source", "")).endswith(LATENT_SUFFIX)  # it keeps the size it was inverted at
        options = {name: record[name] for name in RERUN_OPTIONS if record.get(name) is not None
                   and not (from_latent and name in ("width", "height"))}
        for name, value_ in options.items():
            if not isinstance(value_, int if name in ("width", "height") else str) or isinstance(value_, bool):
                raise ValueError(f"its recorded {name} is {value_!r}")
        if not isinstance(record.get("source", ""), str):
            raise ValueError(f"its recorded source is {record['source']!r}, not a path")
    except (ICDError, ValueError) as err:
        raise click.BadParameter(str(err), ctx, param) from None
    ctx.default_map = {**(ctx.default_map or {}), **options}
    ctx.meta["icd.rerun_input"] = folder / record["source"] if record.get("source") else None
    _warn_if_mask_changed(value, ctx.meta["icd.rerun"].values.get("mask"), record.get("mask_hash"))
    return value


def _warn_if_mask_changed(result: str, mask: Path | None, recorded_hash) -> None:
    """A rerun reads the mask file as it is now: say so when it is not the one the result recorded."""
    from ..jobs import file_hash

    if mask is None or not isinstance(recorded_hash, str):
        return
    try:
        now = file_hash(mask)
    except ICDError:
        return  # a mask that cannot be read is refused with the other checks
    if now != recorded_hash:
        log.warning("--from %s: its mask %s has changed since (hash %s, recorded %s): the rerun uses it as it is "
                    "now", result, mask, now, recorded_hash)


@click.command()
@click.argument("inputs", nargs=-1)
@click.option("--src", "--prompt", "source", help="Prompt describing the input photos (--prompt as in `icd invert`). "
              "Default: each image's caption in the metadata.jsonl of its folder; a latent file carries its own.")
@click.option("--tgt", "targets", multiple=True, help="Prompt describing the wanted result (required). Repeatable: "
              "one output per target, NAME-edit-<target>.png, all from one inversion.")
@uses("method", "guidances", "taus")
@click.option("--seed", "seeds", type=click.IntRange(0, MAX_SEED), multiple=True,
              help="Seed of the noise added before encoding (default 0). Repeatable: one output per seed, "
                   "NAME-edit-s<seed>.png.")
@click.option("-n", "--count", type=click.IntRange(1, 10_000), help="Edit with N seeds: --seed, --seed+1, ...")
@uses("cross_replace", "self_replace", "amplify")
@click.option("--mask-words", "--blend", "blend", metavar="SRC_WORDS:TGT_WORDS", help="p2p: change only where "
              "these words attend (LocalBlend), e.g. --mask-words pug:bear (--blend is the older name). The map "
              "is as coarse as the UNet's attention (16x16 at 512 px, 4x4 on mini); icd says when it selects "
              "nothing or everything.")
@click.option("--mask", type=click.Path(dir_okay=False), metavar="FILE", help="Any method: a picture of where the "
              "edit may act: white changes, grey partly, black keeps (resized to the image). After every step the "
              "latent outside it is the source's at that step.")
@click.option("--keep-outside/--no-keep-outside", default=None, help="With --mask: the pixels outside the mask "
              "are the input photo's own (the mask feathered inwards by 2 working pixels), and inside it the "
              "photo's grain and detail come back wherever the edit changed nothing, so no seam shows. "
              "Default: on.")
@click.option("--save-mask", type=click.Path(), metavar="PATH", help="Write the map the edit was "
              "confined to (--mask or --mask-words, on the latent grid) as a PNG of the image's size: a .png file "
              "for one result, else a folder (NAME-edit...-mask.png in it).")
@uses("strengths")
@click.option("--grid", type=click.Path(dir_okay=False), metavar="FILE", help="Also write a contact sheet of the "
              "results: a row per input (and per target or seed when the columns are others), its photo first, "
              "each result labelled with what differs: the swept settings, else the seeds, else the targets.")
@click.option("--from", "from_image", metavar="IMAGE", is_eager=True, callback=_rerun_defaults,
              help="Rerun the edit recorded in a result of `icd edit`: its input, prompts and every setting, "
                   "unless given here.")
@click.option("--jobs", "jobs_file", type=click.Path(dir_okay=False), help="A job file: JSON lines or CSV with "
              "one edit per row (image, source, target, seed, method, guidance, tau, strength, mask_words (or "
              "blend), amplify, mask, keep_outside, output; paths relative to the file; default output "
              "NAME-edit-<target>-s<seed> in -o), all checked before the model loads; - reads it from standard "
              "input (paths relative to the current folder).")
@uses(*IMAGE_NAMING, *MODEL_RUN)
def edit(inputs, source, targets, method, guidance, tau, seeds, count, cross_replace, self_replace, amplify, blend,
         mask, keep_outside, save_mask, strength, grid, from_image, jobs_file, name_template, format_name, quality,
         model, device, dtype, backend, compile, width, height, output, overwrite, skip_existing, as_json, no_server):
    """Edit photos (or latent files from `icd invert`) from a source prompt to a target prompt.

    INPUTS are image files, folders of images, globs, or .latent.safetensors files.

    \b
    Prompt-to-Prompt windows: with K decoding steps (3 or 4), cross-attention is
    replaced on the first floor(cross*(K+1)) steps and self-attention on the first
    floor(self*K) steps. With 4 steps the defaults 0.3/0.6 give 1 and 2 steps;
    a fraction that maps to no step at all is warned about.

    \b
    Examples:
      icd edit photo.jpg --src "a pug" --tgt "a bear"
      icd edit cat.png --src "a cat on a sofa" --tgt "a tiger on a sofa" --mask-words cat:tiger
      icd edit cat.png --src "a cat on a sofa" --tgt "a tiger on a sofa" --mask cat-mask.png
      icd edit cat.png --src "a cat" --tgt "a tiger" --strength 0.8 --save-mask used.png
      icd edit photos/*.jpg --src "a dog" --tgt "a wolf" --method none -o wolves/
      icd edit photo.jpg --src "a pug" --tgt "a bear" --tgt "a lion" -n 3 -o variants/
      icd edit photo.jpg --src "a pug" --tgt "a bear" --strength 0.25,0.5,0.75 --grid sheet.png -o sweep/
      icd edit photos/ --src "a dog" --tgt "a wolf" --name "{stem}-wolf-{seed}" --format webp -o out/ --dry-run
      icd edit --jobs edits.jsonl -o out/
      icd edit --jobs - -o out/ < edits.csv                            # job rows from stdin
      icd edit --from photo-edit.png --guidance 12 -o stronger.png
    """
    ctx = click.get_current_context()
    given = {"source": source, "method": method, "guidance": guidance, "tau": tau, "cross_replace": cross_replace,
             "self_replace": self_replace, "amplify": amplify or None, "blend": blend, "mask": mask,
             "keep_outside": keep_outside, "strength": strength}
    names = naming_options(name_template, format_name, quality, FIELDS)
    jobs_file = jobs_path(jobs_file)
    if jobs_file:
        if grid:
            raise UsageError("--grid lays out the inputs, targets, seeds and settings of a command line: not with "
                             "--jobs")
        if from_image:
            raise UsageError("--from reruns one recorded edit: not with --jobs, whose rows hold the edits")
        model, manifest, items, paths = _job_items(jobs_file, given, inputs, targets, seeds, count, save_mask, model,
                                                   output, names, device, dtype, backend, compile, no_server)
        masks, sheet = {}, None
    else:
        model, manifest, items, paths, masks, varying = _command_items(ctx, given, inputs, targets, seeds, count,
                                                                       save_mask, model, output, names, device, dtype,
                                                                       backend, compile, no_server)
        sheet = None if grid is None else layout(grid, items, varying)
    for item in items:
        item.settings = edit_settings(item.job, item.source)
    _run(items, paths + ([Path(jobs_file)] if jobs_file else []), manifest, model, masks, sheet, device, dtype,
         backend, compile, width, height, overwrite, skip_existing, as_json, no_server, quality)


def _job_items(jobs_file, given, inputs, targets, seeds, count, save_mask, model, output, names, device, dtype,
               backend, compile, no_server):
    """The items of `--jobs FILE` (`-`: standard input): its rows hold the inputs, prompts, seeds and settings."""
    from ..planning import edit_job_items

    named = {"INPUTS": inputs, "--src": given["source"], "--tgt": targets, "--seed": seeds, "-n": count,
             "--mask": given["mask"], "--save-mask": save_mask, "--strength": given["strength"],
             **{FLAGS.get(name, "--" + name.replace("_", "-")): given[name] for name in given
                if name not in ("source", "mask", "strength")}}
    if dropped := [flag for flag, value in named.items() if value not in (None, ())]:
        raise UsageError(f"--jobs {jobs_file} holds the inputs, prompts and seeds: drop {', '.join(dropped)}")
    check_output(output, 2)
    check_engine(device, dtype, backend, compile, not no_server)
    model, manifest = resolve(model)
    check_size(manifest, click.get_current_context().params["width"], click.get_current_context().params["height"])
    items = edit_job_items(jobs_file, manifest, output, names)
    return model, manifest, items, [item.source for item in items]


def _command_items(ctx, given, inputs, targets, seeds, count, save_mask, model, output, names, device, dtype,
                   backend, compile, no_server):
    """The model and the items of an edit named on the command line: one plan per target and swept setting (the
    --from record first, then the options given here), one item per input, plan and seed; and the dimensions
    that vary between an input's results (for --grid)."""
    from icd.editing import parse_amplify, parse_blend
    from icd.latents import LATENT_SUFFIX

    from .. import planning
    from ..jobs import IMAGE_SUFFIXES, expand_inputs, needs_inversion

    rerun = ctx.meta.get("icd.rerun")
    anywhere = {name: given.get(name) if given.get(name) is not None else rerun.values.get(name) if rerun else None
                for name in ("source", "target", "seed", "mask", "blend")}
    inputs = inputs or ((ctx.meta["icd.rerun_input"],) if ctx.meta.get("icd.rerun_input") else ())
    if not inputs:
        raise UsageError("no INPUTS: name image or latent files, folders or globs")
    targets = tuple(dict.fromkeys(targets)) or ((anywhere["target"],) if anywhere["target"] else ())
    if not targets:
        raise UsageError("--tgt is required: the prompt describing the wanted result")
    seeds = planning.seeds_to_run(seeds or ((anywhere["seed"],) if anywhere["seed"] is not None else ()), count)
    paths = expand_inputs(list(inputs), IMAGE_SUFFIXES | {LATENT_SUFFIX})
    images = [path for path in paths if needs_inversion([path])]
    captions = planning.captions_for(images, "--src") if images and not anywhere["source"] else {}
    if not images and (ctx.params["width"] or ctx.params["height"]):
        raise UsageError("--width/--height apply to images: a latent file keeps the size it was inverted at")
    if given["keep_outside"] is not None and anywhere["mask"] is None:
        raise UsageError(f"--{'' if given['keep_outside'] else 'no-'}keep-outside applies with --mask")
    if save_mask and anywhere["mask"] is None and anywhere["blend"] is None:
        raise UsageError("--save-mask needs --mask or --mask-words: nothing else confines an edit")
    sweeps = planning.sweep_values(given)
    check_output(output, len(targets) * len(sweeps) * (len(images) * len(seeds) + len(paths) - len(images)),
                 naming=names)
    check_engine(device, dtype, backend, compile, not no_server)
    given = {**given, "amplify": parsed(parse_amplify, given["amplify"], "--amplify"),
             "blend": parsed(parse_blend, given["blend"], "--mask-words")}
    masks = {}  # each mask file's values, read once in the checks and used by the run
    planning.checked_mask(anywhere["mask"], masks)
    model, manifest = resolve(model or _recorded_model([path for path in paths if path not in images], bool(images)))
    check_size(manifest, ctx.params["width"], ctx.params["height"])
    plans = planning.sweep_plans(manifest, [rerun] if rerun is not None else [], given, targets, sweeps, FLAGS)
    swept = tuple(name for name in planning.SWEPT if given[name] and len(given[name]) > 1)
    items = planning.with_mask_outputs(planning.edit_items(paths, output, plans, seeds, names, swept), save_mask)
    for item in items:
        if item.source in captions:
            item.job = replace(item.job, source=captions[item.source])
    varying = (*(("target",) if len(targets) > 1 else ()), *(("seed",) if len(seeds) > 1 else ()), *swept)
    return model, manifest, items, paths, masks, varying


def _recorded_model(latents: list[Path], with_images: bool) -> str | None:
    """Without -m, the model the latent files were inverted with (None: the default model): one for all, and
    for images named too, the default one."""
    from icd.errors import InputError
    from icd.latents import read_latent_info

    recorded = set()
    for path in latents:
        try:
            recorded.add(read_latent_info(path).model)
        except InputError:
            continue  # a broken file fails as its own item
    if with_images and recorded - {DEFAULT_MODEL}:
        recorded.add(f"{DEFAULT_MODEL} (the default, for the images)")
    if len(recorded) > 1:
        raise UsageError(f"the inputs need different models ({', '.join(sorted(recorded))}): name one with -m, or "
                         "edit them in separate runs")
    return next(iter(recorded), None)


def _run(items, reads, manifest, model_ref, masks, sheet, device, dtype, backend, compile, width, height, overwrite,
         skip_existing, as_json, no_server, quality) -> None:
    """Check every item's files (headers, masks, outputs, the --grid sheet; `reads`: the inputs and job file),
    then open the runner and edit the runnable ones."""
    from .. import grid, jobs, planning
    from ..batch import plan

    def check(item):
        jobs.check_input(item.source, manifest, model_ref)
        jobs.check_edit(item.job, masks)

    masks_read = {item.job.mask for item in items if item.job.mask is not None}
    items = plan(items, [*reads, *masks_read], overwrite=overwrite, skip_existing=skip_existing, check=check)
    if sheet is not None:
        grid.check_place(sheet, items, [*reads, *masks_read], overwrite)
    before_loading(items, as_json, None if sheet is None else lambda as_json: grid.describe(sheet, as_json))
    directions = DIRECTIONS if jobs.needs_inversion([item.source for item in items]) else ("reverse",)
    runner = open_runner(manifest, device, dtype, directions, backend, compile, bool(width and height), no_server)
    settings = job_settings(runner, model_ref, width, height, overwrite, quality)
    settings.masks.update(masks)
    finish(planning.by_inversion(items),
           lambda item: jobs.edit_file(settings, item.source, item.job, item.output, item.mask_output), as_json,
           settings.clock, None if sheet is None else lambda report: write_grid(sheet, report, overwrite, as_json))
