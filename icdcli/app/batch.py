"""Batches: every item planned and checked before any model loads (so a batch that would fail at item 100
says so at once), then each run behind its own wall: an item's exception becomes its one line, the batch goes
on, and the exit code says whether everything worked."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from icd.errors import ICDError, UsageError, first_line
from icd.files import real_path, sweep_temporaries

log = logging.getLogger("icd")

@dataclass
class Item:
    """One unit of work: what the user named (`label`), its input (a file or a seed) and its output."""

    label: str
    source: Path | int
    output: Path
    error: str | None = None  # found while planning (then never run) or while running
    skipped: bool = False  # --skip-existing and the output is there
    job: object = None  # the item's own parameters, when they differ between items (seed, target, ...)
    mask_output: Path | None = None  # an edit's --save-mask file
    values: dict = field(default_factory=dict)  # what its name may hold ({stem}, {target}, {seed}, ...)
    settings: dict = field(default_factory=dict)  # what it runs with, as --dry-run and -v show it

    @property
    def runnable(self) -> bool:
        return self.error is None and not self.skipped

    @property
    def outputs(self) -> list[Path]:
        """Every file the item writes: it writes them all or none."""
        return [self.output, *([self.mask_output] if self.mask_output is not None else [])]


@dataclass
class Report:
    """What a batch printed, for the exit code: 0 all done, 1 an item failed."""

    failed: int = 0
    done: int = 0
    skipped: int = 0
    notes: set[str] = field(default_factory=set)
    records: list[dict] = field(default_factory=list)  # each item's JSON record, for --json-log

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def add(self, record: dict) -> None:
        """Keep an item's record, counted by its status."""
        self.records.append(record)
        self.failed += record["status"] == "error"
        self.skipped += record["status"] == "skipped"
        self.done += record["status"] not in ("error", "skipped")


def debugging() -> bool:
    """Tracebacks of unexpected errors are shown with -v or ICD_DEBUG=1."""
    return os.environ.get("ICD_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"} or \
        logging.getLogger("icd").isEnabledFor(logging.DEBUG)


def error_line(message: str) -> None:
    stderr_line(f"icd: error: {message}")


def stderr_line(text: str) -> None:
    """A line on stderr that leaves a running progress bar intact (tqdm is imported only when a bar runs)."""
    bars = sys.modules.get("tqdm")
    if bars is not None:
        bars.tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


class _Inputs:
    """The input files, to tell whether an output is one of them (by path, or through a link by identity)."""

    def __init__(self, paths: Iterable[Path]):
        self.paths, self.identities = set(), set()
        for path in paths:
            self.paths.add(real_path(path))
            with suppress(OSError):
                self.identities.add(_identity(path))

    def __contains__(self, output: Path) -> bool:
        if real_path(output) in self.paths:
            return True
        try:
            return _identity(output) in self.identities
        except OSError:  # not there yet: it cannot be an input
            return False


def _identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def plan(items: list[Item], inputs: Iterable[Path], *, overwrite: bool, skip_existing: bool,
         check: Callable[[Item], None] | None = None) -> list[Item]:
    """Mark the items that must not run: an output that is one of `inputs` (the files the command reads) or
    exists (unless --overwrite; skipped with --skip-existing), or an input whose header `check` refuses."""
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing contradict each other: give one")
    _refuse_shared_outputs(items)
    inputs = _Inputs(inputs)
    for item in items:
        item.error = next((f"{item.label}: the output {path} is one of the inputs: choose another -o"
                           for path in item.outputs if path in inputs), None)
        existing = [path for path in item.outputs if path.exists()]
        if item.error is None and existing and not overwrite:
            if skip_existing and len(existing) == len(item.outputs):
                item.skipped = True
            else:
                item.error = f"{item.label}: {existing[0]} exists (use --overwrite to replace it" + \
                             (", or --skip-existing to leave it)" if len(item.outputs) == 1 else ")")
        if item.runnable and check is not None:
            try:
                check(item)
            except ICDError as err:
                item.error = _named(item.label, str(err))
    return items


def _refuse_shared_outputs(items: list[Item]) -> None:
    """Every output is written by one item only (case folded: case-insensitive file systems clash on case)."""
    writers: dict[str, str] = {}
    for item in items:
        for path in item.outputs:
            key = str(real_path(path)).casefold()
            if key in writers:
                raise UsageError(f"{item.label}: {path} is also written by {writers[key]}: give each result its "
                                 "own name")
            writers[key] = item.label


def _named(label: str, message: str) -> str:
    """Every item's line starts with the item, once."""
    return message if message.startswith((label, Path(label).name)) else f"{label}: {message}"


def run(items: list[Item], work: Callable[[Item], tuple[Path, list[str]]], *, as_json: bool, quiet: bool,
        stages: Callable[[], dict[str, float]] | None = None) -> Report:
    """Report the planned failures, then run `work` on the others, each behind a wall; `stages` times each."""
    report = Report()
    runnable = []
    for item in items:
        if item.error:
            _finish(report, item, {"status": "error", "error": item.error}, as_json, quiet)
        elif item.skipped:
            _finish(report, item, {"status": "skipped", "output": str(item.output)}, as_json, quiet)
        else:
            runnable.append(item)
    if runnable and work is None:
        raise ValueError("run: items to run but no work")
    if report.skipped:
        log.info("skipped %d item(s) whose output exists", report.skipped)
    for folder in {path.parent for item in runnable for path in item.outputs}:
        if folder.is_dir() and (swept := sweep_temporaries(folder)):
            log.info("removed %d temporary file(s) left in %s by an interrupted run", swept, folder)
    for item in _progress(runnable, quiet or as_json):
        started = time.perf_counter()
        record = _attempt(item, work, report)
        record["seconds"] = round(time.perf_counter() - started, 3)
        if stages is not None:
            record["stages"] = stages()
        if record["status"] == "error":
            item.error = record["error"]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s", item.label, described(item.settings, record))
        _finish(report, item, record, as_json, quiet)
    if report.failed and len(items) > 1:
        error_line(f"{report.failed} of {len(items)} items failed")
    return report


def described(settings: dict, record: dict | None = None) -> str:
    """An item's settings as -v and --dry-run show them (`key value, ...`), and, once it ran, its stages'
    seconds and the rest (reading, resizing) against the whole."""
    text = ", ".join(f"{key} {_shown(value)}" for key, value in settings.items() if value is not None)
    if record is None or "stages" not in record:
        return text
    stages = {**record["stages"], "rest": max(0.0, record["seconds"] - sum(record["stages"].values()))}
    timed = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in stages.items()) + \
        f" (of {record['seconds']:.3f} s)"
    return f"{text}; {timed}" if text else timed


def _shown(value) -> str:
    """A setting's value: numbers as a person writes them, text quoted where it holds spaces or commas."""
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, list) else str(value)
    return json.dumps(text) if isinstance(value, str) and any(char in text for char in ' ,"') else text


def on_terminal() -> bool:
    return sys.stderr.isatty()


def _progress(items: list[Item], quiet: bool) -> Iterable[Item]:
    """A bar naming the current item, on a terminal only (tqdm's import alone is a tenth of a served edit)."""
    if quiet or len(items) < 2 or not on_terminal():
        return items
    from tqdm import tqdm

    def shown():
        with tqdm(items, file=sys.stderr, unit="item", dynamic_ncols=True, leave=False, mininterval=0.2,
                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining} left, {rate_fmt}]{postfix}"
                  ) as bar:
            for item in bar:
                bar.set_postfix_str(item.label, refresh=False)
                yield item

    return shown()


def show_plan(items: list[Item], as_json: bool) -> Report:
    """--dry-run: each item's outputs and settings, or why it would not run, a line (JSON with --json) each."""
    report = Report()
    for item in items:
        status = "error" if item.error else "skipped" if item.skipped else "planned"
        record = {"input": item.label, "status": status, "outputs": [str(path) for path in item.outputs],
                  "settings": item.settings, **({"error": item.error} if item.error else {})}
        report.add(record)
        if as_json:
            stdout_line(json.dumps(record, default=str))
            continue
        settings = described(item.settings)
        what = f"error: {item.error}" if item.error else "skipped: the output exists" if item.skipped else settings
        stdout_line(f"{item.label} -> {', '.join(record['outputs'])}" + (f": {what}" if what else ""))
    log.info("dry run: %d to run, %d skipped, %d refused; nothing was loaded or written", report.done,
             report.skipped, report.failed)
    return report


def _attempt(item: Item, work, report: Report) -> dict:
    """One item's wall: whatever it raises becomes its one line (KeyboardInterrupt and exits pass)."""
    try:
        output, notes = work(item)
    except Exception as err:  # the wall: an unexpected failure of one item must not end the batch
        return {"status": "error", "error": _named(item.label, failure_line(err))}
    for note in notes:
        if note not in report.notes:
            report.notes.add(note)
            log.warning(note)
    return {"status": "ok", "output": str(output)}


def failure_line(err: Exception) -> str:
    """What went wrong, in one line: the message of an error icd expects, else an allocation that failed,
    else the unexpected error (its traceback on stderr with -v or ICD_DEBUG=1)."""
    if isinstance(err, ICDError):
        return str(err)
    if memory := out_of_memory(err):
        return memory
    if debugging():
        traceback.print_exc(file=sys.stderr)
    return f"unexpected {type(err).__name__}: {first_line(err)}" + \
        ("" if debugging() else " (run with -v or ICD_DEBUG=1 for the traceback)")


def out_of_memory(err: Exception) -> str | None:
    """The line for an allocation that failed (a GPU's or the CPU's), else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "out of memory: try a smaller --width/--height or --dtype fp16"
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        return "out of memory: try a smaller --width/--height, or free memory for icd"
    return None


def _finish(report: Report, item: Item, record: dict, as_json: bool, quiet: bool) -> None:
    from .distributed import current_launch

    if record["status"] == "error":
        error_line(record["error"])
    launch = current_launch()
    record = {"input": item.label, **record, **({"rank": launch.rank} if launch.several else {})}
    report.add(record)
    if as_json:
        stdout_line(json.dumps(record))
    elif record["status"] == "ok" and not quiet:
        stdout_line(record["output"])


def stdout_line(text: str) -> None:
    """One whole line on stdout in one write, so lines of processes sharing a pipe never interleave. When the
    reader has gone (`icd ... | head -1`) the rest of the report goes nowhere and the work goes on."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()


def discard_stdout() -> None:
    """Send the rest of stdout, buffered part included, to the null device: its reader has gone, and every
    later write (Python's own at exit too) would fail again."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        with suppress(OSError, ValueError):  # a stdout without a descriptor (a caller's own stream) keeps its own
            os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)


def file_items(paths: list[Path], output: str | None, naming, default: str, suffix_of: Callable[[Path], str],
               fields: tuple[str, ...], values_of: Callable[[Path], dict] | None = None) -> list[Item]:
    """One item per input file, named by `naming` (else `default`) in the format `suffix_of` gives."""
    from .naming import distinct_stems, output_path, refuse_clashes

    suffixes = {path: suffix_of(path) for path in paths}
    stems = distinct_stems(paths, suffixes)
    items = []
    for number, path in enumerate(paths, start=1):
        values = {"stem": stems[path], "n": number, **(values_of(path) if values_of else {})}
        name = naming.fill(default, values) + suffixes[path]
        items.append(Item(str(path), path, output_path(output, name, len(paths) > 1), values=values))
    if naming.template is not None:
        refuse_clashes(items, naming.template, fields)
    return items
