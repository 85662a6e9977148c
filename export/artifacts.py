"""The files `icd export` builds for one model, and the index that says which of them can be trusted.

Everything lives in `icd_home()/artifacts/<model fingerprint>/`: fused UNet weights (safetensors), ONNX
graphs and TensorRT engines. `index.json` records for each file what it is (kind, direction, precision,
shapes...), the model fingerprint, the format version, the tool versions, and the size and SHA-256 of its
files. A file is used only when its entry matches what is asked for and its files still have the recorded
sizes; anything else (another model, an older format, a build cut short, a file changed since) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icd import __version__
from icd.models.cache import icd_home
from icd.models.loading import DTYPES, PRECISIONS, fuse_unets, unet_from_state
from icd.models.manifest import Manifest

FORMAT = 1
INDEX_NAME = "index.json"


def artifacts_dir(manifest: Manifest) -> Path:
    return icd_home() / "artifacts" / manifest.fingerprint


def file_digest(paths: list[Path]) -> str:
    """SHA-256 over the files in order (computed once, at build time)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    import diffusers

    return {"icd": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


@dataclass
class Index:
    """The index of one model's artifact folder; entries map an artifact name to its description."""

    folder: Path
    fingerprint: str
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, manifest: Manifest) -> Index:
        """The folder's index; an unreadable one, another model's or an older format's counts as empty."""
        folder = artifacts_dir(manifest)
        index = cls(folder, manifest.fingerprint)
        try:
            data = json.loads((folder / INDEX_NAME).read_text())
        except (OSError, ValueError):
            return index
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("fingerprint") == manifest.fingerprint:
            index.entries = dict(data.get("artifacts", {}))
        return index

    def matching(self, **spec) -> list[str]:
        """The artifacts whose entries have all of `spec`'s values, valid or not."""
        return [name for name, entry in self.entries.items() if all(entry.get(k) == v for k, v in spec.items())]

    def find(self, **spec) -> str | None:
        """The name of a valid artifact whose entry has all of `spec`'s values, or None."""
        return next((name for name in self.matching(**spec) if self.intact(name)), None)

    def intact(self, name: str) -> bool:
        files = self.entries[name].get("files", {})
        return bool(files) and all((self.folder / f).is_file() and (self.folder / f).stat().st_size == size
                                   for f, size in files.items())

    def files(self, name: str) -> list[Path]:
        return [self.folder / f for f in self.entries[name]["files"]]

    def record(self, name: str, files: list[Path], **spec) -> dict:
        """Describe a freshly built artifact (its files already in the folder) and save the index."""
        entry = {**spec, "files": {p.name: p.stat().st_size for p in files}, "sha256": file_digest(files),
                 "versions": tool_versions()}
        self.entries = {k: v for k, v in self.entries.items() if k != name} | {name: entry}
        self._save()
        return entry

    def remove(self, name: str) -> None:
        """Forget an artifact and delete its files."""
        for path in self.files(name):
            path.unlink(missing_ok=True)
        del self.entries[name]
        self._save()

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "fingerprint": self.fingerprint, "artifacts": self.entries}
        temporary = self.folder / (INDEX_NAME + ".tmp")
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, self.folder / INDEX_NAME)


@dataclass(frozen=True)
class Built:
    """One artifact `icd export` made valid: built now, or reused."""

    name: str
    reused: bool


def onnx_name(direction: str, precision: str) -> str:
    return f"unet-{direction}-{precision}.onnx"


def fused_name(direction: str, precision: str) -> str:
    return f"unet-{direction}-{precision}.safetensors"


def save_fused_unet(index: Index, unet, direction: str, precision: str) -> str:
    """Write a fused UNet's weights in `precision` and record them."""
    from safetensors.torch import save_file

    name = fused_name(direction, precision)
    dtype = DTYPES[precision]
    index.folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.to(dtype).contiguous() for key, value in unet.state_dict().items()}
    save_file(state, str(index.folder / name))
    index.record(name, [index.folder / name], kind="unet", direction=direction, precision=precision)
    return name


def load_fused_unet(manifest: Manifest, config: dict, direction: str, dtype: torch.dtype, device: torch.device):
    """The fused UNet from valid artifacts (in `dtype`, else fp32 cast on loading), or None when there is none."""
    from safetensors.torch import load_file

    index = Index.open(manifest)
    name = index.find(kind="unet", direction=direction, precision=PRECISIONS[dtype]) or index.find(
        kind="unet", direction=direction, precision="fp32")
    if name is None:
        return None
    return unet_from_state(config, load_file(str(index.folder / name), device=str(device)), str(index.folder / name))


def fused_unets(manifest: Manifest, config: dict, directions: tuple[str, ...], dtype: torch.dtype,
                device: torch.device) -> list:
    """The fused UNets of `directions`: from `icd export`'s artifacts when valid (a fast start: no teacher, no
    LoRA work), else teacher + LoRA, reading the teacher once for all."""
    found = {d: load_fused_unet(manifest, config, d, dtype, device) for d in directions}
    missing = tuple(d for d, unet in found.items() if unet is None)
    found.update(zip(missing, fuse_unets(manifest, config, missing)))
    return [found[d] for d in directions]
