"""The files `icd export` builds for one model, and the index that says which of them can be trusted.

Everything lives in `icd_home()/artifacts/<model fingerprint>/`: fused UNet weights (safetensors), ONNX
graphs and TensorRT engines. `index.json` records for each file what it is (kind, direction, precision,
shapes...), the model fingerprint, the format version, the tool versions, and the size and SHA-256 of each
of its files. A file is used only when its entry matches what is asked for and its files still have the
recorded sizes; anything else (another model, an older format, a build cut short, a file changed since) is
rebuilt. Sizes are checked at every start, hashes only by `icd export --verify` (hashing gigabytes costs
seconds); a file damaged in place that fails to load is forgotten with a warning and rebuilt by the next export.
Writers of the index hold a lock file and merge with what is on disk, so concurrent exports lose no entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icd import __version__
from icd.errors import ICDError
from icd.models.cache import exclusive_lock, icd_home, writing_cache
from icd.models.loading import DTYPES, PRECISIONS, fuse_unets, unet_from_state
from icd.models.manifest import Manifest

log = logging.getLogger("icd")

FORMAT = 3  # 2: a SHA-256 per file; 3: P2P graphs return the blend maps after injection and amplification
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"


def artifacts_dir(manifest: Manifest) -> Path:
    return icd_home() / "artifacts" / manifest.fingerprint


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
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
    _changes: dict[str, dict | None] = field(default_factory=dict)  # what this process recorded or removed

    @classmethod
    def open(cls, manifest: Manifest) -> Index:
        """The folder's index; an unreadable one, another model's or an older format's counts as empty."""
        index = cls(artifacts_dir(manifest), manifest.fingerprint)
        index.entries = index._read()
        return index

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads((self.folder / INDEX_NAME).read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("fingerprint") == self.fingerprint:
            artifacts = data.get("artifacts", {})
            return {k: v for k, v in artifacts.items() if isinstance(v, dict)} if isinstance(artifacts, dict) else {}
        return {}

    def reload(self) -> None:
        """Read the entries again (another Index of this folder, or another process, may have changed them)."""
        self.entries = self._read()

    def lock(self):
        """Exclusive between processes: held by an export for its whole run, and by every index write."""
        return exclusive_lock(self.folder / LOCK_NAME)

    def matching(self, **spec) -> list[str]:
        """The artifacts whose entries have all of `spec`'s values, valid or not."""
        return [name for name, entry in self.entries.items() if all(entry.get(k) == v for k, v in spec.items())]

    def find(self, **spec) -> str | None:
        """The name of a valid artifact whose entry has all of `spec`'s values, or None."""
        return next((name for name in self.matching(**spec) if self.intact(name)), None)

    def intact(self, name: str) -> bool:
        files = self.entries[name].get("files", {})
        return bool(files) and isinstance(files, dict) and all(
            (self.folder / f).is_file() and (self.folder / f).stat().st_size == size for f, size in files.items())

    def files(self, name: str) -> list[Path]:
        return [self.folder / f for f in self.entries[name].get("files", {})]

    def damaged_files(self, name: str) -> list[str]:
        """The files of an artifact whose SHA-256 differs from the one recorded at build time (the full check)."""
        recorded = self.entries[name].get("file_sha256", {})
        return [f for f in self.entries[name].get("files", {})
                if not (self.folder / f).is_file() or recorded.get(f) != file_sha256(self.folder / f)]

    def record(self, name: str, files: list[Path], **spec) -> dict:
        """Describe a freshly built artifact (its files already in the folder) and save the index."""
        digests = {p.name: file_sha256(p) for p in files}
        entry = {**spec, "files": {p.name: p.stat().st_size for p in files}, "file_sha256": digests,
                 "sha256": hashlib.sha256("".join(digests.values()).encode()).hexdigest(),
                 "versions": tool_versions()}
        self._changes[name] = entry
        self._save()
        return entry

    def remove(self, name: str) -> None:
        """Forget an artifact and delete its files."""
        with self.lock():
            for path in self.files(name):
                path.unlink(missing_ok=True)
            self._changes[name] = None
            self._save()

    def forget_damaged(self, name: str, why: str, instead: str) -> None:
        """A file that fails to load or to hash: one warning line, then it is deleted and rebuilt later."""
        log.warning("%s is damaged (%s): %s; the next `icd export` rebuilds it", self.folder / name, why, instead)
        self.remove(name)

    def _save(self) -> None:
        """Merge this process's changes into the index on disk, under the lock: another export's entries stay."""
        with self.lock(), writing_cache():
            merged = self._read()
            for name, entry in self._changes.items():
                merged.pop(name, None)
                if entry is not None:
                    merged[name] = entry
            self.entries = merged
            data = {"format": FORMAT, "fingerprint": self.fingerprint, "artifacts": merged}
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


def steered_onnx_name(precision: str) -> str:
    """The reverse UNet's Prompt-to-Prompt graph (kind "onnx-p2p"), beside its plain graph."""
    return f"unet-reverse-p2p-{precision}.onnx"


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
    """The fused UNet from valid artifacts (in `dtype`, else fp32 cast on loading), or None when there is none
    or it fails to load (then it is forgotten, with a warning)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = Index.open(manifest)
    name = index.find(kind="unet", direction=direction, precision=PRECISIONS[dtype]) or index.find(
        kind="unet", direction=direction, precision="fp32")
    if name is None:
        return None
    path = index.folder / name
    try:
        return unet_from_state(config, load_file(str(path), device=str(device)), str(path))
    except (ICDError, OSError, SafetensorError) as err:
        index.forget_damaged(name, str(err).splitlines()[0], "using the teacher and LoRA instead")
        return None


def fused_unets(manifest: Manifest, config: dict, directions: tuple[str, ...], dtype: torch.dtype,
                device: torch.device) -> list:
    """The fused UNets of `directions`: from `icd export`'s artifacts when valid (a fast start: no teacher, no
    LoRA work), else teacher + LoRA, reading the teacher once for all."""
    found = {d: load_fused_unet(manifest, config, d, dtype, device) for d in directions}
    missing = tuple(d for d, unet in found.items() if unet is None)
    found.update(zip(missing, fuse_unets(manifest, config, missing)))
    return [found[d] for d in directions]
