"""`icd eval`: an editing benchmark end to end (edits, metrics, tables, pictures), resumable, on any model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from icd.core.schedule import DDIM_STEPS
from icd.errors import UsageError
from icd.evaluation import DEFAULT_MODELS, MASK_USES, SWEEPABLE
from icd.limits import MAX_SEED

from .common import check_size, open_model, open_runner, parsed, quiet, resolve
from .options import threads_given, uses

log = logging.getLogger("icd")


@click.command("eval")
@click.argument("dataset", type=click.Path())
@uses("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the edits, results.jsonl, "
              "summary.json/.md and the pictures; rerunning the same command continues there.")
@click.option("--images", type=click.Path(), help="The authors' CSVs: the folder of their images.")
@click.option("--types", help="Only these editing types, comma-separated (PIE-Bench: 0-9 or names such as "
              "change_object; a folder data set: its `type` values).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N items (after --types).")
@uses("method", "guidance", "tau", "strength", "cross_replace", "self_replace", "amplify")
@click.option("--mask-use", type=click.Choice(MASK_USES), help="Where the edit may act: none "
              "(the default: the benchmarks' protocol), mask (the data set's region, as --mask) or words (its "
              "blend words, as --mask-words; p2p). Items without one are edited without.")
@click.option("--keep-outside/--no-keep-outside", default=None, help="With --mask-use mask: the photo's pixels "
              "outside the region (default on, as `icd edit --mask`).")
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME=V1,V2,...", help="Every value of a setting "
              f"({', '.join(SWEEPABLE)}); repeat it for every combination. Each photo is inverted once and every "
              "setting decoded from it.")
@click.option("--baseline", type=click.Choice(["ddim"]), help="Also edit with the model's teacher on a --steps "
              "DDIM grid (inversion and edit), with the same settings and Prompt-to-Prompt control.")
@click.option("--steps", type=click.IntRange(2, 1000), help=f"--baseline's DDIM steps (default {DDIM_STEPS}).")
@click.option("--metrics", default="auto", show_default=True, help="Sets (pie, authors, checks) and metric "
              "names, comma-separated. auto: PIE-Bench's on PIE-Bench, the authors' on their CSVs, both (and the "
              "data set's checks) on a folder.")
@click.option("--clip-model", help=f"CLIP for the CLIP metrics: hub id or folder [{DEFAULT_MODELS['clip']}].")
@click.option("--dino-model", help=f"DINO ViT-B/8 for the structure distance [{DEFAULT_MODELS['dino']}].")
@click.option("--dinov2-model", help=f"DINOv2 for the authors' DINOv2 metric [{DEFAULT_MODELS['dinov2']}].")
@click.option("--image-reward-model", help=f"ImageReward's checkpoint [{DEFAULT_MODELS['image_reward']}].")
@click.option("--plot", metavar="EDITING:PRESERVATION", help="The trade-off plot's metrics (default: CLIP-T or "
              "CLIP Whole against DINOv2, CLIP-I or PSNR, whichever were measured).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the noise added before encoding.")
@uses("width", "height", "device", "dtype", "backend", "compile", "threads", "no_server", "quiet",
      "verbose")
def evaluate(dataset, model, output, images, types, limit, method, guidance, tau, strength, cross_replace,
             self_replace, amplify, mask_use, keep_outside, sweeps, baseline, steps, metrics, clip_model, dino_model,
             dinov2_model, image_reward_model, plot, seed, width, height, device, dtype, backend, compile, no_server):
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
    from icd.editing import parse_amplify
    from icd.models.threads import use_cpu_threads

    from ..session import quiet_libraries
    from ..evaluate import EvalRun, parse_sweeps, resolve_settings, run_evaluation

    quiet_libraries()
    use_cpu_threads(threads_given())  # also the metrics' models, which run here when the edits are served
    if steps is not None and baseline is None:
        raise UsageError("--steps applies to --baseline ddim")
    swept = parse_sweeps(sweeps)
    if keep_outside is not None and mask_use != "mask" and "mask_use" not in swept:
        raise UsageError(f"--{'' if keep_outside else 'no-'}keep-outside applies with --mask-use mask")
    amplified = parsed(parse_amplify, amplify, "--amplify")
    chosen_plot = _plot_axes(plot)
    data, items, model, manifest = _inputs(dataset, images, types, limit, model, width, height)
    given = {"method": method, "guidance": guidance, "tau": tau, "strength": strength, "cross_replace": cross_replace,
             "self_replace": self_replace, "mask_use": mask_use, "keep_outside": keep_outside}
    solvers = ["icd"] + ([f"ddim{steps or DDIM_STEPS}"] if baseline else [])
    settings = resolve_settings(manifest, given, swept, solvers, amplified)
    evaluator = _evaluator(metrics, data, items, device, {"clip": clip_model, "dino": dino_model,
                                                           "dinov2": dinov2_model, "image_reward": image_reward_model})
    run = EvalRun(data, items, settings, Path(output), model, manifest, evaluator,
                  _solver_runners(manifest, device, dtype, backend, compile, no_server, steps or DDIM_STEPS), seed,
                  width, height, chosen_plot, quiet())
    sys.exit(run_evaluation(run))


def _solver_runners(manifest, device: str, dtype: str, backend: str, compile: bool, no_server: bool, steps: int):
    """solver -> its runner: iCD's as the other commands open theirs, the baseline (the teacher's DDIM on `steps`
    steps, on PyTorch) always in this process."""
    from icd.models.official import DIRECTIONS
    from icd_export.engines import TorchEngine

    from ..runner import LocalRunner
    from ..session import teacher_session

    def open_solver(solver: str):
        if solver != "icd":
            return LocalRunner(teacher_session(open_model(manifest, device, dtype, (), TorchEngine.name, compile),
                                               steps))
        return open_runner(manifest, device, dtype, DIRECTIONS, backend, compile, no_server=no_server)

    return open_solver


def _plot_axes(plot: str | None) -> tuple[str, str] | None:
    if plot is None:
        return None
    editing, sep, keeping = plot.partition(":")
    if not sep or not editing.strip() or not keeping.strip():
        raise click.BadParameter(f"'{plot}' is not EDITING:PRESERVATION, e.g. clip_t:dinov2", param_hint="--plot")
    return editing.strip(), keeping.strip()


def _inputs(dataset: str, images: str | None, types: str | None, limit: int | None, model: str | None, width,
            height):
    """The data set and its selected items, and the model with its manifest (no weights loaded), checked."""
    from icd.evaluation.datasets import open_dataset, select

    from ..batch import error_line

    data = open_dataset(dataset, images)
    for problem in data.problems:
        error_line(problem)
    items = select(data, [kind.strip() for kind in types.split(",") if kind.strip()] if types else None, limit)
    if not items:
        raise UsageError(f"{dataset}: no items to evaluate")
    model, manifest = resolve(model)
    check_size(manifest, width, height)
    return data, items, model, manifest


def _evaluator(spec: str, data, items, device: str, models: dict):
    """The metrics asked for, their models loaded; a model that cannot be is one line, its metrics dropped."""
    from icd.evaluation.metrics import Evaluator, metric_names
    from icd.models.loading import resolve_device

    from ..distributed import local_device

    names = metric_names(spec, data.kind, any(item.checks for item in items))
    evaluator = Evaluator(names, models, str(resolve_device(local_device(device))))
    for line in evaluator.unavailable:
        log.warning(line)
    if not evaluator.names:
        raise UsageError("no metric can be measured here (see the lines above)")
    return evaluator
