"""File-level jobs: one input file (or prompt) in, one output file out, with its parameters recorded; each
raises an `ICDError` with a one-line message when its item cannot be done, and never touches its inputs."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from icd import __version__
from icd.editing import MASK_WORDS_NOTE, EditPlan, guidance_on_steps
from icd.errors import ICDError, InputError, UsageError
from icd.files import open_regular, real_path
from icd.images import (OUTPUT_SUFFIXES, LoadedImage, from_model_output, load_image, probe_image,
                        read_metadata, save_image, to_model_array, working_size)
from icd.latents import LatentInfo, is_latent_file, load_latent, read_latent_info, save_latent
from icd.limits import DEFAULT_QUALITY
from icd.masks import keep_outside, model_mask, read_mask, save_mask
from icd.models.manifest import Manifest

from .requests import Edit, Generate, Invert, Reconstruct
from .runner import Runner

IMAGE_SUFFIXES = OUTPUT_SUFFIXES | {".bmp", ".tif", ".tiff", ".gif"}
log = logging.getLogger("icd")


def expand_inputs(args: list[str], suffixes: set[str]) -> list[Path]:
    """Files as given, folders as their files with `suffixes` (sorted, not recursive), globs expanded, each
    once; a folder's or glob's icd results of an earlier run are left out, so a rerun into the input folder
    does not edit its own outputs. A name that matches nothing is kept, to fail as its own item."""
    found: list[Path] = []
    results = 0
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            listed = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                            and not p.name.startswith("."))
        elif not path.exists() and glob.has_magic(arg):
            listed = sorted(Path(p) for p in glob.glob(arg) if Path(p).is_file())
        else:
            found.append(path)
            continue
        kept = [p for p in listed if not is_icd_result(p)]
        results += len(listed) - len(kept)
        found += kept
    left_out = f"{results} file(s) there are icd's own results of an earlier run: name them one by one to use them"
    if not found:
        raise UsageError(f"no input files in {' '.join(args)} (looked for {', '.join(sorted(suffixes))})" +
                         (f"; {left_out}" if results else ""))
    if results:
        log.info("left out %s", left_out.replace(" there are", " that are"))
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(real_path(path.parent) / path.name, path)  # a name's first spelling (links are names)
    return list(unique.values())


def is_icd_result(path: Path) -> bool:
    """Whether an image carries the record icd writes into its results (read from the header only)."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        return False
    try:
        return "command" in read_metadata(path)
    except ICDError:  # not a readable image: it fails as its own item
        return False


def needs_inversion(paths: list[Path]) -> bool:
    return any(not is_latent_file(p) for p in paths)


@dataclass
class Inverted:
    latent: object  # x_T: a tensor on the model's device in this process, a numpy array from a server
    info: LatentInfo
    original: LoadedImage


class InversionCache:
    """The last inversion, so that several targets of one (image, source prompt, seed) invert it once."""

    def __init__(self):
        self.key: tuple | None = None
        self.value: Inverted | None = None

    def get(self, key: tuple, compute) -> Inverted:
        if key != self.key:
            self.key = None  # a failed inversion is not kept as the last one
            self.value = compute()
            self.key = key
        return self.value


class StageClock:
    """The seconds the current item spent in each stage (the model's requests, writing), for -v and --json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def take(self) -> dict[str, float]:
        """The stages since the last call, and a fresh start for the next item."""
        taken, self.seconds = {name: round(seconds, 3) for name, seconds in self.seconds.items()}, {}
        return taken


# Each request's stage: an edit's request decodes its latents too.
STAGES = {Invert: "invert", Edit: "edit", Reconstruct: "decode", Generate: "generate"}


@dataclass
class Settings:
    """What every job shares: the model (in this process or a server's) and the run's parameters."""

    runner: Runner
    model_ref: str
    width: int | None = None
    height: int | None = None
    overwrite: bool = False
    quality: int = DEFAULT_QUALITY  # JPEG and WebP results
    inversions: InversionCache = field(default_factory=InversionCache)
    masks: dict[Path, np.ndarray] = field(default_factory=dict)  # each mask file, read once per run
    mask_hashes: dict[Path, str] = field(default_factory=dict)  # and hashed once, for the results' records
    clock: StageClock = field(default_factory=StageClock)

    def run(self, request):
        """The runner's result for `request`, its time counted to the request's stage."""
        with self.clock.stage(STAGES[type(request)]):
            return self.runner.run(request)

    def mask_hash(self, path: Path) -> str:
        if path not in self.mask_hashes:
            self.mask_hashes[path] = file_hash(path)
        return self.mask_hashes[path]

    def save(self, image, output: Path, metadata: dict) -> None:
        """A result written in its format (at --quality), its time counted to the `write` stage."""
        with self.clock.stage("write"):
            save_image(image, output, metadata=metadata, overwrite=self.overwrite, quality=self.quality)

    @property
    def manifest(self) -> Manifest:
        return self.runner.manifest

    def metadata(self, **fields) -> dict:
        """Every parameter that changes the pixels, for the result's metadata (and `icd edit --from`)."""
        return {"model": self.model_ref, "model_fingerprint": self.manifest.fingerprint,
                "backend": self.runner.backend, "dtype": self.runner.dtype, "icd_version": __version__,
                **{k: v for k, v in fields.items() if v is not None}}

    def size_for(self, original: tuple[int, int]) -> tuple[int, int]:
        return working_size(original, resolution=self.manifest.resolution, multiple=self.runner.size_multiple,
                            width=self.width, height=self.height)


def _invert_image(settings: Settings, image: LoadedImage, prompt: str, seed: int) -> Inverted:
    size = settings.size_for(image.original_size)
    latent = settings.run(Invert(to_model_array(image, size), prompt, seed))
    return Inverted(latent, LatentInfo(
        model=settings.model_ref, model_fingerprint=settings.manifest.fingerprint, prompt=prompt, seed=seed,
        width=size[0], height=size[1], original_width=image.original_size[0],
        original_height=image.original_size[1], source=str(image.path)), image)


def invert_file(settings: Settings, path: Path, prompt: str, seed: int, output: Path) -> Path:
    """Image -> latent file (x_T and its metadata)."""
    found = _invert_image(settings, load_image(path), prompt, seed)
    with settings.clock.stage("write"):
        save_latent(output, found.latent, found.info, overwrite=settings.overwrite)
    return output


def check_latent(path: Path, manifest: Manifest, model_ref: str) -> LatentInfo:
    """A latent file's header, and that it was inverted with this model (cheap: no tensor is read)."""
    return _this_model(path, read_latent_info(path), manifest, model_ref)


def _this_model(path: Path, info: LatentInfo, manifest: Manifest, model_ref: str) -> LatentInfo:
    if info.model_fingerprint != manifest.fingerprint:
        raise InputError(f"{path.name}: inverted with model '{info.model}' ({info.model_fingerprint}), "
                         f"not '{model_ref}' ({manifest.fingerprint}): use --model {info.model}")
    return info


def check_input(path: Path, manifest: Manifest, model_ref: str) -> None:
    """The cheap header pass of one edit input: an image's format and size, or a latent's metadata."""
    if is_latent_file(path):
        check_latent(path, manifest, model_ref)
    else:
        probe_image(path)


def _load_checked_latent(settings: Settings, path: Path):
    """The latent and its record, read once, and refused when another model inverted it."""
    latent, info = load_latent(path)
    return latent, _this_model(path, info, settings.manifest, settings.model_ref)


def _resized(pixels, info: LatentInfo):
    """Decoded pixels back to the size of the photo the latent came from."""
    return from_model_output(pixels[0], None).resize((info.original_width, info.original_height))


def reconstruct_file(settings: Settings, path: Path, output: Path) -> Path:
    """Latent file -> image, decoded with its own prompt and w = 0."""
    latent, info = _load_checked_latent(settings, path)
    image = _resized(settings.run(Reconstruct(latent, info.prompt)), info)
    settings.save(image, output, settings.metadata(command="reconstruct", prompt=info.prompt, seed=info.seed,
                                                   source=info.source))
    return output


def read_mask_once(path: Path, masks: dict[Path, np.ndarray]) -> np.ndarray:
    """The mask file `path`, read the first time it is asked for and then kept in `masks`."""
    if path not in masks:
        masks[path] = read_mask(path)
    return masks[path]


def check_edit(plan: EditPlan, masks: dict[Path, np.ndarray]) -> None:
    """The header pass of an edit's mask: read (once per file, into `masks`, which the run then uses)."""
    if plan.mask is not None:
        read_mask_once(plan.mask, masks)


def edit_file(settings: Settings, path: Path, plan: EditPlan, output: Path,
              mask_output: Path | None = None) -> tuple[Path, list[str]]:
    """Image or latent file -> edited image (and its map in `mask_output`); returns the output and notes."""
    if is_latent_file(path):
        latent, info = _load_checked_latent(settings, path)
        plan = replace(plan, source=plan.source or info.prompt, seed=info.seed)
        original = None
    else:
        if not plan.source:
            raise ICDError("--src is needed to edit an image (a latent file carries its own prompt)")
        found = inverted(settings, path, plan.source, plan.seed)
        latent, info, original = found.latent, found.info, found.original
    mask = None if plan.mask is None else read_mask_once(plan.mask, settings.masks)
    kept = mask is not None and plan.keep_outside and original is not None
    edited = settings.run(Edit(latent, plan, None if mask is None else model_mask(mask, (info.width,
                                                                                               info.height)), kept))
    notes = [f"{path.name}: {note}" if note.startswith(MASK_WORDS_NOTE) else note for note in edited.notes]
    image = from_model_output(edited.pixels[0], original) if original else _resized(edited.pixels, info)
    if kept:
        image = keep_outside(image, from_model_output(edited.reconstruction[0], original), original, mask, info.width)
    elif mask is not None and plan.keep_outside:
        notes.append(f"{path.name}: a latent file holds no photo to keep outside the mask: the pixels there are "
                     "the decoded ones")
    local = {} if mask is None else {"mask": relative_to(plan.mask, output.parent),
                                     "mask_hash": settings.mask_hash(plan.mask), "keep_outside": kept}
    metadata = settings.metadata(command="edit", **plan.record(), seed=info.seed,
                                 source=relative_to(path, output.parent), width=info.width, height=info.height, **local,
                                 guidance_steps=guidance_on_steps(settings.manifest, plan.guidance, plan.tau))
    if mask_output is not None and edited.mask is None:
        raise ICDError(f"--save-mask {mask_output}: the edit was confined by no mask")
    wrote_mask = False
    try:  # the map first, the edit last: a failure of either leaves neither (without --overwrite)
        if mask_output is not None:
            with settings.clock.stage("write"):
                save_mask(edited.mask, mask_output, image.size, overwrite=settings.overwrite)
            wrote_mask = True
        settings.save(image, output, metadata)
    except BaseException:
        if wrote_mask and not settings.overwrite:
            mask_output.unlink(missing_ok=True)
        raise
    return output, notes


def file_hash(path: Path) -> str:
    """A file's SHA-256, first 10 hex digits (as A1111 records a model's): a result's record of its mask."""
    with open_regular(path) as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:10]


def relative_to(path: Path, folder: Path) -> str:
    """`path` relative to a result's folder, so that `--from` finds it from anywhere and the two can move."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


def inverted(settings: Settings, path: Path, source: str, seed: int) -> Inverted:
    """The photo inverted under `source` from the noise of `seed` (the run's last inversion if the same)."""
    return settings.inversions.get((str(path), source, seed, settings.width, settings.height,
                                    settings.manifest.fingerprint),
                                   lambda: _invert_image(settings, load_image(path), source, seed))


def generate_file(settings: Settings, prompt: str, seed: int, guidance: float, tau: float, output: Path) -> Path:
    width, height = settings.size_for((settings.manifest.resolution,) * 2)
    pixels = settings.run(Generate(prompt, seed, width, height, guidance, tau))
    metadata = settings.metadata(command="generate", prompt=prompt, seed=seed, guidance_w=guidance, tau=tau,
                                 width=width, height=height,
                                 guidance_steps=guidance_on_steps(settings.manifest, guidance, tau))
    settings.save(from_model_output(pixels[0], None), output, metadata)
    return output
