"""The files `icd export` builds for one model, and the index that says which of them can be trusted.

They live in `icd_home()/artifacts/<model fingerprint>/` beside `index.json`, which records each artifact's
description, the fingerprint, the format and tool versions, and per file its size, time and the SHA-256 of its
ends (first and last MiB) and of the whole. A file is used only while it is a regular file (anything else is
refused unopened) with the recorded size, time and ends: two MiB read per file, and two graphs swapped by name
differ in time. One whose time alone changed (a cache copied without its times) is kept when its whole hash
still matches; anything else is forgotten with one warning and rebuilt by the next export (`--verify` hashes
every file whole). An index naming anything but plain files of its folder is damaged and replaced by an empty
one, so nothing outside is read or deleted. Files are built in a private folder and moved in when complete;
index writers hold a lock file and merge with the disk, so concurrent exports lose no entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, BinaryIO

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from icd import __version__
from icd.errors import ICDError, first_line
from icd.files import atomic_write, open_regular, temporary_path, update_with_ends
from icd.models.cache import cache_error, exclusive_lock, icd_home, writing_cache
from icd.models.loading import DTYPES, PRECISIONS, fuse_unets, unet_from_state
from icd.models.manifest import Manifest

log = logging.getLogger("icd")

# 2: a SHA-256 per file; 3: P2P graphs return the blend maps after injection and amplification; 4: each file's
# stamp (size, time, the hash of its ends) checked whenever it is used, the CPU-optimised graphs indexed.
FORMAT = 4
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
MAX_INDEX_BYTES = 16 << 20  # an index is a few kilobytes: anything near this is not one
END_BYTES = 1 << 20  # how much of each end of a file its stamp hashes
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports a failed system call


def artifacts_dir(manifest: Manifest) -> Path:
    return icd_home() / "artifacts" / manifest.fingerprint


def _plain_name(name: str) -> str:
    """A file directly in the artifacts folder: no separator, no '..', not hidden (the lock, the temporaries),
    not the index itself, no NUL."""
    if not name or name.startswith(".") or name == INDEX_NAME or "\0" in name or \
            any(sep in name for sep in (os.sep, os.altsep, "/") if sep):
        raise ValueError(f"{name!r} is not a file of this folder")
    return name


_Hex = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
_PlainName = Annotated[str, AfterValidator(_plain_name)]


class _FileRecord(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    size: int = Field(ge=0)
    mtime_ns: int
    ends_sha256: _Hex
    sha256: _Hex


class _Entry(BaseModel):
    """What every entry must hold; the rest of it (kind, direction, shapes...) is matched as it is."""

    model_config = ConfigDict(strict=True, extra="allow")

    files: Annotated[dict[_PlainName, _FileRecord], Field(min_length=1)]
    sha256: _Hex


_ARTIFACTS = TypeAdapter(dict[_PlainName, _Entry])


class _Damaged(Exception):
    """An index that cannot be trusted as a whole; the message says why."""


def _read_index(path: Path, fingerprint: str) -> dict[str, dict]:
    """The entries of the index file at `path`: none when there is none, or when it is another model's or
    another format's (stale, not damaged); _Damaged when it cannot be trusted."""
    if not os.path.lexists(path):
        return {}
    try:
        with open_regular(path, follow_symlinks=False) as file:
            raw = file.read(MAX_INDEX_BYTES + 1)
    except ICDError as err:
        raise _Damaged(str(err)) from None
    if len(raw) > MAX_INDEX_BYTES:
        raise _Damaged(f"over {MAX_INDEX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Damaged("not JSON") from None
    if not isinstance(data, dict):
        raise _Damaged("not a JSON object")
    if data.get("format") != FORMAT or data.get("fingerprint") != fingerprint:
        return {}
    try:
        _ARTIFACTS.validate_python(data.get("artifacts"))
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        parts = [str(part) for part in first["loc"] if part != "[key]"]
        where = f"entry {parts[0]!r}" + (f", field {'.'.join(parts[1:])!r}" if len(parts) > 1 else "") if parts \
            else "its artifacts"
        raise _Damaged(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    return data["artifacts"]


def _whole_sha256(file: BinaryIO) -> str:
    return hashlib.file_digest(file, "sha256").hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a regular file (symbolic links are not followed); ICDError for anything else."""
    with open_regular(path, follow_symlinks=False) as file:
        return _whole_sha256(file)


def _ends_sha256(file: BinaryIO, size: int) -> str:
    return update_with_ends(hashlib.sha256(), file, size, END_BYTES).hexdigest()


def _file_record(path: Path) -> dict:
    with open_regular(path, follow_symlinks=False) as file:
        status = os.fstat(file.fileno())
        ends = _ends_sha256(file, status.st_size)
        file.seek(0)
        whole = _whole_sha256(file)
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "ends_sha256": ends, "sha256": whole}


def _stamp_problem(path: Path, record: dict) -> tuple[str | None, int | None]:
    """(why the file is not the one recorded, or None; its new time when only the time changed and the whole
    file still hashes as recorded)."""
    try:
        with open_regular(path, follow_symlinks=False) as file:
            status = os.fstat(file.fileno())
            if status.st_size != record["size"]:
                return f"{path.name} has {status.st_size} bytes, not the {record['size']} built", None
            if _ends_sha256(file, status.st_size) != record["ends_sha256"]:
                return f"{path.name} is not the file built", None
            if status.st_mtime_ns == record["mtime_ns"]:
                return None, None
            file.seek(0)
            if _whole_sha256(file) != record["sha256"]:
                return f"{path.name} is not the file built", None
            return None, status.st_mtime_ns
    except ICDError as err:
        return str(err), None


def key_hash(spec: dict) -> str:
    """A short, stable name for a description: its sorted JSON's SHA-256, cut to 16 digits."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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
        """The folder's index; another model's or an older format's counts as empty, a damaged one is replaced."""
        index = cls(artifacts_dir(manifest), manifest.fingerprint)
        index.entries = index._read()
        return index

    def _read(self) -> dict[str, dict]:
        try:
            return _read_index(self.folder / INDEX_NAME, self.fingerprint)
        except _Damaged as damage:
            self._replace_damaged(str(damage))
            return {}

    def _replace_damaged(self, why: str) -> None:
        """One warning, then an empty index in the damaged one's place (when the cache can be written)."""
        try:
            with self.lock():
                with suppress(_Damaged):  # another process may have replaced it meanwhile
                    _read_index(self.folder / INDEX_NAME, self.fingerprint)
                    return
                log.warning("%s is damaged (%s): it is replaced by an empty index, and the next `icd export` "
                            "rebuilds the artifacts", self.folder / INDEX_NAME, why)
                self._write({})
        except ICDError as err:
            log.warning("%s is damaged (%s) and cannot be replaced: %s", self.folder / INDEX_NAME, why, err)

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
        """Whether each file of the artifact is still the one built (see the module's docstring); one that is
        not is forgotten (its files deleted, one warning) unless another process rebuilt it meanwhile."""
        entry = self.entries.get(name)
        if entry is None:  # forgotten meanwhile (by this process, or another one whose index was read since)
            return False
        problem, restamped = self._problem(entry)
        if problem is None:
            if restamped:  # a copied cache: the files are the ones built, under new times
                self._changes[name] = {**entry, "files": {**entry["files"], **restamped}}
                with suppress(ICDError):  # a read-only cache: they are hashed whole again next time
                    self._save()
            return True
        try:
            with self.lock():
                self.reload()
                if self.entries.get(name) != entry:  # rebuilt or removed by another process meanwhile
                    return name in self.entries and self._problem(self.entries[name])[0] is None
                self.forget_damaged(name, problem, "it is not used")
        except ICDError as err:  # a read-only cache: not used, and not forgotten either
            log.warning("%s is damaged (%s) and cannot be removed: %s", self.folder / name, problem, err)
        return False

    def _problem(self, entry: dict) -> tuple[str | None, dict[str, dict]]:
        """Why the entry's files are not the ones built (None when they are), and the records of the files
        whose time alone changed."""
        restamped = {}
        for file_name, record in entry["files"].items():
            problem, new_time = _stamp_problem(self.folder / file_name, record)
            if problem is not None:
                return problem, {}
            if new_time is not None:
                restamped[file_name] = {**record, "mtime_ns": new_time}
        return None, restamped

    def files(self, name: str) -> list[Path]:
        return [self.folder / f for f in self.entries[name]["files"]]

    def damaged_files(self, name: str) -> list[str]:
        """The files of an artifact whose SHA-256 differs from the one recorded at build time (the full check)."""
        damaged = []
        for file_name, record in self.entries[name]["files"].items():
            with suppress(ICDError):  # an unreadable file is damaged too
                if file_sha256(self.folder / file_name) == record["sha256"]:
                    continue
            damaged.append(file_name)
        return damaged

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A private folder inside the artifacts folder to build files in (`record` moves them under their
        names). It is removed whatever happens; a killed export's is swept by the next one."""
        with writing_cache():
            self.folder.mkdir(parents=True, exist_ok=True)
            scratch = temporary_path(self.folder / "build")
            scratch.mkdir()
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def record(self, name: str, built: list[Path], **spec) -> dict:
        """Move freshly built files (from `staged`) under their names, describe them and save the index."""
        with writing_cache():
            for path in built:
                if path != self.folder / path.name:
                    os.replace(path, self.folder / path.name)
            records = {path.name: _file_record(self.folder / path.name) for path in built}
        entry = {**spec, "files": records, "versions": tool_versions(),
                 "sha256": hashlib.sha256("".join(r["sha256"] for r in records.values()).encode()).hexdigest()}
        self._changes[name] = entry
        self._save()
        return entry

    def remove(self, name: str) -> None:
        """Forget an artifact and delete its files (plain names of this folder: the index was checked)."""
        with self.lock():
            for path in self.files(name):
                with suppress(FileNotFoundError, IsADirectoryError):
                    path.unlink()
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
            self._write(merged)

    def _write(self, artifacts: dict[str, dict]) -> None:
        data = {"format": FORMAT, "fingerprint": self.fingerprint, "artifacts": artifacts}
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write(self.folder / INDEX_NAME, lambda temporary: temporary.write_text(text), overwrite=True)


@dataclass(frozen=True)
class Built:
    """One artifact `icd export` made valid: built now, or reused."""

    name: str
    reused: bool


def onnx_name(direction: str, precision: str, steered: bool = False) -> str:
    """`steered`: the reverse UNet's Prompt-to-Prompt graph, beside its plain graph."""
    return f"unet-{direction}{'-p2p' if steered else ''}-{precision}.onnx"


def graph_kind(steered: bool) -> str:
    return "onnx-p2p" if steered else "onnx"


def fused_name(direction: str, precision: str) -> str:
    return f"unet-{direction}-{precision}.safetensors"


def save_fused_unet(index: Index, unet, direction: str, precision: str) -> str:
    """Write a fused UNet's weights in `precision` and record them."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    name = fused_name(direction, precision)
    dtype = DTYPES[precision]
    state = {key: value.to(dtype).contiguous() for key, value in unet.state_dict().items()}
    with index.staged() as scratch:
        try:
            save_file(state, str(scratch / name))
        except SafetensorError as err:  # a full disk, say: the system's error, as every other write gives it
            code = _OS_ERROR.search(str(err))
            if code is None:
                raise ICDError(f"cannot write {name}: {first_line(err)}") from None
            raise cache_error(OSError(int(code[1]), os.strerror(int(code[1])))) from None
        index.record(name, [scratch / name], kind="unet", direction=direction, precision=precision)
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
        index.forget_damaged(name, first_line(err), "using the teacher and LoRA instead")
        return None


def fused_unets(manifest: Manifest, config: dict, directions: tuple[str, ...], dtype: torch.dtype,
                device: torch.device) -> list:
    """The fused UNets of `directions`: from `icd export`'s artifacts when valid (a fast start: no teacher, no
    LoRA work), else teacher + LoRA, reading the teacher once for all."""
    found = {d: load_fused_unet(manifest, config, d, dtype, device) for d in directions}
    missing = tuple(d for d, unet in found.items() if unet is None)
    found.update(zip(missing, fuse_unets(manifest, config, missing)))
    return [found[d] for d in directions]
