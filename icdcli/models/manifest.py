"""Model manifests (`icd.json`): reading, checking and writing them, and the one writer of model folders.

A manifest names an iCD model's pieces: the base pipeline (a local diffusers folder or a hub id), the
CFG-distilled teacher, the forward and reverse LoRAs with their timesteps, optionally a VAE replacing the base's.
Paths are relative to its folder; teacher and LoRAs may be http(s) URLs, downloaded into the cache on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..core.schedule import NUM_TRAIN_TIMESTEPS
from ..errors import ICDError, ModelError
from ..files import atomic_write, temporary_path, update_with_ends
from ..limits import MAX_SIDE
from .cache import cached_download, cached_download_path
from .official import EDIT_METHODS, GUIDANCE_EMBED_DIM, KINDS, LORA_ALPHA, RESOLUTION

MANIFEST_NAME = "icd.json"
WEIGHT_KEYS = ("teacher", "forward_lora", "reverse_lora")
MAX_STEPS = 16  # a consistency model's few steps; a schedule of hundreds would run for minutes per picture
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str
    base: str  # absolute local folder, or a hub id
    teacher: Path | None
    guidance_embed_dim: int | None
    forward_lora: Path | None
    reverse_lora: Path | None
    lora_alpha: float
    forward_timesteps: tuple[int, ...]
    reverse_timesteps: tuple[int, ...]
    resolution: int
    path: Path | None = None
    edit_defaults: tuple[tuple[str, str | float], ...] = ()  # a model's own edit method / guidance / tau
    demo: tuple[Path, str, str] | None = None  # the picture `icd demo` edits, with its source and target prompts
    vae: str | None = None  # a VAE replacing the base's: absolute local folder, or a hub id

    @cached_property
    def fingerprint(self) -> str:
        """A short content hash of the model: manifest fields plus the size and first and last megabyte of every
        weight file (tells any two real checkpoints apart, where hashing them whole costs seconds a start)."""
        digest = hashlib.sha256()
        fields = (self.kind, self.base, self.guidance_embed_dim, self.lora_alpha,
                  self.forward_timesteps, self.reverse_timesteps) + ((self.vae,) if self.vae else ())
        digest.update(repr(fields).encode())
        for weights in (self.teacher, self.forward_lora, self.reverse_lora):
            if weights is None:
                digest.update(b"-")
                continue
            size = weights.stat().st_size
            digest.update(str(size).encode())
            with open(weights, "rb") as f:
                update_with_ends(digest, f, size)
        return digest.hexdigest()[:16]


class _Strict(BaseModel):
    """Strict types: in a manifest the string "8" or true is no number, and a misspelt key is an error."""

    model_config = ConfigDict(strict=True, extra="forbid")


PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Timestep = Annotated[int, Field(ge=1, le=NUM_TRAIN_TIMESTEPS - 1)]


def _few_distinct_steps(steps: list[int]) -> list[int]:
    """A few distinct boundaries, sorted (the file may list them in any order)."""
    if len(steps) > MAX_STEPS:
        raise ValueError(f"{len(steps)} timesteps, but a consistency model takes at most {MAX_STEPS} steps")
    if repeated := sorted({t for t in steps if steps.count(t) > 1}):
        raise ValueError(f"each timestep may appear once, {repeated[0]} repeats")
    return sorted(steps)


Timesteps = Annotated[list[Timestep], Field(min_length=1), AfterValidator(_few_distinct_steps)]


class _EditSchema(_Strict):
    method: Literal[EDIT_METHODS] | None = None
    guidance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    tau: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class _DemoSchema(_Strict):
    image: str
    source: str
    target: str


class ManifestSchema(_Strict):
    """What an icd.json may hold; fields it does not name (a description, notes) are ignored."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    kind: Literal[KINDS]
    base: Annotated[str, Field(min_length=1)]
    teacher: str | None = None
    guidance_embed_dim: Annotated[int, Field(gt=0, multiple_of=2)] | None = None
    forward_lora: str | None = None
    reverse_lora: str | None = None
    lora_alpha: PositiveNumber = LORA_ALPHA
    forward_timesteps: Timesteps
    reverse_timesteps: Timesteps
    resolution: Annotated[int, Field(ge=8, le=MAX_SIDE)] | None = None
    edit: _EditSchema = _EditSchema()
    demo: _DemoSchema | None = None
    vae: Annotated[str, Field(min_length=1)] | None = None


def _schema_problem(err: ValidationError) -> str:
    """Pydantic's first complaint, compactly: "field 'edit.tau': Input should be ... (got 1.5)"."""
    first = err.errors(include_url=False)[0]
    names = [str(part) for part in first["loc"] if isinstance(part, str)]
    items = [str(part) for part in first["loc"] if isinstance(part, int)]
    where = f"field '{'.'.join(names)}'" + (f" (item {', '.join(items)})" if items else "")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "model_type":  # pydantic would name the schema class
        message = "Input should be a JSON object"
    value = first.get("input")
    if first["type"] != "missing" and not isinstance(value, (dict, list)):
        message += f" (got {reprlib.repr(value)})"
    return f"{where}: {message}"


def validate_fields(data, where: str) -> ManifestSchema:
    """The manifest's fields checked against the schema (no file is looked at); one ModelError line."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: the manifest must be a JSON object")
    try:
        return ManifestSchema.model_validate(data)
    except ValidationError as err:
        raise ModelError(f"{where}: {_schema_problem(err)}") from None
    except RecursionError:
        raise ModelError(f"{where}: the manifest is nested too deeply") from None


# A Hugging Face hub id as the hub takes it: NAME or OWNER/NAME, each of letters, digits, '_', '-' and '.', neither
# starting nor ending with '-' or '.', without '--' or '..', at most 96 characters.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?/)?[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?", re.ASCII)


def _folder_or_hub_id(value: str, folder: Path, where: str, key: str) -> str:
    """A base or VAE entry: the absolute folder it names relative to the manifest, else a hub id, else ModelError."""
    local = (folder / value).resolve()
    if local.is_dir():
        return str(local)
    if "://" in value:
        raise ModelError(f"{where}: field '{key}': {reprlib.repr(value)} is a URL, which {key} cannot be: name a "
                         "Hugging Face hub id (owner/name) or a local diffusers folder")
    if not _HUB_ID.fullmatch(value) or len(value) > 96 or "--" in value or ".." in value:
        raise ModelError(f"{where}: field '{key}': {reprlib.repr(value)} is neither a folder (there is none at "
                         f"{local}) nor a Hugging Face hub id (owner/name)")
    return value


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _weights_path(value: str | None, folder: Path, key: str, where: str) -> Path | None:
    if value is None:
        return None
    if _is_url(value):
        return cached_download(value)
    path = (folder / value).resolve()
    if not path.is_file():
        raise ModelError(f"{where}: {key} file not found: {path}")
    return path


def parse_manifest(data: dict, folder: Path, where: str, path: Path | None = None) -> Manifest:
    """Validate a manifest dict; every problem becomes one ModelError line naming the field."""
    fields = validate_fields(data, where)
    teacher = _weights_path(fields.teacher, folder, "teacher", where)
    embed_dim = fields.guidance_embed_dim
    if "guidance_embed_dim" not in fields.model_fields_set and teacher is not None:
        embed_dim = GUIDANCE_EMBED_DIM
    demo = fields.demo
    if demo is not None:
        demo = (_weights_path(demo.image, folder, "demo image", where), demo.source, demo.target)
    return Manifest(
        name=fields.name or folder.name,
        kind=fields.kind,
        base=_folder_or_hub_id(fields.base, folder, where, "base"),
        teacher=teacher,
        guidance_embed_dim=embed_dim,
        forward_lora=_weights_path(fields.forward_lora, folder, "forward_lora", where),
        reverse_lora=_weights_path(fields.reverse_lora, folder, "reverse_lora", where),
        lora_alpha=fields.lora_alpha,
        forward_timesteps=tuple(fields.forward_timesteps),
        reverse_timesteps=tuple(fields.reverse_timesteps),
        resolution=fields.resolution or RESOLUTION[fields.kind],
        path=path,
        edit_defaults=tuple(sorted(fields.edit.model_dump(exclude_none=True).items())),
        demo=demo,
        vae=None if fields.vae is None else _folder_or_hub_id(fields.vae, folder, where, "vae"),
    )


def _read_json(path: Path):
    """A manifest file's JSON, refused before parsing when it is too large to be one."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ModelError(f"{path}: {size} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have")
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a readable JSON manifest ({err})") from None
    except RecursionError:
        raise ModelError(f"{path}: not a readable JSON manifest (nested too deeply)") from None


def _manifest_path(path: str | Path) -> Path:
    """An `icd.json` path, or the one inside a folder."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def load_manifest(path: str | Path) -> Manifest:
    """Read an `icd.json` (or the one inside a folder)."""
    path = _manifest_path(path)
    if not path.is_file():
        raise ModelError(f"no model manifest at {path}")
    return parse_manifest(_read_json(path), path.parent, str(path), path)


def model_files(path: str | Path) -> tuple[list[Path], list[str]]:
    """What a model folder (or icd.json) is made of without fetching anything: the local files it uses (its
    folder, teacher, LoRAs, local base and VAE), and what it still needs from the network (uncached URLs, hub ids)."""
    path = _manifest_path(path)
    fields = validate_fields(_read_json(path), str(path))
    folder = path.parent
    local, remote = [folder], []
    for value in (fields.teacher, fields.forward_lora, fields.reverse_lora):
        if value is not None and _is_url(value):
            cached = cached_download_path(value)
            local.append(cached) if cached.is_file() else remote.append(value)
        elif value is not None and (folder / value).is_file():
            local.append((folder / value).resolve())
    for source in (fields.base, fields.vae):
        if source is not None:
            local.append((folder / source).resolve()) if (folder / source).is_dir() else remote.append(source)
    return local, remote


def write_model(folder: str | Path, fields: Mapping,
                files: Mapping[str, Callable[[Path], object]] | None = None) -> Path:
    """The one writer of model folders: each of `files` (name -> writer of a path) atomically, then icd.json,
    last so that a folder holding one is complete, checked as `load_manifest` reads it, with local paths relative
    to the folder where they can be (it can move with what it names). Returns the icd.json path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (files or {}).items():
        atomic_write(folder / name, write, overwrite=True)
    data = dict(fields)
    for key in (*WEIGHT_KEYS, "base", "vae"):
        value = data.get(key)
        if value is not None and not _is_url(str(value)) and (folder / value).exists():
            data[key] = _relative(folder / value, folder)
    parse_manifest(data, folder, str(folder / MANIFEST_NAME))
    path = folder / MANIFEST_NAME
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"), overwrite=True)
    return path


def _relative(path: Path, folder: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(path.resolve())


TEACHER_FILE = "teacher.pt"  # the teacher's name inside a model folder (the official teacher format)
BASE_FOLDER = "base"  # a local base model's name inside a model folder


def link_or_copy(source: Path, target: Path) -> None:
    """`source` at `target`: a hard link on the same filesystem (no extra disk), else a copy by atomic_write. A
    link is whole when made; under a temporary name renamed over `target`, it replaces an earlier one in one step
    (not through atomic_write, whose mode fixing would change the source's modes too)."""
    if target.exists() and os.path.samefile(source, target):
        return  # already this file (a resumed run saving again); renaming a link onto itself does nothing
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    try:
        os.link(source, temporary)
    except OSError:  # another filesystem (EXDEV), one without hard links, or not permitted
        atomic_write(target, partial(shutil.copyfile, source), overwrite=True)
        return
    try:
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ICDError(f"{target.name}: cannot write ({exc.strerror})") from exc


def carry_inside(output: Path, teacher: Path | None, base: str) -> dict:
    """Place the teacher and a local base folder inside the model folder `output`; returns the icd.json fields
    naming them there. A hub-id base stays a hub id (the hub cache holds it)."""
    fields = {"base": base}
    if teacher is not None:
        link_or_copy(teacher, output / TEACHER_FILE)
        fields["teacher"] = TEACHER_FILE
    if Path(base).is_dir():
        for folder, _, names in os.walk(base, followlinks=True):  # a hub snapshot's files are links to blobs
            for name in names:
                source = Path(folder, name)
                link_or_copy(source, output / BASE_FOLDER / source.relative_to(base))
        fields["base"] = BASE_FOLDER
    return fields
