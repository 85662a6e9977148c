"""Released iCD models: presets, the local cache, and the downloader behind `icd pull`.

The official files are tar.gz archives on a plain HTTPS bucket with no checksums, so downloads resume
with Range requests, archives are checked for hostile members before anything is extracted, and every
final file appears atomically: an interrupted pull never leaves something that looks installed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from tqdm import tqdm

from .errors import ModelError

DEFAULT_BASE_URL = "https://storage.yandexcloud.net/yandex-research/invertible-cd/"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

# Base-model files a pipeline needs. The UNet weights come from the teacher .pt, so only its config.
# SD1.5 edits in fp32 (full-precision files); SDXL runs its UNet in fp16 (fp16 variant files, half the size).
_CONFIGS = ["model_index.json", "scheduler/*", "unet/config.json", "vae/config.json",
            "text_encoder/config.json", "tokenizer/*"]
BASE_FILES = {
    "sd15": _CONFIGS + ["vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"],
    "sdxl": _CONFIGS + ["vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
                        "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors",
                        "tokenizer_2/*"],
}
GUIDANCE_EMBED_DIM = 512
LORA_ALPHA = 8
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Preset:
    """One released iCD model: which archives to fetch and how its LoRAs step through time."""

    name: str
    kind: str
    base: str
    teacher_archive: str
    lora_archive: str
    forward_timesteps: tuple[int, ...]
    reverse_timesteps: tuple[int, ...]
    resolution: int
    description: str


def _presets(kind: str, base: str, resolution: int, label: str) -> list[Preset]:
    """The three step schedules released for one base model."""
    schedules = [("4step-259", "4steps_1", (19, 259, 519, 779)),
                 ("4step-249", "4steps_2", (19, 249, 499, 699)),
                 ("3step", "3steps", (19, 339, 699))]
    teacher = f"{kind}_cfg_distill.pt.tar.gz"
    return [Preset(name=f"{kind}-{suffix}", kind=kind, base=base, teacher_archive=teacher,
                   lora_archive=f"iCD-{label}_{archive}.tar.gz", forward_timesteps=forward,
                   reverse_timesteps=forward[1:] + (999,), resolution=resolution,
                   description=f"iCD-{label}, {len(forward)} steps, forward " + "/".join(map(str, forward)))
            for suffix, archive, forward in schedules]


PRESETS: dict[str, Preset] = {p.name: p for p in _presets("sd15", SD15_BASE, 512, "SD15")
                              + _presets("sdxl", SDXL_BASE, 1024, "SDXL")}
ALIASES = {"sd15": "sd15-4step-259", "sdxl": "sdxl-4step-249"}


def resolve_preset_name(name: str) -> str | None:
    """The preset a name or alias refers to, or None when it names none."""
    name = ALIASES.get(name, name)
    return name if name in PRESETS else None


def icd_home() -> Path:
    """The cache root: $ICD_HOME, else $XDG_CACHE_HOME/icd, else ~/.cache/icd."""
    if os.environ.get("ICD_HOME"):
        return Path(os.environ["ICD_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "icd"
    return Path.home() / ".cache" / "icd"


def preset_dir(name: str) -> Path:
    """Where one preset's LoRAs and icd.json live."""
    return icd_home() / "models" / name


def _offline_var() -> str | None:
    """The first offline switch that is set truthy, read now so tests and users can flip it."""
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUTHY), None)


def is_offline() -> bool:
    """Whether the user asked for no network access (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return _offline_var() is not None


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = 30) -> Path:
    """Fetch `url` to `dest`, resuming a previous `.part`; `dest` only ever appears complete."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content_range = response.headers.get("Content-Range", "")
            if response.status != 206 or not content_range.startswith(f"bytes {offset}-"):
                offset = 0  # the server ignored the Range header: start over
            expected = offset + response.length if response.length is not None else None
            with open(part, "ab" if offset else "wb") as out, tqdm(
                    total=expected, initial=offset, desc=dest.name, unit="B", unit_scale=True,
                    unit_divisor=1024, file=sys.stderr, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            if e.headers.get("Content-Range", "") == f"bytes */{offset}":
                os.replace(part, dest)  # the .part already held the whole file
                return dest
            part.unlink()  # the .part does not fit what the server has: start over
            return download(url, dest, progress=progress, timeout=timeout)
        raise ModelError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise ModelError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    if expected is not None and part.stat().st_size != expected:
        raise ModelError(f"cannot download {url}: connection closed early; run again to resume")
    os.replace(part, dest)
    return dest


def cached_download(url: str, *, progress: bool = True) -> Path:
    """A weights file a manifest names by URL, fetched once into the cache (one folder per URL)."""
    folder = icd_home() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = folder / (posixpath.basename(urllib.parse.urlsplit(url).path) or "download")
    if not dest.exists() and (var := _offline_var()):
        raise ModelError(f"offline ({var} is set): {url} is not in the cache")
    return download(url, dest, progress=progress)


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` could touch something outside the target, or None when it is safe."""
    if member.name.startswith("/") or ".." in member.name.split("/"):
        return "path outside the target"
    if member.isdev():
        return "device or fifo"
    if member.issym() or member.islnk():
        # A symlink is relative to its own folder, a hard link to the archive root.
        link = member.linkname
        if member.issym():
            link = posixpath.join(posixpath.dirname(member.name), link)
        if link.startswith("/") or posixpath.normpath(link).split("/")[0] == "..":
            return f"link to {member.linkname} outside the target"
    return None


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Unpack a tar archive into `target` (replacing it); refuse it whole if any member is hostile."""
    archive, target = Path(archive), Path(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                if reason := _unsafe_reason(member):
                    raise ModelError(f"refusing {archive.name}: unsafe member {member.name!r} ({reason})")
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                tar.extractall(staging, members=members, filter="data")
            except BaseException:
                shutil.rmtree(staging)
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ModelError(f"cannot unpack {archive.name}: {e}") from None
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return sorted(p for p in target.rglob("*") if p.is_file() and not p.is_symlink())


def _install(archive_name: str, wanted: dict[str, Path], *, base_url: str, force: bool,
             progress: bool) -> None:
    """Download and unpack one archive, then move the one file matching each pattern to its path."""
    downloads = icd_home() / "downloads"
    archive = downloads / archive_name
    if force:
        archive.unlink(missing_ok=True)
        archive.with_suffix(archive.suffix + ".part").unlink(missing_ok=True)
    download(base_url.rstrip("/") + "/" + archive_name, archive, progress=progress)
    unpacked = downloads / archive_name.removesuffix(".tar.gz")
    try:
        files = safe_extract(archive, unpacked)
    except ModelError:
        archive.unlink()  # a truncated or bad archive must not be reused by the next pull
        raise
    found = {}
    for pattern in wanted:
        matches = [f for f in files if fnmatch(f.name, pattern)]
        if len(matches) != 1:
            raise ModelError(f"{archive_name} holds {len(matches)} files matching {pattern}, "
                             "expected exactly one")
        found[pattern] = matches[0]
    for pattern, path in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(found[pattern], path)
    shutil.rmtree(unpacked)
    archive.unlink()


def pull(name: str, *, force: bool = False, progress: bool = True, base_url: str = DEFAULT_BASE_URL,
         fetch_base: bool = True) -> Path:
    """Download one preset (teacher, LoRAs, optionally the base model) and return its icd.json path."""
    resolved = resolve_preset_name(name)
    if resolved is None:
        raise ModelError(f"unknown model '{name}'; choose one of: {', '.join([*PRESETS, *ALIASES])}")
    if var := _offline_var():
        raise ModelError(f"offline ({var} is set): cannot download '{name}'; "
                         f"unset it and run `icd pull {name}` again")
    preset = PRESETS[resolved]
    folder = preset_dir(resolved)
    teacher = icd_home() / "teachers" / preset.kind / preset.teacher_archive.removesuffix(".tar.gz")
    forward, reverse = folder / "forward.safetensors", folder / "reverse.safetensors"
    if force or not teacher.exists():
        _install(preset.teacher_archive, {"*.pt": teacher}, base_url=base_url, force=force, progress=progress)
    if force or not (forward.exists() and reverse.exists()):
        _install(preset.lora_archive, {"*forward*.safetensors": forward, "*reverse*.safetensors": reverse},
                 base_url=base_url, force=force, progress=progress)
    if fetch_base:
        from huggingface_hub import snapshot_download  # slow import, only needed here

        try:
            snapshot_download(repo_id=preset.base, allow_patterns=BASE_FILES[preset.kind],
                              force_download=force)
        except Exception as e:  # huggingface_hub raises network, HTTP and cache errors of many types
            raise ModelError(f"cannot download base model {preset.base}: {str(e).splitlines()[0]}") from None
    manifest = {
        "name": resolved, "kind": preset.kind, "base": preset.base,
        "teacher": Path(os.path.relpath(teacher, folder)).as_posix(),
        "guidance_embed_dim": GUIDANCE_EMBED_DIM,
        "forward_lora": forward.name, "reverse_lora": reverse.name, "lora_alpha": LORA_ALPHA,
        "forward_timesteps": list(preset.forward_timesteps),
        "reverse_timesteps": list(preset.reverse_timesteps),
        "resolution": preset.resolution,
    }
    path = folder / "icd.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def installed_models() -> list[tuple[str, Path]]:
    """The presets pulled into the cache, with their icd.json paths."""
    manifests = [(name, preset_dir(name) / "icd.json") for name in PRESETS]
    return [(name, path) for name, path in manifests if path.exists()]
