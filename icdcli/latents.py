"""Latent files written by `icd invert`: x_T, a `.safetensors` tensor `latent` (1, 4, height/8, width/8) fp32,
with metadata recording all that decoding it needs (model reference and fingerprint, prompt, seed, working and
original sizes, icd version). Reading checks the header first (`read_latent_info`, cheap enough for every input
before a model loads), then the values (`load_latent`); an unsound file is one InputError line naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, BinaryIO, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file

from . import __version__
from .errors import InputError, first_line
from .files import atomic_write, open_regular
from .images import as_array, check_pixel_count, max_pixels_limit
from .limits import MAX_SEED, MAX_SIDE

FORMAT = "icd-latent-1"
LATENT_SUFFIX = ".safetensors"
LATENT_NAME = ".latent.safetensors"  # what `icd invert` names its files: NAME.latent.safetensors
LATENT_CHANNELS = 4
VAE_FACTOR = 8  # pixels per latent cell, each way
MAX_HEADER_BYTES = 1 << 20  # a latent's header is a few hundred bytes; this refuses a bogus length at once
_FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # the float dtypes safetensors names
_NOT_A_LATENT = "a safetensors file, but not an icd latent (make one with `icd invert`)"

WorkingSide = Annotated[int, Field(gt=0, le=MAX_SIDE)]
Side = Annotated[int, Field(gt=0)]  # an original side: the photo's pixel count is checked against the limit
Count = Annotated[int, Field(ge=0)]


class LatentInfo(BaseModel):
    """What a latent file records beside the tensor. Unknown fields are ignored, so newer files still read."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore", protected_namespaces=())

    model: str  # the --model reference used for inversion
    model_fingerprint: str
    prompt: str
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    width: WorkingSide  # working size the latent was encoded at
    height: WorkingSide
    original_width: Side
    original_height: Side
    source: str  # the image file it came from
    icd_version: str = __version__


class _TensorEntry(BaseModel):
    """One tensor's line in a safetensors header."""

    model_config = ConfigDict(strict=True, extra="ignore")

    dtype: str
    shape: list[Count]
    data_offsets: Annotated[list[Count], Field(min_length=2, max_length=2)]  # [start, end) in the data


Schema = TypeVar("Schema", bound=BaseModel)


def save_latent(path: str | Path, latent, info: LatentInfo, *, overwrite: bool = False) -> None:
    """Write x_T (a numpy array or a torch tensor, stored as float32) and its record."""
    # json, not pydantic, writes the record: its ASCII escapes keep a file name that is not UTF-8 (a str with
    # surrogate escapes) exactly, where pydantic's UTF-8 output refuses it.
    metadata = {"format": FORMAT, "icd": json.dumps(info.model_dump())}
    tensors = {"latent": np.ascontiguousarray(as_array(latent))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def read_latent_info(path: str | Path) -> LatentInfo:
    """The latent file's record, with the format, the metadata and the tensor's shape checked from the header."""
    with open_regular(path) as file:
        return _read_header(file, Path(path).name)[0]


def load_latent(path: str | Path) -> tuple[np.ndarray, LatentInfo]:
    """The latent (a float32 numpy array) and its record; the header is checked first, then the values."""
    name = Path(path).name
    with open_regular(path) as file:
        info, entry, data_start = _read_header(file, name)
        file.seek(0)
        data = file.read()
    if entry.dtype == "BF16":  # numpy has no bfloat16: its bits are the top half of a float32's
        start, end = (data_start + offset for offset in entry.data_offsets)
        bits = np.frombuffer(data[start:end], dtype="<u2").astype("<u4") << 16
        latent = bits.view("<f4").reshape(entry.shape)
    else:
        try:
            latent = load_safetensors(data)["latent"]
        except SafetensorError as err:
            raise InputError(f"{name}: corrupt latent file ({first_line(err)})") from None
    if not np.isfinite(latent).all():
        raise InputError(f"{name}: the latent holds NaN or inf values")
    return latent.astype(np.float32), info


def _read_header(file: BinaryIO, name: str) -> tuple[LatentInfo, _TensorEntry, int]:
    """The header's record, checked against the tensor's entry, with that entry and where the (unread) data starts."""
    size = os.fstat(file.fileno()).st_size
    if size == 0:
        raise InputError(f"{name}: empty file, not an icd latent")
    if size < 8:
        raise InputError(f"{name}: too short for a safetensors file ({size} bytes)")
    header_length = int.from_bytes(file.read(8), "little")
    if header_length > MAX_HEADER_BYTES:
        raise InputError(f"{name}: not an icd latent (its header claims {header_length} bytes; "
                         f"a latent's is under {MAX_HEADER_BYTES})")
    raw = file.read(header_length)
    if len(raw) < header_length:
        raise InputError(f"{name}: truncated (the file ends inside its {header_length}-byte header)")
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        raise InputError(f"{name}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{name}: not a safetensors file (its header is not a JSON object)")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or "latent" not in header:
        raise InputError(f"{name}: {_NOT_A_LATENT}")
    others = sorted(set(header) - {"__metadata__", "latent"})
    if others:
        raise InputError(f"{name}: holds tensors other than 'latent' ({', '.join(others)}), not an icd latent")
    info = _parse_info(name, metadata.get("icd"))
    # The result is resized back to the original size: no bigger than a photo icd would take as input.
    check_pixel_count(f"{name}: original size", (info.original_width, info.original_height), max_pixels_limit())
    entry = _validated(_TensorEntry, header["latent"], f"{name}: tensor 'latent' field")
    _check_tensor(name, entry, info)
    expected_size = 8 + header_length + entry.data_offsets[1]
    if size < expected_size:
        raise InputError(f"{name}: truncated ({size} bytes; its header needs {expected_size})")
    if size > expected_size:
        raise InputError(f"{name}: {size - expected_size} bytes of unexpected data after the latent")
    return info, entry, 8 + header_length


def _parse_info(name: str, text: object) -> LatentInfo:
    if not isinstance(text, str):
        raise InputError(f"{name}: metadata 'icd' is missing")
    try:
        fields = json.loads(text)
    except ValueError:
        raise InputError(f"{name}: metadata 'icd' is not JSON") from None
    if not isinstance(fields, dict):
        raise InputError(f"{name}: metadata 'icd' is not a JSON object")
    return _validated(LatentInfo, fields, f"{name}: metadata field")


def _validated(schema: type[Schema], fields: object, context: str) -> Schema:
    """`schema` filled from `fields`, or one InputError line: `context 'field': what is wrong` (the first error)."""
    try:
        return schema.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InputError(f"{context} '{where}': {first['msg']}") from None


def _check_tensor(name: str, entry: _TensorEntry, info: LatentInfo) -> None:
    """The tensor must be (1, 4, height/8, width/8) floats for the working size the record names."""
    shape = tuple(entry.shape)
    if entry.dtype not in _FLOAT_BYTES:
        raise InputError(f"{name}: latent has dtype {entry.dtype}, expected floats (F32)")
    if len(shape) != 4 or shape[0] != 1:
        raise InputError(f"{name}: latent has shape {shape}, expected (1, C, h, w)")
    if shape[1] != LATENT_CHANNELS:
        raise InputError(f"{name}: latent has {shape[1]} channels, expected {LATENT_CHANNELS}")
    expected = (info.height // VAE_FACTOR, info.width // VAE_FACTOR)
    if shape[2:] != expected:
        raise InputError(f"{name}: latent is {shape[3]}x{shape[2]}, expected {expected[1]}x{expected[0]} "
                         f"for its {info.width}x{info.height} working size")
    start, end = entry.data_offsets
    if end - start != _FLOAT_BYTES[entry.dtype] * shape[1] * shape[2] * shape[3]:
        raise InputError(f"{name}: tensor 'latent' has {end - start} bytes of data, not what its shape needs")


def is_latent_file(path: str | Path) -> bool:
    return Path(path).suffix == LATENT_SUFFIX
