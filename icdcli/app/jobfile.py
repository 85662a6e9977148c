"""Job files (`--jobs FILE`: one job per row, JSON lines or CSV, paths relative to the file's folder) and
per-image captions (`metadata.jsonl`), every row checked before any model loads."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icd.editing import BOUNDS, CAPTIONS_NAME, Given, parse_amplify, parse_blend
from icd.errors import InputError, UsageError
from icd.files import open_regular
from icd.limits import MAX_SEED
from icd.models.official import EDIT_METHODS

MAX_ROWS = 100_000
# `--jobs -`: the rows come from standard input (JSON lines when the first character is `{`, else CSV), their
# paths relative to the current folder; errors name it so.
STDIN = "-"
STDIN_NAME = "<stdin>"


def _no_nul(path: str) -> str:
    if "\0" in path:
        raise ValueError("a path cannot hold a NUL character")
    return path


PathText = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    image: PathText
    source: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)
    output: PathText | None = None


class InvertJob(_Row):
    """One row of `icd invert --jobs`: an image, its caption (`source`), the seed, the output."""


class EditJob(_Row):
    """One row of `icd edit --jobs`: the columns are the options of `icd edit` of the same names."""

    target: str = Field(min_length=1)
    method: Literal[EDIT_METHODS] | None = None
    guidance: float | None = Field(None, ge=BOUNDS["guidance"][0], le=BOUNDS["guidance"][1], allow_inf_nan=False)
    tau: float | None = Field(None, ge=BOUNDS["tau"][0], le=BOUNDS["tau"][1], allow_inf_nan=False)
    blend: str | None = None  # the older name of mask_words
    mask_words: str | None = None
    amplify: str | None = None  # WORD=F, several separated by spaces
    mask: PathText | None = None  # a mask picture, relative to the job file
    keep_outside: bool | None = None  # not given: resolve_edit decides
    strength: float | None = Field(None, ge=BOUNDS["strength"][0], le=BOUNDS["strength"][1], allow_inf_nan=False)
    save_mask: PathText | None = None  # where the map the edit used goes, relative to the file

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
    """(row number, job) for every row of a JSON lines (.jsonl, .json) or CSV job file, or of stdin (`-`). JSON
    values are taken as their types (true is no seed); CSV cells are text, read as the column's type."""
    path = Path(path)
    text = _text(path)
    csv_rows = _is_csv(path, text)
    rows = list(_csv_rows(path, text) if csv_rows else _json_rows(path, text))
    if not rows:
        raise UsageError(f"{path}: no jobs in the file")
    return [(number, _validated(schema, fields, f"{path} row {number}", strict=not csv_rows))
            for number, fields in rows]


def _validated(schema: type[BaseModel], fields: dict, where: str, strict: bool = True):
    """A row as `schema` reads it, else a usage error with its first problem, as `field: what is wrong`."""
    try:
        return schema.model_validate(fields, strict=strict)
    except ValidationError as err:
        problem = err.errors()[0]
    what = problem["msg"].removeprefix("Value error, ")
    if problem["loc"]:  # else a check across columns: its message names them
        column = ".".join(str(part) for part in problem["loc"])
        what = f"{column}: not a column this command takes" if problem["type"] == "extra_forbidden" else \
            f"{column}: {what}"
    raise UsageError(f"{where}: {what}")


def _is_csv(path: Path, text: str) -> bool:
    if str(path) == STDIN_NAME:
        return not text.lstrip().startswith("{")
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise UsageError(f"{path}: a job file is .jsonl (one JSON object per line) or .csv")
    return path.suffix.lower() == ".csv"


def _text(path: Path) -> str:
    """The job file's text (standard input's for `-`)."""
    try:
        if str(path) == STDIN_NAME:
            if sys.stdin is None or sys.stdin.isatty():
                raise UsageError("--jobs -: standard input is a terminal: pipe or redirect the job rows into it")
            return sys.stdin.buffer.read().decode("utf-8-sig")
        with open_regular(path) as file:
            return file.read().decode("utf-8-sig")
    except InputError as err:
        raise UsageError(str(err)) from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def _csv_rows(path: Path, text: str):
    """The rows through the csv module (so a quoted cell keeps its line breaks), numbered after the header."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = [name.strip() for name in reader.fieldnames or ()]
        if repeated := _first_repeated(name for name in columns if name):
            raise UsageError(f"{path}: the column '{repeated}' appears twice in the header: give each column once")
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise UsageError(f"{path} row {number}: more cells than the header has columns")
            fields = {key.strip(): value for key, value in row.items() if value is not None and value.strip() != ""}
            if fields:
                yield number, fields
            _check_count(path, number)
    except csv.Error as err:
        raise UsageError(f"{path} line {reader.line_num}: not readable CSV ({err})") from None


def _unique_keys(pairs: list[tuple[str, object]], where: str) -> dict:
    """A JSON object whose keys are all different: a repeated one would silently take the last value."""
    if (repeated := _first_repeated(key for key, _ in pairs)) is not None:
        raise UsageError(f"{where}: the key '{repeated}' appears twice: give each key once")
    return dict(pairs)


def _first_repeated(names) -> str | None:
    seen = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _json_rows(path: Path, text: str):
    # Lines end at "\n" only: str.splitlines would also split at characters a JSON string may hold (U+2028).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line, object_pairs_hook=lambda pairs: _unique_keys(pairs, f"{path} row {number}"))
        except ValueError as err:
            raise UsageError(f"{path} row {number}: not JSON ({err.msg})") from None
        except RecursionError:
            raise UsageError(f"{path} row {number}: not a job (its JSON is nested too deeply)") from None
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


def captions(folder: Path) -> dict[str, str]:
    """{file name: caption} from a Hugging Face style metadata.jsonl in `folder` ({} when there is none)."""
    path = folder / CAPTIONS_NAME
    if not path.is_file():
        return {}
    rows = (_validated(_Caption, fields, f"{path} row {number}") for number, fields in _json_rows(path, _text(path)))
    return {caption.file_name: caption.text for caption in rows}
