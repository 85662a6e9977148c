"""`icd eval`: an editing benchmark end to end (edits, metrics, tables, pictures), resumable, on any model.

The options shared with `icd edit` are declared here again (this module cannot import `cli`, which imports it
to register the command); errors become their one line and exit code in the `icd` group."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from icd.errors import UsageError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
log = logging.getLogger("icd")


def _setting(ctx: click.Context, param: click.Parameter, value: str | None):
    """An edit setting checked as `--sweep` checks the same name."""
    from .evaluate import PARSERS

    if value is None:
        return None
    try:
        return PARSERS[param.name](value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None


def _verbosity(quiet: bool, verbose: bool) -> None:
    from .batch import quiet_libraries

    if quiet and verbose:
        raise UsageError("-q and -v cannot be used together")
    logging.getLogger("icd").setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    quiet_libraries()


def _setting_option(name: str, metavar: str, text: str):
    return click.option(f"--{name}", metavar=metavar, callback=_setting, help=text)


@click.command("eval", context_settings=CONTEXT)
@click.argument("dataset", type=click.Path())
@click.option("-m", "--model", required=True, envvar="ICD_MODEL", show_envvar=True,
              help="The model to evaluate: a preset, `mini`, a model in the cache or a model folder.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the edits, results.jsonl, "
              "summary.json/.md and the pictures; rerunning the same command continues there.")
@click.option("--images", type=click.Path(), help="The authors' CSVs: the folder of their images.")
@click.option("--types", help="Only these editing types, comma-separated (PIE-Bench: 0-9 or names such as "
              "change_object; a folder data set: its `type` values).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N items (after --types).")
@click.option("--method", type=click.Choice(["p2p", "swap", "none"]), help="As `icd edit`. Default: the model's.")
@_setting_option("guidance", "W", "As `icd edit`: w, the classical CFG scale minus one. Default: the model's.")
@_setting_option("tau", "T", "As `icd edit`: dynamic guidance threshold. Default: the model's.")
@_setting_option("strength", "S", "As `icd edit`: one knob from 0 (keep) to 1 (follow the target).")
@_setting_option("cross-replace", "F", "p2p: cross-attention window (default 0.3).")
@_setting_option("self-replace", "F", "p2p: self-attention window (default 0.6).")
@click.option("--amplify", multiple=True, metavar="WORD=F", help="p2p: scale a target word's attention.")
@click.option("--mask-use", type=click.Choice(["none", "mask", "words"]), help="Where the edit may act: none "
              "(the default: the benchmarks' protocol), mask (the data set's region, as --mask) or words (its "
              "blend words, as --mask-words; p2p). Items without one are edited without.")
@click.option("--keep-outside/--no-keep-outside", default=None, help="With --mask-use mask: the photo's pixels "
              "outside the region (default on, as `icd edit --mask`).")
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME=V1,V2,...", help="Every value of a setting "
              "(method, guidance, tau, strength, cross_replace, self_replace, mask_use, keep_outside); repeat it "
              "for every combination. Each photo is inverted once and every setting decoded from it.")
@click.option("--baseline", type=click.Choice(["ddim"]), help="Also edit with the model's teacher on a --steps "
              "DDIM grid (inversion and edit), with the same settings and Prompt-to-Prompt control.")
@click.option("--steps", type=click.IntRange(2, 1000), help="--baseline's DDIM steps (default 50).")
@click.option("--metrics", default="auto", show_default=True, help="Sets (pie, authors, checks) and metric "
              "names, comma-separated. auto: PIE-Bench's on PIE-Bench, the authors' on their CSVs, both (and the "
              "data set's checks) on a folder.")
@click.option("--clip-model", help="CLIP for the CLIP metrics: hub id or folder [openai/clip-vit-large-patch14].")
@click.option("--dino-model", help="DINO ViT-B/8 for the structure distance [facebook/dino-vitb8].")
@click.option("--dinov2-model", help="DINOv2 for the authors' DINOv2 metric [facebook/dinov2-base].")
@click.option("--image-reward-model", help="ImageReward's checkpoint [ImageReward-v1.0].")
@click.option("--plot", metavar="EDITING:PRESERVATION", help="The trade-off plot's metrics (default: CLIP-T or "
              "CLIP Whole against DINOv2, CLIP-I or PSNR, whichever were measured).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Seed of the noise added before encoding.")
@click.option("--width", type=click.IntRange(8, 8192), help="Working width (default: as `icd edit`; the "
              "authors' CSVs: the model's resolution, square, as their protocol).")
@click.option("--height", type=click.IntRange(8, 8192), help="Working height.")
@click.option("--device", default="auto", show_default=True, envvar="ICD_DEVICE", show_envvar=True,
              help="auto, cpu, cuda or cuda:N (under torchrun: each process's own GPU). The metrics run there too.")
@click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto", show_default=True,
              envvar="ICD_DTYPE", show_envvar=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "tensorrt"]), default="auto",
              show_default=True, envvar="ICD_BACKEND", show_envvar=True)
@click.option("--compile", is_flag=True, help="torch backend: torch.compile the UNets.")
@click.option("--no-server", is_flag=True, help="Load the model here even when `icd serve` serves it.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no table on stdout: errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Also details, the libraries' warnings, tracebacks.")
def evaluate(dataset, model, output, images, types, limit, method, guidance, tau, strength, cross_replace,
             self_replace, amplify, mask_use, keep_outside, sweeps, baseline, steps, metrics, clip_model, dino_model,
             dinov2_model, image_reward_model, plot, seed, width, height, device, dtype, backend, compile, no_server,
             quiet, verbose):
    """Evaluate editing on a benchmark: every item edited and measured, the tables printed and written.

    DATASET is a PIE-Bench folder (mapping_file.json and annotation_images/), one of the iCD authors' CSV
    files (with --images), or a folder with metadata.jsonl (file_name, source, target, optional id, type,
    mask, mask_words, target_image, palettes, checks).

    \b
    Examples:
      icd eval PIE-Bench_v1/ -m sd15 -o eval-pie/
      icd eval editing_pie_bench_all.csv --images pie_bench_420_images/ -m sd15 -o eval-authors/ \\
          --mask-use words --sweep guidance=5,11,19 --baseline ddim
      icd eval mini-sets/two-objects/ -m mini -o eval-mini/ --metrics checks --sweep mask_use=none,mask
    """
    from .evaluate import EvalRun, parse_sweeps, resolve_settings, run_evaluation, solver_runners
    from .jobfile import parse_amplify

    _verbosity(quiet, verbose)
    if steps is not None and baseline is None:
        raise UsageError("--steps applies to --baseline ddim")
    swept = parse_sweeps(sweeps)
    if keep_outside is not None and mask_use != "mask" and "mask_use" not in swept:
        raise UsageError(f"--{'' if keep_outside else 'no-'}keep-outside applies with --mask-use mask")
    try:
        amplified = parse_amplify(amplify)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--amplify") from None
    chosen_plot = _plot_axes(plot)
    data, items, manifest = _inputs(dataset, images, types, limit, model, width, height)
    given = {"method": method, "guidance": guidance, "tau": tau, "strength": strength, "cross_replace": cross_replace,
             "self_replace": self_replace, "mask_use": mask_use, "keep_outside": keep_outside}
    solvers = ["icd"] + ([f"ddim{steps or 50}"] if baseline else [])
    settings = resolve_settings(manifest, given, swept, solvers, amplified)
    evaluator = _evaluator(metrics, data, items, device, {"clip": clip_model, "dino": dino_model,
                                                           "dinov2": dinov2_model, "image_reward": image_reward_model})
    run = EvalRun(data, items, settings, Path(output), model, manifest, evaluator,
                  solver_runners(manifest, device, dtype, backend, compile, no_server, steps or 50), seed, width,
                  height, chosen_plot, quiet)
    sys.exit(run_evaluation(run))


def _plot_axes(plot: str | None) -> tuple[str, str] | None:
    if plot is None:
        return None
    editing, sep, keeping = plot.partition(":")
    if not sep or not editing.strip() or not keeping.strip():
        raise click.BadParameter(f"'{plot}' is not EDITING:PRESERVATION, e.g. clip_t:dinov2", param_hint="--plot")
    return editing.strip(), keeping.strip()


def _inputs(dataset: str, images: str | None, types: str | None, limit: int | None, model: str, width, height):
    """The data set and its selected items, and the model's manifest (no weights loaded), checked."""
    from icd.evaluation.datasets import open_dataset, select
    from icd.images import check_multiple
    from icd.models.geometry import size_multiple
    from icd.models.hub import resolve_model

    from .batch import error_line

    data = open_dataset(dataset, images)
    for problem in data.problems:
        error_line(problem)
    items = select(data, [kind.strip() for kind in types.split(",") if kind.strip()] if types else None, limit)
    if not items:
        raise UsageError(f"{dataset}: no items to evaluate")
    manifest = resolve_model(model)
    multiple = size_multiple(manifest)
    for name, value in (("width", width), ("height", height)):
        if value is not None and multiple is not None:
            check_multiple(name, value, multiple)
    return data, items, manifest


def _evaluator(spec: str, data, items, device: str, models: dict):
    """The metrics asked for, their models loaded; a model that cannot be is one line, its metrics dropped."""
    from icd.evaluation.metrics import Evaluator, metric_names
    from icd.models.loading import resolve_device

    from .distributed import local_device

    names = metric_names(spec, data.kind, any(item.checks for item in items))
    evaluator = Evaluator(names, models, str(resolve_device(local_device(device))))
    for line in evaluator.unavailable:
        log.warning(line)
    if not evaluator.names:
        raise UsageError("no metric can be measured here (see the lines above)")
    return evaluator
