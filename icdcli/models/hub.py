"""Which models exist: released presets and `icd pull`, the shipped ones, and how `--model` finds a model.

The official files are tar.gz archives on a plain HTTPS bucket with no checksums, so downloads resume
(cache.py), archives are checked for hostile members before anything is extracted, and every final file
appears atomically: an interrupted pull never leaves something that looks installed.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

from ..errors import ModelError
from .cache import _offline_var, download, icd_home
from .manifest import MANIFEST_NAME, Manifest, load_manifest, write_model
from .official import GUIDANCE_EMBED_DIM, LORA_ALPHA

# Models shipped inside the package: `mini`, trained on the miniature world by bench/miniature/recipe.py.
BUILTIN_MODELS = ("mini",)

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


def preset_dir(name: str) -> Path:
    """Where one preset's LoRAs and icd.json live."""
    return icd_home() / "models" / name


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
    return write_model(folder, {
        "name": resolved, "kind": preset.kind, "base": preset.base, "teacher": str(teacher),
        "guidance_embed_dim": GUIDANCE_EMBED_DIM, "forward_lora": forward.name, "reverse_lora": reverse.name,
        "lora_alpha": LORA_ALPHA, "forward_timesteps": list(preset.forward_timesteps),
        "reverse_timesteps": list(preset.reverse_timesteps), "resolution": preset.resolution})


def installed_models() -> list[tuple[str, Path]]:
    """The presets pulled into the cache, with their icd.json paths."""
    manifests = [(name, preset_dir(name) / "icd.json") for name in PRESETS]
    return [(name, path) for name, path in manifests if path.exists()]


def builtin_dir(name: str) -> Path:
    """Where a model shipped inside the package lives."""
    return Path(str(files("icd") / "assets" / name))


def resolve_model(ref: str) -> Manifest:
    """`--model` -> manifest: a folder or icd.json path, a shipped model, a downloaded preset, or a model
    built into the cache's models folder (`icd bench --random-weights`, the test suite's tiny models)."""
    candidate = Path(ref).expanduser()
    if candidate.exists():
        return load_manifest(candidate)
    if ref in BUILTIN_MODELS:
        return load_manifest(builtin_dir(ref))
    preset = resolve_preset_name(ref)
    folder = preset_dir(preset or ref) if "/" not in ref else None
    if folder is not None and (folder / MANIFEST_NAME).is_file():
        return load_manifest(folder)
    if preset is not None:
        raise ModelError(f"model '{ref}' is not downloaded yet: run `icd pull {ref}`")
    names = ", ".join([*PRESETS, *ALIASES, *BUILTIN_MODELS])
    raise ModelError(f"unknown model '{ref}': not a folder with {MANIFEST_NAME}, a preset ({names}) or a model "
                     f"in {icd_home() / 'models'}")
