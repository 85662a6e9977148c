"""Model manifests (`icd.json`) and how a `--model` argument becomes one.

A manifest names the pieces of an iCD model: the base Stable Diffusion pipeline (a local diffusers folder
or a Hugging Face hub id), the CFG-distilled teacher UNet weights, the forward (encoding) and reverse
(decoding) LoRAs, and the timesteps each was distilled for. Paths are relative to the manifest's folder;
teacher and LoRA entries may also be http(s) URLs, downloaded into the cache on first use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import hub
from .errors import ModelError

MANIFEST_NAME = "icd.json"
KINDS = ("sd15", "sdxl")
TINY_MODELS = {"tiny": "sd15", "tiny-sdxl": "sdxl"}
# Models shipped inside the package: `mini`, trained on the miniature world by bench/miniature/recipe.py.
BUILTIN_MODELS = ("mini",)


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
        return hub.cached_download(value)
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
    embed_dim = data.get("guidance_embed_dim", 512 if teacher else None)
    if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim <= 0 or embed_dim % 2):
        raise ModelError(f"{where}: 'guidance_embed_dim' must be a positive even integer")
    forward, reverse = _timesteps(data, "forward_timesteps", where), _timesteps(data, "reverse_timesteps", where)
    resolution = data.get("resolution", 512 if kind == "sd15" else 1024)
    if not isinstance(resolution, int) or resolution < 8:
        raise ModelError(f"{where}: 'resolution' must be an integer number of pixels")
    edit_defaults = data.get("edit", {})
    if not isinstance(edit_defaults, dict) or not set(edit_defaults) <= {"method", "guidance", "tau"}:
        raise ModelError(f"{where}: 'edit' may only set method, guidance and tau")
    return Manifest(
        name=str(data.get("name") or folder.name),
        kind=kind,
        base=str(local_base) if local_base.is_dir() else base,
        teacher=teacher,
        guidance_embed_dim=embed_dim,
        forward_lora=_weights_path(data.get("forward_lora"), folder, "forward_lora", where),
        reverse_lora=_weights_path(data.get("reverse_lora"), folder, "reverse_lora", where),
        lora_alpha=float(data.get("lora_alpha", 8)),
        forward_timesteps=forward,
        reverse_timesteps=reverse,
        resolution=resolution,
        path=path,
        edit_defaults=tuple(sorted(edit_defaults.items())),
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


def resolve_model(ref: str) -> Manifest:
    """`--model` → manifest: a folder or icd.json path, a downloaded preset, or a built-in tiny model."""
    candidate = Path(ref).expanduser()
    if candidate.exists():
        return load_manifest(candidate)
    if ref in BUILTIN_MODELS:
        from importlib.resources import files

        return load_manifest(Path(str(files("icdcli") / "assets" / ref)))
    if ref in TINY_MODELS:
        from .tiny import build_tiny_model

        folder = hub.icd_home() / "models" / ref
        if not (folder / MANIFEST_NAME).is_file():
            build_tiny_model(folder, kind=TINY_MODELS[ref])
        return load_manifest(folder)
    preset = hub.resolve_preset_name(ref)
    if preset is not None:
        manifest = hub.preset_dir(preset) / MANIFEST_NAME
        if not manifest.is_file():
            raise ModelError(f"model '{ref}' is not downloaded yet: run `icd pull {ref}`")
        return load_manifest(manifest)
    names = ", ".join([*hub.PRESETS, *hub.ALIASES, *BUILTIN_MODELS, *TINY_MODELS])
    raise ModelError(f"unknown model '{ref}': not a folder with {MANIFEST_NAME} nor a preset ({names})")
