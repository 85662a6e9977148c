"""Editing data sets, read from the user's own copy (their formats: README, `icd eval`): every item is a photo,
a source and a target prompt, and what the data set knows besides (an editing type, the region the edit should
change, blend words, checks): a PIE-Bench folder, one of the iCD authors' CSVs with the folder of its images, or
a folder with `metadata.jsonl` (`_FolderRow`). A row that cannot be read is one line in `Dataset.problems`; the
other rows are items.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icd.editing import CAPTIONS_NAME, parse_blend
from icd.errors import InputError, UsageError
from icd.files import open_regular
from icd.masks import read_mask

from .checks import Check

PIE_MAPPING = "mapping_file.json"
PIE_IMAGES = "annotation_images"
PIE_MASK_SHAPE = (512, 512)
PIE_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
             "4": "change attribute content", "5": "change attribute pose", "6": "change attribute color",
             "7": "change attribute material", "8": "change background", "9": "change style"}
AUTHORS_COLUMNS = ("file_name", "old_caption", "edited_caption", "blended_words")
Blend = tuple[tuple[str, ...], tuple[str, ...]]


@dataclass
class EvalItem:
    """One edit of a data set."""

    id: str
    image: Path
    relative: str  # where the photo sits in the data set: its edits keep that path (as .png)
    source: str
    target: str
    kind: str | None = None  # the editing type
    blend: Blend | None = None
    mask_rle: tuple[int, ...] | None = None
    mask_file: Path | None = None
    target_image: Path | None = None
    palettes: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    root: Path = Path(".")  # the data set's folder: check regions are relative to it

    @property
    def edit_name(self) -> str:
        """The edit's path under a setting's folder: the photo's folder in the data set, the item's id."""
        return str(PurePosixPath(self.relative).parent / f"{self.id}.png")

    def mask(self) -> np.ndarray | None:
        """(H, W) float32 in [0, 1], 1 where the edit should act; None when the data set gives no region."""
        if self.mask_rle is not None:
            return decode_rle(self.mask_rle).astype(np.float32)
        if self.mask_file is not None:
            return read_mask(self.mask_file)
        return None


@dataclass
class Dataset:
    kind: str  # pie-bench, authors or folder
    path: Path
    items: list[EvalItem]
    problems: list[str] = field(default_factory=list)
    square: bool = False  # edit at the model's resolution, square (the authors' protocol)


def decode_rle(pairs, shape: tuple[int, int] = PIE_MASK_SHAPE) -> np.ndarray:
    """PIE-Bench's mask: (start, length) pairs over the image flattened row by row, each run set to 1 (clipped
    at the end), then the one-pixel border set to 1 as the benchmark's evaluator does."""
    runs = np.asarray(pairs, dtype=np.int64)
    if runs.ndim != 1 or runs.size % 2 or (runs < 0).any():
        raise ValueError("the mask is not a flat list of (start, length) pairs of whole numbers >= 0")
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    for start, length in runs.reshape(-1, 2):
        flat[start:start + length] = True
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def without_brackets(prompt: str) -> str:
    """PIE-Bench marks the edited words with square brackets; the prompts are used without them."""
    return " ".join(prompt.replace("[", "").replace("]", "").split())


def blend_words(words: list[str], source: str, target: str) -> Blend | None:
    """Blend words as the benchmarks give them ("src tgt"): two words are the source's and the target's; any
    other number goes to the prompt(s) each word appears in. None when a side would be empty."""
    words = [word.lower() for word in words if word.strip()]
    if len(words) == 2:
        return (words[0],), (words[1],)
    in_source, in_target = (set(re.findall(r"[a-z0-9']+", prompt.lower())) for prompt in (source, target))
    chosen = tuple(w for w in words if w in in_source), tuple(w for w in words if w in in_target)
    return chosen if chosen[0] and chosen[1] else None


def _text(path: Path) -> str:
    with open_regular(path) as handle:
        return handle.read().decode("utf-8-sig")


def _inside(relative: str, what: str) -> str:
    """A path a data set names, refused when it would leave the data set (absolute, or with '..')."""
    parts = PurePosixPath(relative.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or not parts.parts:
        raise ValueError(f"{what} {relative!r} must be a relative path inside the data set")
    return str(parts)


def read_pie_bench(folder: Path) -> Dataset:
    try:
        mapping = json.loads(_text(folder / PIE_MAPPING))
    except json.JSONDecodeError as err:
        raise InputError(f"{folder / PIE_MAPPING}: not JSON ({err})") from None
    if not isinstance(mapping, dict):
        raise InputError(f"{folder / PIE_MAPPING}: expected an object keyed by image id")
    dataset = Dataset("pie-bench", folder, [])
    for key in sorted(mapping):
        entry = mapping[key]
        try:
            relative = _inside(str(entry["image_path"]), "image_path")
            source, target = without_brackets(entry["original_prompt"]), without_brackets(entry["editing_prompt"])
            kind = PIE_TYPES.get(str(entry["editing_type_id"]), str(entry["editing_type_id"]))
            mask = tuple(int(value) for value in entry["mask"])
            decode_rle(mask)
            dataset.items.append(EvalItem(str(key), folder / PIE_IMAGES / relative, relative, source, target, kind,
                                          blend_words(str(entry.get("blended_word") or "").split(), source, target),
                                          mask_rle=mask, root=folder))
        except KeyError as err:
            dataset.problems.append(f"{PIE_MAPPING} {key}: no {err.args[0]!r}")
        except (TypeError, ValueError, AttributeError) as err:
            dataset.problems.append(f"{PIE_MAPPING} {key}: {err}")
    return dataset


def _authors_words(value: str) -> list[str]:
    """blended_words: "src tgt", or a Python tuple written out ("('child', 'lion')", editing_coco.csv)."""
    value = value.strip()
    if value.startswith("("):
        words = ast.literal_eval(value)
        if not isinstance(words, tuple) or not all(isinstance(word, str) for word in words):
            raise ValueError(f"blended_words {value!r} is not a tuple of words")
        return list(words)
    return value.split()


def read_authors_csv(path: Path, images: Path) -> Dataset:
    reader = csv.DictReader(io.StringIO(_text(path)))
    missing = [name for name in AUTHORS_COLUMNS if name not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"{path.name}: no column {', '.join(missing)} (expected {', '.join(AUTHORS_COLUMNS)})")
    dataset, rows = Dataset("authors", path, [], square=True), list(reader)
    stems = [PurePosixPath(row["file_name"] or "").stem for row in rows]
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            relative = _inside(row["file_name"] or "", "file_name")
            source, target = row["old_caption"].strip(), row["edited_caption"].strip()
            if not source or not target:
                raise ValueError("an empty caption")
            stem = stems[number - 2]
            item_id = stem if stems.count(stem) == 1 else f"{stem}-{number}"
            dataset.items.append(EvalItem(item_id, images / relative, relative, source, target,
                                          blend=blend_words(_authors_words(row["blended_words"] or ""), source, target),
                                          root=images))
        except (ValueError, SyntaxError) as err:
            dataset.problems.append(f"{path.name} line {number}: {err}")
    return dataset


class _FolderRow(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    file_name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    target: str = Field(min_length=1)
    id: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    type: str | None = Field(None, min_length=1)
    mask: str | None = Field(None, min_length=1)
    mask_words: str | None = None
    target_image: str | None = Field(None, min_length=1)
    palettes: dict[str, dict[str, tuple[int, int, int]]] = {}
    checks: list[Check] = []


def _folder_item(folder: Path, row: _FolderRow, item_id: str) -> EvalItem:
    for check in row.checks:
        for palette in (check.palette,) if check.kind == "colour" else ():
            if palette not in row.palettes or check.expect not in row.palettes[palette]:
                raise ValueError(f"check {check.name}: no colour {check.expect!r} in a palette {palette!r}")
        if check.kind == "shape" and not any(check.colour in p for p in row.palettes.values()):
            raise ValueError(f"check {check.name}: no colour {check.colour!r} in the palettes")
        if check.region is not None:
            _inside(check.region, f"check {check.name}'s region")
    if len({(check.name, check.kind == "psnr") for check in row.checks}) != len({c.name for c in row.checks}):
        raise ValueError("checks of one name must all be PSNRs or all be judges")
    blend = parse_blend(row.mask_words)
    relative = _inside(row.file_name, "file_name")
    optional = {name: None if value is None else folder / _inside(value, name)
                for name, value in (("mask", row.mask), ("target_image", row.target_image))}
    return EvalItem(item_id, folder / relative, relative, row.source, row.target, row.type, blend,
                    mask_file=optional["mask"], target_image=optional["target_image"], palettes=row.palettes,
                    checks=row.checks, root=folder)


def read_folder(folder: Path) -> Dataset:
    dataset, rows, problems = Dataset("folder", folder, []), [], []
    for number, line in enumerate(_text(folder / CAPTIONS_NAME).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, _FolderRow.model_validate_json(line)))
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "the line"
            problems.append((number, f"{where}: {problem['msg']}"))
    stems = [row.id or PurePosixPath(row.file_name).stem for _, row in rows]
    for (number, row), stem in zip(rows, stems):
        item_id = stem if row.id or stems.count(stem) == 1 else f"{stem}-{number}"
        try:
            dataset.items.append(_folder_item(folder, row, item_id))
        except ValueError as err:
            problems.append((number, str(err)))
    dataset.problems = [f"{CAPTIONS_NAME} line {number}: {text}" for number, text in sorted(problems)]
    ids = [item.id for item in dataset.items]
    if len(set(ids)) != len(ids):
        raise InputError(f"{folder / CAPTIONS_NAME}: the id {next(i for i in ids if ids.count(i) > 1)!r} is "
                         "given to several rows")
    return dataset


def open_dataset(path: str | Path, images: str | Path | None = None) -> Dataset:
    """The data set at `path`, by what it is (see the module's docstring)."""
    path = Path(path)
    if path.is_dir() and images is not None:
        raise UsageError("--images applies to the authors' CSV files; a folder holds its own images")
    if path.is_dir() and (path / PIE_MAPPING).exists():
        return read_pie_bench(path)
    if path.is_dir() and (path / CAPTIONS_NAME).exists():
        return read_folder(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        if images is None:
            raise UsageError(f"{path.name}: give the folder of its images with --images (the authors publish "
                             "them as editing_images.tar)")
        if not Path(images).is_dir():
            raise UsageError(f"--images {images}: no such folder")
        return read_authors_csv(path, Path(images))
    raise UsageError(f"{path}: not a data set: expected a PIE-Bench folder ({PIE_MAPPING} and {PIE_IMAGES}/), "
                     f"one of the authors' CSV files (with --images), or a folder with {CAPTIONS_NAME}")


def select(dataset: Dataset, types: list[str] | None, limit: int | None) -> list[EvalItem]:
    """The items of the editing types asked for (PIE-Bench's by number or name), at most `limit` of them."""
    items = dataset.items
    if types:
        known = {kind for kind in (item.kind for item in items) if kind}
        pie = dataset.kind == "pie-bench"
        wanted = {PIE_TYPES.get(kind, kind.replace("_", " ")) if pie else kind for kind in types}
        unknown = sorted(wanted - known)
        if unknown:
            raise UsageError(f"--types: no items of type {', '.join(unknown)} (types here: "
                             f"{', '.join(sorted(known)) or 'none'})")
        items = [item for item in items if item.kind in wanted]
    return items[:limit] if limit is not None else items
