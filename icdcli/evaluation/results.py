"""An evaluation's results: one JSON record per item and setting in `results.jsonl`, appended (and flushed)
as each edit is measured, so that a killed run loses at most the record being written (a torn line, ignored)
and a rerun skips what is there; a later record of an item and setting replaces an earlier one. A value that is
not a number (a metric undefined for an item) is null.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from icd.files import atomic_write

log = logging.getLogger("icd")
RESULTS = "results.jsonl"


def key(record: dict) -> tuple[str, str]:
    return record["id"], record["setting"]


def _finite(value):
    """JSON has no NaN or infinity: such a value is null (undefined)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {name: _finite(item) for name, item in value.items()}
    return value


def record_line(record: dict) -> str:
    return json.dumps(_finite(record), allow_nan=False) + "\n"


def read_records(paths: list[Path]) -> dict[tuple[str, str], dict]:
    """The records of results files, the last one of each item and setting; lines that are not a whole record
    (a run killed while writing one) are skipped, and said so."""
    records: dict[tuple[str, str], dict] = {}
    skipped = 0
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                records[key(record)] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped += bool(line.strip())
    if skipped:
        log.info("%d line(s) of the results were not whole records (an interrupted run): their edits run again",
                 skipped)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    text = "".join(record_line(record) for record in records)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"), overwrite=True)
