"""What a command will do, planned before any model loads: its seeds, `icd edit`'s items (from arguments or a job
file), masks, and the order that lets one inversion serve several edits."""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import replace
from pathlib import Path

from icd.errors import ICDError, UsageError
from icd.files import real_path
from icd.limits import MAX_SEED

log = logging.getLogger("icd")


def checked_mask(mask: str | None, masks: dict) -> Path | None:
    """--mask read now into `masks` (the run uses it), so a mask that cannot act stops before the model loads."""
    if mask is None:
        return None
    from icd.masks import selects_everything

    from .jobs import read_mask_once

    try:
        values = read_mask_once(Path(mask), masks)
    except ICDError as err:
        raise UsageError(f"--mask: {err}") from None
    if selects_everything(values):
        log.warning("--mask %s selects the whole image (it is all white): the edit is not confined", mask)
    return Path(mask)


def with_mask_outputs(items: list, save_mask: str | None) -> list:
    """Each item's --save-mask file: the named file for one result, NAME-edit...-mask.png in it for several."""
    if save_mask is None:
        return items
    from icd.images import OUTPUT_SUFFIXES

    from .naming import output_path

    if len(items) > 1 and Path(save_mask).suffix.lower() in OUTPUT_SUFFIXES:
        raise UsageError(f"--save-mask {save_mask} names one file, but there are {len(items)} results: give a folder")
    for item in items:
        written = output_path(save_mask, f"{item.output.stem}-mask.png", len(items) > 1)
        if real_path(written) == real_path(item.output):
            raise UsageError(f"--save-mask {save_mask} is the edit's own output: choose another file")
        item.mask_output = written
    return items


def captions_for(paths: list[Path], flag: str, labels: dict[Path, str] | None = None) -> dict[Path, str]:
    """Each image's caption from the metadata.jsonl of its folder (Hugging Face style: file_name, text), the
    source prompt of an image named without one; an image without one is a usage error naming it."""
    from .jobfile import CAPTIONS_NAME, captions

    folder_captions = functools.cache(captions)
    found = {}
    for path in paths:
        caption = folder_captions(path.parent).get(path.name)
        if caption is None:
            where = (labels or {}).get(path, str(path))
            raise UsageError(f"{where}: no {flag}, and no caption for {path.name} in "
                             f"{path.parent / CAPTIONS_NAME}")
        found[path] = caption
    return found


def seeds_to_run(seeds: tuple[int, ...], count: int | None) -> tuple[int, ...]:
    """--seed (repeatable) and -n N: the seeds to edit with, each once."""
    if count is None:
        return tuple(dict.fromkeys(seeds)) or (0,)
    if len(seeds) > 1:
        raise UsageError("-n counts seeds up from one --seed: give one --seed with -n, or several --seed alone")
    first = seeds[0] if seeds else 0
    if first + count - 1 > MAX_SEED:
        raise UsageError(f"--seed {first} with -n {count} runs past the largest seed, {MAX_SEED}")
    return tuple(range(first, first + count))


def edit_items(paths: list[Path], output: str | None, plans: list, seeds: tuple[int, ...], naming,
               swept: tuple[str, ...] = ()) -> list:
    """One item per input, seed and plan (per target and swept setting), named by `naming` or NAME-edit with
    each varying target, seed and `swept` setting. A latent file carries its own seed: edited once per plan."""
    from .batch import Item
    from .jobs import needs_inversion
    from .naming import distinct_stems, edit_template, kept_suffix, output_path, refuse_clashes

    images = [path for path in paths if needs_inversion([path])]
    latents = [path for path in paths if path not in images]
    many = len(plans) * (len(images) * len(seeds) + len(latents)) > 1
    names = target_names(list(dict.fromkeys(plan.target for plan in plans)))
    varying = {*(("target",) if len(names) > 1 else ()), *(("seed",) if len(seeds) > 1 else ()), *swept}
    default = edit_template(varying)
    items = []
    for group, group_seeds in ((images, seeds), (latents, seeds[:1])):
        suffixes = {path: naming.suffix or kept_suffix(path) for path in group}
        stems = distinct_stems(group, suffixes)
        for path in group:
            suffix = suffixes[path]
            seed_of = recorded_seed(path) if group is latents else None
            for seed in group_seeds:
                for plan in plans:
                    values = plan_values(plan, stems[path], seed if seed_of is None else seed_of, len(items) + 1)
                    name = naming.fill(default, {**values, "target": names[plan.target]}) + suffix
                    items.append(Item(str(path) + _sweep_label(values, varying, group is images), path,
                                      output_path(output, name, many), job=replace(plan, seed=seed), values=values))
    if naming.template is not None:
        refuse_clashes(items, naming.template, ("target", "seed", *swept, "method"))
    return items


def plan_values(plan, stem: str, seed: int | None, number: int) -> dict:
    """What an edit's name may hold ({target} as the prompt: the name takes its slug)."""
    return {"stem": stem, "target": plan.target, "seed": seed, "method": plan.method,
            "strength": "default" if plan.strength is None else plan.strength, "guidance": plan.guidance,
            "tau": plan.tau, "n": number}


def _sweep_label(values: dict, varying: set[str], with_seed: bool) -> str:
    """What tells an item from the others of its input, after its path: (target, seed, swept settings)."""
    if not varying:
        return ""
    parts = [repr(values["target"]), *([f"seed {values['seed']}"] if with_seed else []),
             *(f"{name} {values[name]:g}" for name in SWEPT if name in varying)]
    return f" ({', '.join(parts)})"


def recorded_seed(path: Path) -> int | None:
    """The seed a latent file's header records, for its name; None when unreadable (it fails as its own item)."""
    from icd.latents import read_latent_info

    try:
        return read_latent_info(path).seed
    except ICDError:
        return None


SWEPT = ("guidance", "tau", "strength")  # the settings a comma list sweeps over one inversion


def sweep_values(given: dict) -> list[dict]:
    """Every combination of the swept settings' values, in the order given (None for a setting not given)."""
    lists = [given[name] or (None,) for name in SWEPT]
    return [dict(zip(SWEPT, values)) for values in itertools.product(*lists)]


def sweep_plans(manifest, sources: list, given: dict, targets: tuple[str, ...], sweeps: list[dict],
                flags: dict) -> list:
    """One plan per target and combination of swept values, each resolved as a single edit's would be."""
    from icd.editing import Given, resolve_edit

    return [resolve_edit(manifest, *sources, Given({**given, **values, "target": target}, flags))
            for target in targets for values in sweeps]


def edit_settings(plan, path: Path) -> dict:
    """What an edit runs with, as --dry-run and -v show it (a latent file's prompt and seed are its own)."""
    from icd.latents import is_latent_file

    recorded = plan.record()
    latent = "the latent file's" if is_latent_file(path) else None
    settings = {"source": recorded.pop("source_prompt") or latent, "target": recorded.pop("prompt"),
                "seed": latent or plan.seed, "method": recorded.pop("method"), "guidance": recorded.pop("guidance_w"),
                **recorded}
    if plan.mask is not None:
        settings |= {"mask": str(plan.mask), "keep_outside": plan.keep_outside}
    return settings


def target_names(targets: list[str]) -> dict[str, str]:
    """A distinct file-name part for each target prompt (two that slug alike get -2, -3, ...)."""
    from .naming import slug

    names, taken = {}, set()
    for target in targets:
        name, number = slug(target), 1
        while name.lower() in taken:
            number += 1
            name = f"{slug(target)}-{number}"
        names[target] = name
        taken.add(name.lower())
    return names


def by_inversion(items: list) -> list:
    """The items reordered so that those sharing an inversion follow each other (for the job cache)."""
    first: dict = {}
    for index, item in enumerate(items):
        first.setdefault((item.source, item.job.source, item.job.seed), index)
    return sorted(items, key=lambda item: first[(item.source, item.job.source, item.job.seed)])


def row_output(jobs_file: str, value: str, where: str, column: str, suffixes: tuple[str, ...] | str) -> Path:
    """A file a job row writes: inside the job file's folder (never outside it), with a suffix of its kind."""
    folder = Path(jobs_file).parent
    path = folder / value
    inside = not Path(value).is_absolute() and ".." not in Path(value).parts and \
        real_path(path).is_relative_to(real_path(folder))
    if not inside:
        raise UsageError(f"{where}: {column} {value}: name a file inside the job file's folder ({folder})")
    if not value.lower().endswith(suffixes):
        kinds = suffixes if isinstance(suffixes, str) else ", ".join(suffixes)
        raise UsageError(f"{where}: {column} {value}: must end with {kinds}")
    return path


def edit_job_items(jobs_file: str, manifest, output: str | None, names) -> list:
    """The items of an edit job file, every row checked (exit 2 with its row number) before any model loads; a
    row without an output is named by `names` (default NAME-edit-<target>-s<seed>, in the input's format)."""
    from icd.editing import resolve_edit
    from icd.images import OUTPUT_SUFFIXES
    from icd.latents import is_latent_file

    from .batch import Item
    from .jobfile import EditJob, read_jobs
    from .naming import edit_template, kept_suffix, output_path, output_stem, slug

    folder = Path(jobs_file).parent
    items = []
    for number, job in read_jobs(jobs_file, EditJob):
        where = f"{jobs_file} row {number}"
        path = folder / job.image
        plan = resolve_edit(manifest, job.settings(folder, f"{where}: "))
        if not job.source and not is_latent_file(path):
            raise UsageError(f"{where}: source: needed to edit an image (a latent file carries its own prompt)")
        values = plan_values(plan, output_stem(path), job.seed, number)
        name = names.fill(edit_template({"target", "seed"}), {**values, "target": slug(job.target)}) + \
            (names.suffix or kept_suffix(path))
        target = row_output(jobs_file, job.output, where, "output", tuple(sorted(OUTPUT_SUFFIXES))) if job.output else \
            output_path(output, name, True)
        mask_output = row_output(jobs_file, job.save_mask, where, "save_mask", ".png") if job.save_mask else None
        if mask_output is not None and real_path(mask_output) == real_path(target):
            raise UsageError(f"{where}: save_mask {mask_output} is the edit's own output: choose another file")
        items.append(Item(where, path, target, job=plan, mask_output=mask_output, values=values))
    return items
