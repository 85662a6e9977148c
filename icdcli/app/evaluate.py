"""`icd eval`'s runner: every item of a data set edited under every setting and measured, resumably.

Each photo is inverted once per solver (iCD, or the teacher's DDIM baseline) and every setting decoded from that
inversion; each record goes to OUT/results.jsonl as soon as it is made, so a rerun skips what is there. The edits
run over the `Runner` protocol (a running `icd serve` does them warm); under torchrun or accelerate each process
runs every N-th photo and the first one writes the tables. OUT/run.json refuses another run into OUT.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from icd import __version__
from icd.editing import BOUNDS, MASK_WORDS_NOTE, EditPlan, Given, resolve_edit
from icd.errors import ICDError, OutputExistsError, UsageError
from icd.evaluation import MASK_USES, SWEEPABLE
from icd.evaluation.datasets import Dataset, EvalItem, decode_rle
from icd.evaluation.metrics import METRICS, Evaluator, MetricInfo, Sample, check_infos
from icd.evaluation.pictures import Series, contact_sheet, tradeoff_plot
from icd.evaluation.results import RESULTS, key, read_records, record_line, write_records
from icd.evaluation.summary import published_rows, summarise, summary_markdown, write_summary
from icd.files import atomic_write
from icd.images import LoadedImage, load_image
from icd.masks import resize
from icd.models.manifest import Manifest
from icd.models.official import EDIT_METHODS
from icd.models.threads import every_cpu_thread

from .batch import error_line, failure_line
from .distributed import MERGE_TIMEOUT, current_launch, gather_records, process_share
from .jobs import Settings, edit_file, inverted
from .runner import Runner

log = logging.getLogger("icd")
RUN_FILE = "run.json"
IDENTITY = ("dataset", "model_fingerprint", "seed", "width", "height")  # what another run into OUT must share
SHEET_ROWS = 6  # best and worst items on the contact sheet
EDITING_METRICS = ("clip_t", "clip_whole", "success", "clip_edited", "image_reward")
KEEPING_METRICS = ("dinov2", "clip_i", "psnr", "ssim", "structure", "lpips", "mse")
# The numbers a sweep moves, with their labels (in setting names and along a line of the plot); strength first:
# it sets the others.
SWEPT_NUMBERS = {"strength": "s", "guidance": "w", "tau": "tau", "cross_replace": "cross", "self_replace": "self"}


def _number(name: str):
    low, high = BOUNDS[name]

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"'{text}' is not a number in {low:g}..{high:g}" if math.isfinite(high)
                             else f"'{text}' is not a number >= {low:g}")
        return value
    return parse


def _choice(options: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"'{text}' is not one of {', '.join(options)}")
        return text
    return parse


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
        raise ValueError(f"'{text}' is not true or false")
    return text.lower() in ("true", "on", "yes", "1")


PARSERS = {"method": _choice(EDIT_METHODS), **{name: _number(name) for name in SWEPT_NUMBERS},
           "mask_use": _choice(MASK_USES), "keep_outside": _flag}


def parse_sweeps(texts: tuple[str, ...]) -> dict[str, list]:
    """--sweep NAME=V1,V2,...: each setting's values, checked as the option of that name checks them."""
    sweeps: dict[str, list] = {}
    for text in texts:
        name, sep, values = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in SWEEPABLE:
            raise UsageError(f"--sweep {text}: expected NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}")
        if name in sweeps:
            raise UsageError(f"--sweep {name} is given twice: list all its values in one")
        try:
            parsed = [PARSERS[name](value.strip()) for value in values.split(",") if value.strip()]
        except ValueError as err:
            raise UsageError(f"--sweep {text}: {err}") from None
        if not parsed:
            raise UsageError(f"--sweep {text}: no values")
        sweeps[name] = list(dict.fromkeys(parsed))
    return sweeps


@dataclass(frozen=True)
class EvalSetting:
    """One setting of a run, resolved on the model: what a record's edit was made with (`plan` without its
    prompts, seed and region, which each item gives)."""

    solver: str  # "icd", or the baseline "ddim<steps>"
    plan: EditPlan
    mask_use: str = "none"  # none, mask (the data set's region) or words (its blend words, p2p)

    @property
    def label(self) -> str:
        """The setting's name: its edits' folder, its rows."""
        plan, fields = self.plan, self.fields()
        parts = [self.solver, plan.method] + [f"{SWEPT_NUMBERS[name]}{value:g}" for name, value in fields.items()
                                              if name in SWEPT_NUMBERS and value is not None]
        if fields["amplify"]:
            parts.append("amp" + "+".join(f"{word}{factor:g}" for word, factor in plan.p2p.amplify.items()))
        parts += [] if self.mask_use == "none" else [self.mask_use + ("-keep" if plan.keep_outside else "")]
        return re.sub(r"[^A-Za-z0-9.+=-]+", "_", "-".join(parts))

    def fields(self) -> dict:
        """The setting as a record keeps it (summary.SETTING_COLUMNS); p2p's knobs only for p2p."""
        plan, p2p = self.plan, self.plan.method == "p2p"
        amplify = plan.p2p.amplify if p2p else None
        return {"solver": self.solver, "method": plan.method, "guidance": plan.guidance, "tau": plan.tau,
                "strength": plan.strength, "cross_replace": plan.p2p.cross_replace if p2p else None,
                "self_replace": plan.p2p.self_replace if p2p else None,
                "amplify": None if not amplify else [f"{word}={factor:g}" for word, factor in amplify.items()],
                "mask_use": self.mask_use, "keep_outside": plan.keep_outside if self.mask_use == "mask" else None}

    def for_item(self, item: EvalItem, seed: int, mask: Path | None) -> EditPlan:
        """The edit of one item: its prompts, the run's seed, its region as the setting uses it."""
        p2p = self.plan.p2p
        if self.mask_use == "words" and item.blend is not None:
            p2p = replace(p2p, blend=item.blend)
        return replace(self.plan, source=item.source, target=item.target, seed=seed, p2p=p2p,
                       mask=mask if self.mask_use == "mask" else None)


def _resolved(manifest: Manifest, solver: str, choice: dict, amplify: dict | None) -> EvalSetting | None:
    """One combination of options as a setting, or None when it makes no sense (blend words without p2p)."""
    mask_use = choice.get("mask_use") or "none"
    values = {name: choice.get(name) for name in SWEEPABLE if name != "mask_use"}
    values["amplify"] = amplify and dict(sorted(amplify.items()))
    plan = resolve_edit(manifest, Given(values, {name: f"--{name.replace('_', '-')}" for name in values}))
    if mask_use == "words" and plan.method != "p2p":
        return None
    return EvalSetting(solver, plan, mask_use)


def resolve_settings(manifest: Manifest, given: dict, sweeps: dict[str, list], solvers: list[str],
                     amplify: dict | None) -> list[EvalSetting]:
    """Every solver times every combination of the swept values (the options given fixing the rest), each
    resolved on the model once; combinations that resolve alike are one setting."""
    for name in sweeps:
        if given.get(name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} and --sweep {name}: give one of them")
    settings, skipped = [], 0
    for solver in solvers:
        for values in itertools.product(*sweeps.values()):
            setting = _resolved(manifest, solver, {**given, **dict(zip(sweeps, values))}, amplify)
            skipped += setting is None
            if setting is not None and setting not in settings:
                settings.append(setting)
    if not settings:
        raise UsageError("--mask-use words applies to --method p2p: no setting is left to run")
    if skipped:
        log.info("%d combination(s) of the sweep skipped: --mask-use words applies to p2p only", skipped)
    return settings


@dataclass
class EvalRun:
    """Everything a run needs; the runners are opened at their first edit (none when all is done)."""

    dataset: Dataset
    items: list[EvalItem]
    settings: list[EvalSetting]
    out: Path
    model_ref: str
    manifest: Manifest
    evaluator: Evaluator
    open_runner: Callable[[str], Runner]  # solver -> its runner
    seed: int = 0
    width: int | None = None
    height: int | None = None
    plot: tuple[str, str] | None = None  # the trade-off plot's editing and preservation metrics
    quiet: bool = False
    _jobs: dict[str, Settings] = field(default_factory=dict)
    _inversion_seconds: dict = field(default_factory=dict)
    _notes: set[str] = field(default_factory=set)
    _region_notes: int = 0

    def about(self) -> dict:
        size = (self.manifest.resolution,) * 2 if self.dataset.square and not (self.width or self.height) else \
            (self.width, self.height)
        return {"dataset": str(self.dataset.path.resolve()), "dataset_kind": self.dataset.kind,
                "model": self.model_ref, "model_fingerprint": self.manifest.fingerprint, "seed": self.seed,
                "width": size[0], "height": size[1], "icd_version": __version__}

    def jobs(self, solver: str) -> Settings:
        """The job settings of a solver, its runner opened at the first call."""
        if solver not in self._jobs:
            about = self.about()
            self._jobs[solver] = Settings(runner=self.open_runner(solver), model_ref=self.model_ref,
                                          width=about["width"], height=about["height"], overwrite=True)
        return self._jobs[solver]

    def note(self, notes: list[str], item: EvalItem) -> None:
        """Each note of the edits once; the per-photo notes of blend words (every photo of `mini` has one) are
        counted, shown one by one with -v."""
        for note in notes:
            if MASK_WORDS_NOTE in note.split(": ", 1)[0] or note.split(": ", 1)[-1].startswith(MASK_WORDS_NOTE):
                self._region_notes += 1
                log.debug("%s: %s", item.id, note.split(": ", 1)[-1])
            elif note not in self._notes:
                self._notes.add(note)
                log.warning(note)


def claim_output(out: Path, about: dict) -> None:
    """OUT must be new, empty, or hold an evaluation of the same data set, model, seed and size (which the run
    continues): anything else is refused before a file is written. The first process of a launch claims it;
    the others wait for its claim, so that none writes into a folder that is then refused, or not yet made."""
    marker = out / RUN_FILE
    if current_launch().rank != 0:
        _await_claim(marker)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file: give a folder for the evaluation")
    if marker.is_file():
        try:
            earlier = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"-o {out}: its {RUN_FILE} cannot be read ({err}): choose another -o") from None
        for name in IDENTITY:
            if earlier.get(name) != about.get(name):
                raise UsageError(f"-o {out} holds an evaluation with another {name.replace('_', ' ')} "
                                 f"({earlier.get(name)}, not {about.get(name)}): choose another -o")
        return
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"-o {out} is not empty and holds no `icd eval` run ({RUN_FILE}): choose a new folder")
    atomic_write(marker, lambda temporary: Path(temporary).write_text(json.dumps(about, indent=1) + "\n"))


def _await_claim(marker: Path, timeout: timedelta = MERGE_TIMEOUT) -> None:
    """Until the first process has written `marker` (a refusal there ends the whole launch)."""
    deadline = time.monotonic() + timeout.total_seconds()
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise ICDError(f"the first process did not claim {marker.parent} within {timeout}")
        time.sleep(0.05)


def _mask_file(run: EvalRun, item: EvalItem) -> Path | None:
    """The item's region as a picture `icd edit --mask` reads: the data set's file, or PIE-Bench's run-length
    mask written once under OUT/masks."""
    if item.mask_file is not None or item.mask_rle is None:
        return item.mask_file
    path = run.out / "masks" / item.edit_name
    if not path.is_file():
        picture = Image.fromarray(decode_rle(item.mask_rle).astype(np.uint8) * 255)
        try:
            atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))
        except OutputExistsError:
            pass  # another process wrote the same mask meanwhile
    return path


def _edit(run: EvalRun, item: EvalItem, setting: EvalSetting, output: Path) -> dict:
    """Edit one item under one setting (its inversion shared by the solver's settings); the timings."""
    settings = run.jobs(setting.solver)
    started = time.perf_counter()
    inverted(settings, item.image, item.source, run.seed)
    invert_seconds = run._inversion_seconds.setdefault((item.id, setting.solver), time.perf_counter() - started)
    plan = setting.for_item(item, run.seed, _mask_file(run, item) if setting.mask_use == "mask" else None)
    started = time.perf_counter()
    _, notes = edit_file(settings, item.image, plan, output)
    seconds = time.perf_counter() - started
    run.note(notes, item)
    return {"seconds": round(invert_seconds + seconds, 4), "invert_seconds": round(invert_seconds, 4),
            "unet_calls": len(settings.manifest.forward_timesteps) + len(settings.manifest.reverse_timesteps)}


def _record(run: EvalRun, item: EvalItem, photo: LoadedImage, mask: np.ndarray | None, setting: EvalSetting,
            earlier: dict | None) -> dict:
    """One item under one setting, edited (unless an earlier record's edit is there: then measured again)."""
    output = run.out / "edits" / setting.label / item.edit_name
    if earlier is not None and output.is_file():
        timing = {name: earlier.get(name) for name in ("seconds", "invert_seconds", "unet_calls")}
    else:
        timing = _edit(run, item, setting, output)
    edit = np.asarray(load_image(output).rgb)
    with every_cpu_thread():  # the metric networks are far bigger than a small model's UNet
        metrics = run.evaluator.measure(Sample(np.asarray(photo.rgb), edit, mask, item))
    size = run.jobs(setting.solver).size_for(photo.original_size) if earlier is None else \
        (earlier["settings"]["width"], earlier["settings"]["height"])
    blend = setting.for_item(item, run.seed, None).p2p.blend if setting.plan.method == "p2p" else None
    applied = {"mask": setting.mask_use == "mask" and _mask_file(run, item) is not None,
               "blend": None if blend is None else " ".join(blend[0]) + ":" + " ".join(blend[1])}
    return {"id": item.id, "image_path": item.relative, "type": item.kind, "source": item.source,
            "target": item.target, "edit": output.relative_to(run.out).as_posix(), "setting": setting.label,
            "settings": {**setting.fields(), "model": run.model_ref, "seed": run.seed, "width": size[0],
                         "height": size[1], "applied": applied},
            "metrics": {**(earlier or {}).get("metrics", {}), **metrics}, **timing}


def _walled(label: str, work: Callable[[], object]) -> bool:
    """Run one unit of work; whatever it raises becomes its one line (interrupts pass). True when it worked."""
    try:
        work()
        return True
    except Exception as err:  # the wall: one bad item must not end the run
        error_line(f"{label}: {failure_line(err)}")
    return False


def _run_item(run: EvalRun, item: EvalItem, plan: list, write: Callable[[dict], None], bar) -> int:
    """Every pending setting of one item, each behind its own wall; returns how many failed."""
    loaded = {}

    def load() -> None:
        loaded["photo"] = load_image(item.image)
        mask = item.mask()  # the metrics read it at the photo's size
        loaded["mask"] = None if mask is None else resize(mask, loaded["photo"].original_size)

    if not _walled(item.id, load):
        bar.update(len(plan))
        return len(plan)
    failed = 0
    for setting, earlier in plan:
        failed += not _walled(f"{item.id} [{setting.label}]", lambda: write(
            _record(run, item, loaded["photo"], loaded["mask"], setting, earlier)))
        bar.update(1)
    for settings in run._jobs.values():
        settings.masks.clear()  # the masks of one item are not needed again
        settings.mask_hashes.clear()
    return failed


def _progress(total: int, quiet: bool):
    """A progress bar over the edits on a terminal (the first process's only)."""
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="edit", dynamic_ncols=True, leave=False,
                disable=quiet or not sys.stderr.isatty() or current_launch().rank != 0 or not total)


def run_evaluation(run: EvalRun) -> int:
    """Edit, measure and record every pending item and setting of this process's share, then (first process)
    write the results, the tables and the pictures. Returns the exit code: 1 if anything failed."""
    claim_output(run.out, run.about())
    done = read_records([run.out / RESULTS, *sorted(run.out.glob("results.rank-*.jsonl"))])
    plans = []
    for item in process_share(run.items):
        expected = run.evaluator.expected(item)
        plan = [(s, done.get((item.id, s.label))) for s in run.settings]
        plan = [(s, r) for s, r in plan if r is None or expected - r["metrics"].keys()]
        if plan:
            plans.append((item, plan))
    launch = current_launch()
    sink = run.out / (RESULTS if not launch.several else f"results.rank-{launch.rank}.jsonl")
    new_records, failed = [], 0
    bar = _progress(sum(len(plan) for _, plan in plans), run.quiet)
    with open(sink, "a", encoding="utf-8") as results:
        def write(record: dict) -> None:
            results.write(record_line(record))
            results.flush()
            new_records.append(record)

        try:
            for item, plan in plans:
                failed += _run_item(run, item, plan, write, bar)
        finally:
            bar.close()
    if run._region_notes:
        log.info("%d edit(s): the blend words' map selected the whole image or nothing (-v shows each)",
                 run._region_notes)
    merged = gather_records(new_records)
    if merged is not None:
        _write_outputs(run, {**done, **{key(record): record for record in merged}})
    return 1 if failed or run.dataset.problems else 0


def _ordered(run: EvalRun, records: dict) -> list[dict]:
    """This run's settings first, in their order, each over the data set's order; then earlier runs' records."""
    settings = {setting.label: number for number, setting in enumerate(run.settings)}
    items = {item.id: number for number, item in enumerate(run.dataset.items)}
    return sorted(records.values(), key=lambda r: (settings.get(r["setting"], len(settings)), r["setting"],
                                                   items.get(r["id"], len(items)), r["id"]))


def _write_outputs(run: EvalRun, records: dict) -> None:
    """results.jsonl whole, the summary tables, the trade-off plot of a sweep and the contact sheet."""
    ordered = _ordered(run, records)
    write_records(run.out / RESULTS, ordered)
    for partial in run.out.glob("results.rank-*.jsonl"):
        partial.unlink()
    if not ordered:
        return
    infos = {**METRICS, **check_infos(run.dataset.items)}
    summary = summarise(ordered, infos)
    about = run.about()
    markdown = summary_markdown(summary, infos, about, published_rows(run.dataset.kind, run.dataset.path.name))
    write_summary(run.out, summary, markdown, about)
    axes = _tradeoff_axes(summary["metrics"], run.plot)
    if axes and len(summary["overall"]) > 1:
        _plot(run, summary, infos, axes)
    ranking = axes[0] if axes else next(iter(summary["metrics"]), None)
    if ranking:
        _sheet(run, ordered, ranking, infos)
    if not run.quiet:
        sys.stdout.write(markdown)
        sys.stdout.flush()


def _tradeoff_axes(metrics: list[str], chosen: tuple[str, str] | None) -> tuple[str, str] | None:
    """The editing and preservation metrics of the plot: as chosen, else the first ones measured."""
    if chosen is not None:
        missing = [name for name in chosen if name not in metrics]
        if missing:
            log.warning("--plot: %s was not measured: no trade-off plot", ", ".join(missing))
            return None
        return chosen
    editing = next((name for name in EDITING_METRICS if name in metrics), None)
    keeping = next((name for name in KEEPING_METRICS if name in metrics), None)
    return (editing, keeping) if editing and keeping else None


def _plot(run: EvalRun, summary: dict, infos: dict[str, MetricInfo], axes: tuple[str, str]) -> None:
    """One line per solver, method and region use, through the sweep's points in their order: a colour per method
    and region use, a marker per solver."""
    editing, keeping = axes
    lines: dict[tuple[str, str], list] = {}
    for row in summary["overall"]:
        settings = row["settings"]
        kind = settings["method"] + ("" if settings["mask_use"] == "none" else f" {settings['mask_use']}" + (
            "+keep" if settings.get("keep_outside") else ""))
        lines.setdefault((settings["solver"], kind), []).append(row)
    solvers, kinds = (list(dict.fromkeys(key[part] for key in lines)) for part in (0, 1))
    series = []
    scale = {name: 100 if infos[name].percent else 1 for name in axes}
    for (solver, kind), rows in lines.items():
        varying = [part for part in SWEPT_NUMBERS if len({json.dumps(r["settings"][part]) for r in rows}) > 1]
        shown = varying[:1] if "strength" in varying else varying
        points = [(scale[keeping] * r["metrics"][keeping], scale[editing] * r["metrics"][editing],
                   " ".join(f"{SWEPT_NUMBERS[part]}{r['settings'][part]:g}" for part in shown)) for r in rows
                  if r["metrics"][keeping] is not None and r["metrics"][editing] is not None]
        if points:
            series.append(Series(f"{solver} {kind}", points, kinds.index(kind), solvers.index(solver)))
    if series:
        title = f"{run.dataset.path.name}: {sum(r['n'] for r in summary['overall'])} edits, model {run.model_ref}"
        label = {name: infos[name].heading + (" (%)" if infos[name].percent else "") for name in axes}
        tradeoff_plot(series, label[keeping], label[editing], title, run.out / "tradeoff.png")


def _sheet(run: EvalRun, records: list[dict], metric: str, infos: dict[str, MetricInfo]) -> None:
    """The best and the worst records by `metric`: source | edit | what they are."""
    scored = [r for r in records if r["metrics"].get(metric) is not None and (run.out / r["edit"]).is_file()]
    if not scored:
        return
    info = infos[metric]
    scored.sort(key=lambda r: r["metrics"][metric], reverse=info.higher_is_better)
    count = min(SHEET_ROWS, max(1, len(scored) // 2))
    items = {item.id: item for item in run.dataset.items}

    def entries(chosen: list[dict]):
        for record in chosen:
            value = record["metrics"][metric]
            shown = f"{100 * value:.0f}%" if info.percent else f"{value:.{info.digits}f}"
            caption = f"{record['id']} [{record['setting']}] {info.heading} {shown}: {record['source']} -> " \
                      f"{record['target']}"
            source = items[record["id"]].image if record["id"] in items else None
            if source is not None and source.is_file():
                yield load_image(source).rgb, load_image(run.out / record["edit"]).rgb, caption

    contact_sheet([(f"best by {info.heading}", list(entries(scored[:count]))),
                   (f"worst by {info.heading}", list(entries(scored[::-1][:count])))], run.out / "contact_sheet.png")

