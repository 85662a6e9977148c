"""Job files (`icd edit --jobs FILE`, `icd invert --jobs FILE`) and per-image captions (`metadata.jsonl`).

A job file holds one job per row, as JSON lines or CSV. Every row is validated before any model loads, and
every error names the file, the row and the field. Paths in a job file are relative to its own folder.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icd.editing import Given, parse_amplify, parse_blend
from icd.errors import InputError, UsageError
from icd.files import open_regular
from icd.core.schedule import MAX_SEED

MAX_ROWS = 100_000
# `--jobs -`: the rows come from standard input (JSON lines when the first character is `{`, else CSV), their
# paths relative to the current folder; errors name it so.
STDIN = "-"
STDIN_NAME = "<stdin>"


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    image: str = Field(min_length=1)
    source: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)
    output: str | None = None


class InvertJob(_Row):
    """One row of `icd invert --jobs`: an image, its caption (`source`), the seed, the output."""


class EditJob(_Row):
    """One row of `icd edit --jobs`: the columns are the options of `icd edit` of the same names."""

    target: str = Field(min_length=1)
    method: Literal["p2p", "swap", "none"] | None = None
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False)
    tau: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    blend: str | None = None  # the older name of mask_words
    mask_words: str | None = None
    amplify: str | None = None  # WORD=F, several separated by spaces
    mask: str | None = Field(None, min_length=1)  # a mask picture, relative to the job file
    keep_outside: bool = True
    strength: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    save_mask: str | None = Field(None, min_length=1)  # where the map the edit used goes, relative to the file

    @field_validator("amplify")
    @classmethod
    def _amplify(cls, value: str | None) -> str | None:
        parse_amplify(value.split() if value else None)
        return value

    @field_validator("blend", "mask_words")
    @classmethod
    def _blend(cls, value: str | None) -> str | None:
        parse_blend(value)
        return value

    @model_validator(mode="after")
    def _one_blend(self):
        if self.blend and self.mask_words:
            raise ValueError("mask_words and blend are one column under two names: give one")
        if self.save_mask and not (self.mask or self.mask_words or self.blend):
            raise ValueError("save_mask needs mask or mask_words: nothing else confines an edit")
        return self

    def settings(self, folder: Path, where: str) -> Given:
        """The row's edit settings, named as its columns are (paths relative to the job file's `folder`)."""
        values = {"source": self.source, "target": self.target, "seed": self.seed, "method": self.method,
                  "guidance": self.guidance, "tau": self.tau, "strength": self.strength,
                  "amplify": parse_amplify(self.amplify.split() if self.amplify else None),
                  "blend": parse_blend(self.mask_words or self.blend),
                  "mask": folder / self.mask if self.mask else None, "keep_outside": self.keep_outside}
        return Given(values, {"blend": "blend" if self.blend else "mask_words"}, where)


def read_jobs(path: str | Path, schema: type[_Row]) -> list[tuple[int, _Row]]:
    """(row number, job) for every row of a JSON lines (.jsonl, .json) or CSV (.csv) job file."""
    path = Path(path)
    rows = list(_rows(path))
    if not rows:
        raise UsageError(f"{path}: no jobs in the file")
    jobs = []
    for number, fields in rows:
        try:
            jobs.append((number, schema.model_validate(fields)))
        except ValidationError as err:
            raise UsageError(f"{path} row {number}: {_problem(err)}") from None
    return jobs


def _problem(err: ValidationError) -> str:
    """The first problem of a row, as `field: what is wrong`."""
    problem = err.errors()[0]
    what = problem["msg"].removeprefix("Value error, ")
    if not problem["loc"]:  # a check across columns: its message names them
        return what
    where = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return f"{where}: not a column this command takes"
    return f"{where}: {what}"


def _text(path: Path) -> str:
    if str(path) == STDIN_NAME:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("--jobs -: standard input is a terminal: pipe or redirect the job rows into it")
        return sys.stdin.buffer.read().decode("utf-8-sig")
    with open_regular(path) as file:
        return file.read().decode("utf-8-sig")


def _rows(path: Path):
    """(row number, fields) of each non-empty row; the rows of a CSV file are counted after its header."""
    try:
        text = _text(path)
    except InputError as err:
        raise UsageError(str(err)) from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    suffix = path.suffix.lower() if str(path) != STDIN_NAME else ".jsonl" if text.lstrip().startswith("{") else ".csv"
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise UsageError(f"{path} row {number}: more cells than the header has columns")
            fields = {key.strip(): value for key, value in row.items() if value is not None and value.strip() != ""}
            if fields:
                yield number, fields
            _check_count(path, number)
        return
    if suffix not in (".jsonl", ".json"):
        raise UsageError(f"{path}: a job file is .jsonl (one JSON object per line) or .csv")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except ValueError as err:
            raise UsageError(f"{path} row {number}: not JSON ({err.msg})") from None
        if not isinstance(fields, dict):
            raise UsageError(f"{path} row {number}: not a JSON object")
        _check_count(path, number)
        yield number, fields


def _check_count(path: Path, number: int) -> None:
    if number > MAX_ROWS:
        raise UsageError(f"{path}: more than {MAX_ROWS} rows: split the file")


class _Caption(BaseModel):
    model_config = ConfigDict(extra="ignore")

    file_name: str = Field(min_length=1)
    text: str = Field(min_length=1)


CAPTIONS_NAME = "metadata.jsonl"


def captions(folder: Path) -> dict[str, str]:
    """{file name: caption} from a Hugging Face style metadata.jsonl in `folder` ({} when there is none)."""
    path = folder / CAPTIONS_NAME
    if not path.is_file():
        return {}
    found = {}
    for number, fields in _rows(path):
        try:
            caption = _Caption.model_validate(fields)
        except ValidationError as err:
            raise UsageError(f"{path} row {number}: {_problem(err)}") from None
        found[caption.file_name] = caption.text
    return found
