"""Model manifests (`icd.json`): reading, checking and writing them, and the one writer of model folders.

A manifest names the pieces of an iCD model: the base Stable Diffusion pipeline (a local diffusers folder
or a Hugging Face hub id), the CFG-distilled teacher UNet weights, the forward (encoding) and reverse
(decoding) LoRAs, and the timesteps each was distilled for. Paths are relative to the manifest's folder;
teacher and LoRA entries may also be http(s) URLs, downloaded into the cache on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import ModelError
from ..files import atomic_write
from .cache import cached_download
from .official import GUIDANCE_EMBED_DIM, LORA_ALPHA

MANIFEST_NAME = "icd.json"
KINDS = ("sd15", "sdxl")
WEIGHT_KEYS = ("teacher", "forward_lora", "reverse_lora")


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

    @cached_property
    def fingerprint(self) -> str:
        """A short content hash of the model: manifest fields plus size and edges of every weight file.

        Hashing multi-gigabyte files whole would cost seconds at every start; size plus the first and last
        megabyte tells apart any two real checkpoints.
        """
        digest = hashlib.sha256()
        fields = (self.kind, self.base, self.guidance_embed_dim, self.lora_alpha,
                  self.forward_timesteps, self.reverse_timesteps)
        digest.update(repr(fields).encode())
        for weights in (self.teacher, self.forward_lora, self.reverse_lora):
            if weights is None:
                digest.update(b"-")
                continue
            size = weights.stat().st_size
            digest.update(str(size).encode())
            with open(weights, "rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read(1 << 20))
        return digest.hexdigest()[:16]


def _timesteps(data: dict, key: str, where: str) -> tuple[int, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and 0 < t < 1000 for t in value):
        raise ModelError(f"{where}: '{key}' must be a non-empty list of integer timesteps in 1..999")
    return tuple(sorted(value))


def _weights_path(value, folder: Path, key: str, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ModelError(f"{where}: '{key}' must be a path or URL")
    if value.startswith(("http://", "https://")):
        return cached_download(value)
    path = (folder / value).resolve()
    if not path.is_file():
        raise ModelError(f"{where}: {key} file not found: {path}")
    return path


def parse_manifest(data: dict, folder: Path, where: str, path: Path | None = None) -> Manifest:
    """Validate a manifest dict; every problem becomes one ModelError line naming the field."""
    kind = data.get("kind")
    if kind not in KINDS:
        raise ModelError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise ModelError(f"{where}: 'base' must name a diffusers folder or a hub id")
    local_base = (folder / base).resolve()
    teacher = _weights_path(data.get("teacher"), folder, "teacher", where)
    embed_dim = data.get("guidance_embed_dim", GUIDANCE_EMBED_DIM if teacher else None)
    if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim <= 0 or embed_dim % 2):
        raise ModelError(f"{where}: 'guidance_embed_dim' must be a positive even integer")
    forward, reverse = _timesteps(data, "forward_timesteps", where), _timesteps(data, "reverse_timesteps", where)
    resolution = data.get("resolution", 512 if kind == "sd15" else 1024)
    if not isinstance(resolution, int) or resolution < 8:
        raise ModelError(f"{where}: 'resolution' must be an integer number of pixels")
    edit_defaults = data.get("edit", {})
    if not isinstance(edit_defaults, dict) or not set(edit_defaults) <= {"method", "guidance", "tau"}:
        raise ModelError(f"{where}: 'edit' may only set method, guidance and tau")
    demo = data.get("demo")
    if demo is not None:
        if not isinstance(demo, dict) or not all(isinstance(demo.get(k), str) for k in ("image", "source", "target")):
            raise ModelError(f"{where}: 'demo' must give an image path, a source and a target prompt")
        demo = (_weights_path(demo["image"], folder, "demo image", where), demo["source"], demo["target"])
    return Manifest(
        name=str(data.get("name") or folder.name),
        kind=kind,
        base=str(local_base) if local_base.is_dir() else base,
        teacher=teacher,
        guidance_embed_dim=embed_dim,
        forward_lora=_weights_path(data.get("forward_lora"), folder, "forward_lora", where),
        reverse_lora=_weights_path(data.get("reverse_lora"), folder, "reverse_lora", where),
        lora_alpha=float(data.get("lora_alpha", LORA_ALPHA)),
        forward_timesteps=forward,
        reverse_timesteps=reverse,
        resolution=resolution,
        path=path,
        edit_defaults=tuple(sorted(edit_defaults.items())),
        demo=demo,
    )


def load_manifest(path: str | Path) -> Manifest:
    """Read an `icd.json` (or the one inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ModelError(f"no model manifest at {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a readable JSON manifest ({err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the manifest must be a JSON object")
    return parse_manifest(data, path.parent, str(path), path)


def write_model(folder: str | Path, fields: Mapping, files: Mapping[str, Callable[[Path], object]] | None = None,
                *, overwrite: bool = True) -> Path:
    """The one writer of model folders: each of `files` (name -> writer of a path) atomically, then icd.json.

    icd.json comes last, so a folder holding one is complete. Paths in `fields` (teacher, LoRAs, a local base)
    are written relative to the folder where they can be, so the folder can move with what it names. The
    manifest is checked as `load_manifest` will read it before it is written. Returns the icd.json path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (files or {}).items():
        atomic_write(folder / name, write, overwrite=overwrite)
    data = dict(fields)
    for key in (*WEIGHT_KEYS, "base"):
        value = data.get(key)
        if value is not None and not str(value).startswith(("http://", "https://")) and (folder / value).exists():
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
