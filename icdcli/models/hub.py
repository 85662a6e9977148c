"""Which models exist: released presets and `icd pull`, the shipped ones, and how `--model` finds a model. The
official files are tar.gz archives on a plain HTTPS bucket without checksums: downloads resume, archives are
checked for hostile members before extraction, and an interrupted pull never leaves what looks installed."""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path
from typing import Literal

from ..core.schedule import NUM_TRAIN_TIMESTEPS
from ..errors import ModelError, UsageError, first_line
from .cache import _offline_var, cache_error, download, icd_home, is_disk_error, writing_cache
from .manifest import MANIFEST_NAME, Manifest, load_manifest, model_files, write_model
from .official import FORWARD_TIMESTEPS, GUIDANCE_EMBED_DIM, LORA_ALPHA, RESOLUTION

log = logging.getLogger("icd")

# Models shipped inside the package: `mini`, trained on the miniature world by bench/miniature/recipe.py.
BUILTIN_MODELS = ("mini",)

DEFAULT_BASE_URL = "https://storage.yandexcloud.net/yandex-research/invertible-cd/"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
# The community's fp16-safe SDXL VAE (weights rescaled so that no activation overflows fp16): `icd pull sdxl
# --vae` names it, else SDXL's VAE runs in fp32 under fp16.
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]  # a VAE repository: the VAE at its root

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
    description: str


def _presets(kind: str, base: str, label: str) -> list[Preset]:
    """The three step schedules released for one base model."""
    schedules = [("4step-259", "4steps_1", FORWARD_TIMESTEPS),
                 ("4step-249", "4steps_2", (19, 249, 499, 699)),
                 ("3step", "3steps", (19, 339, 699))]
    teacher = f"{kind}_cfg_distill.pt.tar.gz"
    return [Preset(name=f"{kind}-{suffix}", kind=kind, base=base, teacher_archive=teacher,
                   lora_archive=f"iCD-{label}_{archive}.tar.gz", forward_timesteps=forward,
                   reverse_timesteps=forward[1:] + (NUM_TRAIN_TIMESTEPS - 1,),
                   description=f"iCD-{label}, {len(forward)} steps, forward " + "/".join(map(str, forward)))
            for suffix, archive, forward in schedules]


PRESETS: dict[str, Preset] = {p.name: p for p in _presets("sd15", SD15_BASE, "SD15")
                              + _presets("sdxl", SDXL_BASE, "SDXL")}
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


def refuse_symlinks(*paths: Path) -> None:
    """Unpacking and deleting stay inside icd's own folders: one reached through a symbolic link is refused."""
    for path in paths:
        if path.is_symlink():
            raise ModelError(f"{path} is a symbolic link: icd unpacks and deletes only inside its own folders; "
                             "replace it with a real folder")


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Unpack a tar archive into `target` (replacing it); refuse it whole if any member is hostile."""
    archive, target = Path(archive), Path(target)
    refuse_symlinks(target.parent, target)
    staging = None
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                if reason := _unsafe_reason(member):
                    raise ModelError(f"refusing {archive.name}: unsafe member {member.name!r} ({reason})")
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            tar.extractall(staging, members=members, filter="data")
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    except (tarfile.TarError, EOFError, OSError) as e:
        if staging is not None and staging.is_dir():
            shutil.rmtree(staging)
        if isinstance(e, OSError) and is_disk_error(e):
            raise cache_error(e) from None
        raise ModelError(f"cannot unpack {archive.name}: {e}") from None
    return sorted(p for p in target.rglob("*") if p.is_file() and not p.is_symlink())


def _install(archive_name: str, wanted: dict[str, Path], *, base_url: str, force: bool,
             progress: bool) -> None:
    """Download and unpack one archive, then move the one file matching each pattern to its path."""
    downloads = icd_home() / "downloads"
    archive = downloads / archive_name
    unpacked = downloads / archive_name.removesuffix(".tar.gz")
    refuse_symlinks(downloads, archive, unpacked)
    if force:
        archive.unlink(missing_ok=True)
        archive.with_suffix(archive.suffix + ".part").unlink(missing_ok=True)
    download(base_url.rstrip("/") + "/" + archive_name, archive, progress=progress)
    try:
        files = safe_extract(archive, unpacked)
        found = {}
        for pattern in wanted:
            matches = [f for f in files if fnmatch(f.name, pattern)]
            if len(matches) != 1:
                raise ModelError(f"{archive_name} holds {len(matches)} files matching {pattern}, "
                                 "expected exactly one")
            found[pattern] = matches[0]
        with writing_cache():
            for pattern, path in wanted.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(found[pattern], path)
    finally:  # done or refused, the archive and what was unpacked from it go (a bad one must not be reused)
        if unpacked.is_dir() and not unpacked.is_symlink():
            shutil.rmtree(unpacked)
        archive.unlink(missing_ok=True)


def pull(name: str, *, force: bool = False, progress: bool = True, base_url: str = DEFAULT_BASE_URL,
         fetch_base: bool = True, vae: str | None = None) -> Path:
    """Download one preset (teacher, LoRAs, optionally the base model) and return its icd.json path; `vae` (a
    hub id or a folder) replaces the base's VAE, fetched with the base files."""
    resolved = resolve_preset_name(name)
    if resolved is None:
        raise UsageError(f"unknown model '{name}'; choose one of: {', '.join([*PRESETS, *ALIASES])}")
    if var := _offline_var():
        raise ModelError(f"offline ({var} is set): cannot download '{name}'; "
                         f"unset it and run `icd pull {name}` again")
    preset = PRESETS[resolved]
    folder = preset_dir(resolved)
    with writing_cache():
        icd_home().mkdir(parents=True, exist_ok=True)
    teacher = icd_home() / "teachers" / preset.kind / preset.teacher_archive.removesuffix(".tar.gz")
    forward, reverse = folder / "forward.safetensors", folder / "reverse.safetensors"
    if force or not teacher.exists():
        _install(preset.teacher_archive, {"*.pt": teacher}, base_url=base_url, force=force, progress=progress)
    if force or not (forward.exists() and reverse.exists()):
        _install(preset.lora_archive, {"*forward*.safetensors": forward, "*reverse*.safetensors": reverse},
                 base_url=base_url, force=force, progress=progress)
    local_vae = vae is not None and Path(vae).is_dir()
    if fetch_base:
        _download_repo(preset.base, BASE_FILES[preset.kind], force, "base model")
        if vae is not None and not local_vae:
            _download_repo(vae, VAE_FILES, force, "VAE")
    return write_model(folder, {
        "name": resolved, "kind": preset.kind, "base": preset.base, "teacher": str(teacher),
        "guidance_embed_dim": GUIDANCE_EMBED_DIM, "forward_lora": forward.name, "reverse_lora": reverse.name,
        "lora_alpha": LORA_ALPHA, "forward_timesteps": list(preset.forward_timesteps),
        "reverse_timesteps": list(preset.reverse_timesteps), "resolution": RESOLUTION[preset.kind],
        **({"vae": str(Path(vae).resolve()) if local_vae else vae} if vae is not None else {})})


def _download_repo(repo_id: str, patterns: list[str], force: bool, what: str) -> None:
    """The files of a Hugging Face repository that match `patterns`, into the Hugging Face cache."""
    from huggingface_hub import snapshot_download  # slow import, only needed here

    try:
        snapshot_download(repo_id=repo_id, allow_patterns=patterns, force_download=force)
    except Exception as e:  # huggingface_hub raises network, HTTP and cache errors of many types
        raise ModelError(f"cannot download {what} {repo_id}: {first_line(e)}") from None


def builtin_dir(name: str) -> Path:
    """Where a model shipped inside the package lives."""
    return Path(str(files("icd") / "assets" / name))


def _is_path(ref: str) -> bool:
    """Whether `--model` names a path (./tiny, tiny/, ~/m, a/b) rather than a shipped, pulled or built model."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in ref for sep in separators) or ref in (".", "..") or ref.startswith("~")


def resolve_model(ref: str) -> Manifest:
    """`--model` -> manifest. A reference with a path separator is a folder or icd.json path; a bare name is a
    shipped model or a preset first (a same-named folder here then needs ./name), then a folder here, then a
    model built into the cache's models folder (`icd bench --random-weights`, the test suite's tiny models)."""
    candidate = Path(ref).expanduser()
    if _is_path(ref):
        if not candidate.exists():
            raise ModelError(f"no model folder or {MANIFEST_NAME} at {ref}")
        return load_manifest(candidate)
    preset = resolve_preset_name(ref)
    if ref in BUILTIN_MODELS or preset is not None:
        what = "the shipped model" if ref in BUILTIN_MODELS else "a preset"
        folder_hint = f"for the folder use ./{ref}"
        if candidate.exists():
            log.warning("'%s' is %s; %s", ref, what, folder_hint)
        if ref in BUILTIN_MODELS:
            return load_manifest(builtin_dir(ref))
        if (preset_dir(preset) / MANIFEST_NAME).is_file():
            return load_manifest(preset_dir(preset))
        hint = f" ({folder_hint})" if candidate.exists() else ""
        raise ModelError(f"model '{ref}' is not downloaded yet: run `icd pull {ref}`{hint}")
    if candidate.exists():
        return load_manifest(candidate)
    if (preset_dir(ref) / MANIFEST_NAME).is_file():
        return load_manifest(preset_dir(ref))
    names = ", ".join([*PRESETS, *ALIASES, *BUILTIN_MODELS])
    raise UsageError(f"unknown model '{ref}': not a folder with {MANIFEST_NAME}, a preset ({names}) or a model "
                     f"in {icd_home() / 'models'}")


@dataclass(frozen=True)
class AvailableModel:
    """A model `--model NAME` finds, for `icd info` and `icd pull --list`."""

    name: str
    source: Literal["shipped", "pulled", "built"]
    path: Path  # the model's folder
    size_bytes: int  # its files, with a teacher and a local base kept elsewhere
    offline: bool  # whether it runs without the network (nothing left to download)


def _files_size(paths: list[Path]) -> int:
    """Bytes of the files under `paths` (files or folders), each file counted once."""
    seen: set[Path] = set()
    for path in paths:
        for file in ([path] if path.is_file() else path.rglob("*")):
            if file.is_file():
                seen.add(file.resolve())
    return sum(file.stat().st_size for file in seen)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a base (its UNet config) or a VAE repository (its config at the root) is in the cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("unet/config.json", "config.json"))


def available_models() -> list[AvailableModel]:
    """The shipped models, then every model folder in the cache's models folder (pulled presets and built
    ones), by name. A folder whose icd.json cannot be read is left out with a warning."""
    folders = [(name, "shipped", builtin_dir(name)) for name in BUILTIN_MODELS]
    models = icd_home() / "models"
    if models.is_dir():
        folders += [(f.name, "pulled" if f.name in PRESETS else "built", f) for f in sorted(models.iterdir())
                    if (f / MANIFEST_NAME).is_file()]
    available = []
    for name, source, folder in folders:
        try:
            local, remote = model_files(folder)
        except ModelError as err:
            log.warning("skipping %s: %s", folder, err)
            continue
        offline = all(not ref.startswith(("http://", "https://")) and _in_hub_cache(ref) for ref in remote)
        available.append(AvailableModel(name, source, folder, _files_size(local), offline))
    return available
