"""The steps that several commands share: logging, the checks before a model loads, opening the runner (a
running `icd serve`, else the model in this process) and running a planned batch."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from icd.errors import ModelError, UsageError

from .options import DEFAULT_MODEL, DEMO_MODEL, threads_given

if TYPE_CHECKING:
    from icd.models.manifest import Manifest

log = logging.getLogger("icd")


def quiet() -> bool:
    return not logging.getLogger("icd").isEnabledFor(logging.WARNING)


def resolve(model_ref: str | None, default: str = DEFAULT_MODEL) -> tuple[str, Manifest]:
    """The model named, or `default`, and its manifest: cheap (no weights), so every later check can use it
    before anything loads. A default model that is not there says how to get it, and how to try icd
    without it."""
    from icd.models.hub import resolve_model

    try:
        return model_ref or default, resolve_model(model_ref or default)
    except ModelError as err:
        if model_ref:
            raise
        raise ModelError(f"{err}; or try icd offline with the shipped demonstration model: -m {DEMO_MODEL} (or "
                         f"set ICD_MODEL={DEMO_MODEL})") from None


def parsed(parse: Callable, value, flag: str):
    """`parse(value)`, its ValueError a usage error of `flag`."""
    try:
        return parse(value)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=flag) from None


def check_size(manifest: Manifest, width: int | None, height: int | None) -> None:
    from icd.images import check_multiple
    from icd.models.geometry import size_multiple

    multiple = size_multiple(manifest)
    if multiple is not None:
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                check_multiple(name, value, multiple)


def check_output(output: str | None, count: int, *, latent: bool = False, naming=None) -> None:
    """-o must name what the command writes: an image (or a latent file for invert), or a folder; a file
    named for one result leaves no name to --name, and is in --format's format."""
    if output is None:
        return
    from icd.images import OUTPUT_SUFFIXES
    from icd.latents import LATENT_NAME, LATENT_SUFFIX

    from ..naming import FORMATS, KNOWN_SUFFIXES, WRITTEN_SUFFIXES

    path = Path(output)
    names_file = path.suffix.lower() in OUTPUT_SUFFIXES or output.endswith(LATENT_SUFFIX)
    if latent and names_file and not output.endswith(LATENT_NAME):
        raise UsageError(f"-o {output}: invert writes latent files: name one NAME{LATENT_NAME}, or a folder")
    if not latent and output.endswith(LATENT_SUFFIX):
        raise UsageError(f"-o {output}: this command writes images: name a {WRITTEN_SUFFIXES} file, or a folder")
    if not names_file and path.suffix and not path.is_dir() and path.suffix.lower()[1:].isalpha() \
            and len(path.suffix) <= 5:
        raise UsageError(f"-o {output}: unknown image format {path.suffix!r} (use {KNOWN_SUFFIXES}, or name a "
                         "folder)")
    if names_file and count > 1:
        raise UsageError(f"-o {output} names one file, but there are {count} results: give a folder")
    if names_file and naming is not None and naming.template is not None:
        raise UsageError(f"-o {output} names the result's file: --name names results in a folder")
    if names_file and naming is not None and naming.suffix not in (None, FORMATS.get(path.suffix.lower()[1:])):
        raise UsageError(f"-o {output} is not a {naming.suffix} file, which --format asks for")
    if path.is_file() and not names_file:
        raise UsageError(f"-o {output} is a file: give a folder for the results")


def check_engine(device: str, dtype: str, backend: str, compile: bool, server_may_check: bool = False) -> None:
    """The backend options fit together, and the device exists and takes the dtype. That takes torch, which a
    command served by `icd serve` never imports: with `server_may_check` and a server's socket present, the
    device and dtype are left to the server's check (a server that cannot take them is not used) and to the
    model's opening in this process."""
    from icd_export.registry import check_options

    check_options(backend, compile)
    if server_may_check:
        from ..serve.sockets import sockets

        if sockets():
            return
    from icd.models.loading import resolve_device, resolve_dtype

    from ..distributed import local_device

    resolve_dtype(dtype, resolve_device(local_device(device)))


def open_model(model_ref: str | Manifest, device: str, dtype: str, directions: tuple[str, ...] = (),
               backend: str = "auto", compile: bool = False, static_shapes: bool = False, threads: int | None = None):
    """The session for a model, on the command's --threads; a failure here ends the command with one line (via
    `Main`). Under `accelerate launch` or `torchrun`, `auto` means this process's own GPU."""
    from ..distributed import local_device
    from ..session import open_session, quiet_libraries

    quiet_libraries()
    return open_session(model_ref, local_device(device), dtype, backend, compile, static_shapes, directions,
                        threads or threads_given())


def open_runner(manifest: Manifest, device: str, dtype: str, directions: tuple[str, ...], backend: str,
                compile: bool, static_shapes: bool = False, no_server: bool = False):
    """What runs the jobs: a running `icd serve` of this model, device and dtype (said once), falling back to
    this process if it goes away; else, or with --no-server, the model opened here."""
    from ..runner import LocalRunner
    from ..serve.client import served_or_here

    return served_or_here(manifest, device, dtype, backend, compile, no_server, lambda: LocalRunner(
        open_model(manifest, device, dtype, directions, backend, compile, static_shapes)))


def jobs_path(jobs_file: str | None) -> str | None:
    """--jobs FILE, where `-` is standard input."""
    from ..jobfile import STDIN, STDIN_NAME

    return STDIN_NAME if jobs_file == STDIN else jobs_file


def job_settings(runner, model_ref: str, width: int | None = None, height: int | None = None,
                 overwrite: bool = False, quality: int | None = None):
    from icd.limits import DEFAULT_QUALITY

    from ..jobs import Settings

    return Settings(runner=runner, model_ref=model_ref, width=width, height=height, overwrite=overwrite,
                    quality=quality or DEFAULT_QUALITY)


def dry_run() -> bool:
    return bool(click.get_current_context().meta.get("icd.dry_run"))


def before_loading(items, as_json: bool, extra: Callable[[bool], None] | None = None) -> None:
    """Where a command stops before it opens a model: a --json-log that would replace a file unasked is
    refused, --dry-run prints the plan (and `extra`, e.g. the grid's line) and exits; a batch with nothing to
    run reports its items and exits."""
    ctx = click.get_current_context()
    log_path = ctx.meta.get("icd.json_log")
    if log_path and Path(log_path).exists() and not ctx.params.get("overwrite"):
        raise UsageError(f"--json-log {log_path} exists (use --overwrite to replace it)")
    if dry_run():
        from ..batch import show_plan

        report = show_plan(items, as_json)
        if extra is not None:
            extra(as_json)
        sys.exit(report.exit_code)
    if not any(item.runnable for item in items):
        finish(items, None, as_json)


def finish(items, work, as_json: bool, clock=None, after: Callable[[object], None] | None = None) -> None:
    """Run this process's share of the planned items (all of them, unless several processes were launched:
    each plans the whole batch, so names agree, and runs every world-th item), write the --json-log, then
    `after` (with the report: e.g. the grid), and exit with the batch's code. `clock`: the jobs' StageClock,
    which times each item's stages."""
    from ..batch import run
    from ..distributed import merge_json_log, process_share

    log_path = click.get_current_context().meta.get("icd.json_log")  # checked in before_loading
    report = run(process_share(items), work, as_json=as_json, quiet=quiet(),
                 stages=None if clock is None else clock.take)
    if log_path:
        merge_json_log(log_path, report.records)
    if after is not None:
        after(report)
    sys.exit(report.exit_code)


def write_grid(sheet, report, overwrite: bool, as_json: bool) -> None:
    """--grid's sheet after the batch; a sheet that cannot be written fails the command (exit 1)."""
    from icd.errors import ICDError

    from ..batch import error_line
    from ..grid import write

    try:
        written = write(sheet, overwrite, as_json, quiet())
    except ICDError as err:
        written = False
        error_line(f"--grid {sheet.path}: {err}")
    else:
        if not written:
            error_line(f"--grid {sheet.path}: no result to show: not written")
    report.failed += not written


def naming_options(template: str | None, format_name: str | None, quality: int | None, fields: tuple[str, ...]):
    """--name, --format and --quality checked together, before anything loads."""
    from ..naming import naming

    names = naming(template, format_name, fields)
    if quality is not None and names.suffix == ".png":
        raise UsageError("--quality applies to JPEG and WebP results, not PNG")
    return names
