"""File-level jobs: one input file (or prompt) in, one output file out, with its parameters recorded.

The CLI loops over these; Python users can call them too. Each raises an `ICDError` subclass with a
one-line message when its item cannot be done, and never touches the input files.
"""

from __future__ import annotations

import glob
import re
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np

from icd import __version__
from icd.errors import ICDError, InputError, UsageError
from icd.files import real_path
from icd.editing import MASK_WORDS_NOTE, P2PConfig, edit_settings, guidance_on_steps
from icd.images import (OUTPUT_SUFFIXES, LoadedImage, from_model_output, keep_outside, load_image, mask_array,
                        probe_image, read_mask, save_image, save_mask, to_model_array, working_size)
from icd.latents import (LATENT_NAME, LATENT_SUFFIX, LatentInfo, is_latent_file, load_latent, read_latent_info,
                         save_latent)
from icd.models.manifest import Manifest

from .runner import Runner

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# --keep-outside feathers the mask inwards by 2 working pixels, a quarter of a latent cell: on mini's two-object
# scenes 4 pixels blurred the photo's colour into small objects (success 0.42 -> 0.33), 0.5-2 pixels did not.
FEATHER_PX = 2.0


def expand_inputs(args: list[str], suffixes: set[str]) -> list[Path]:
    """Files as given, folders as their files with `suffixes` (sorted, not recursive), globs expanded.

    A name that matches nothing (or a symlink loop) is kept, so that it fails as its own item with a clear
    message; a name given twice (a.png, ./a.png and its absolute path) is kept once; nothing at all to work on is
    a UsageError.
    """
    found: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                            and not p.name.startswith("."))
        elif not path.exists() and glob.has_magic(arg):
            found += sorted(Path(p) for p in glob.glob(arg) if Path(p).is_file())
        else:
            found.append(path)
    if not found:
        raise UsageError(f"no input files in {' '.join(args)} (looked for {', '.join(sorted(suffixes))})")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(real_path(path.parent) / path.name, path)  # a name's first spelling (links are names)
    return list(unique.values())


def output_path(output: str | None, default_name: str, many: bool) -> Path:
    """`-o` is the file for a single result, or the folder for several; default: the current folder."""
    if output is None:
        return Path(default_name)
    target = Path(output)
    if not many and (target.suffix.lower() in OUTPUT_SUFFIXES or target.name.endswith(LATENT_SUFFIX)):
        return target
    return target / default_name


def output_stem(path: Path) -> str:
    name = path.name
    return name[: -len(LATENT_NAME)] if name.endswith(LATENT_NAME) else path.stem


def needs_inversion(paths: list[Path]) -> bool:
    return any(not is_latent_file(p) for p in paths)


@dataclass
class Inverted:
    latent: np.ndarray  # x_T
    info: LatentInfo
    original: LoadedImage


class InversionCache:
    """The last inversion, so that several targets of one (image, source prompt, seed) invert it once:
    the CLI orders a batch's items so that those of one inversion follow each other."""

    def __init__(self):
        self.key: tuple | None = None
        self.value: Inverted | None = None

    def get(self, key: tuple, compute) -> Inverted:
        if key != self.key:
            self.key = None  # a failed inversion is not kept as the last one
            self.value = compute()
            self.key = key
        return self.value


@dataclass
class Settings:
    """What every job shares: the model (in this process or a server's) and the run's parameters."""

    runner: Runner
    model_ref: str
    seed: int = 0
    width: int | None = None
    height: int | None = None
    overwrite: bool = False
    inversions: InversionCache = field(default_factory=InversionCache)
    masks: dict[Path, np.ndarray] = field(default_factory=dict)  # each mask file, read once per run

    def mask(self, path: Path) -> np.ndarray:
        if path not in self.masks:
            self.masks[path] = read_mask(path)
        return self.masks[path]

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


def _invert_image(settings: Settings, image: LoadedImage, prompt: str) -> tuple:
    size = settings.size_for(image.original_size)
    latent = settings.runner.invert(to_model_array(image, size), prompt, settings.seed)
    info = LatentInfo(model=settings.model_ref, model_fingerprint=settings.manifest.fingerprint, prompt=prompt,
                      seed=settings.seed, width=size[0], height=size[1], original_width=image.original_size[0],
                      original_height=image.original_size[1], source=str(image.path))
    return latent, info


def invert_file(settings: Settings, path: Path, prompt: str, output: Path) -> Path:
    """Image -> latent file (x_T and its metadata)."""
    latent, info = _invert_image(settings, load_image(path), prompt)
    save_latent(output, latent, info, overwrite=settings.overwrite)
    return output


def check_latent(path: Path, manifest: Manifest, model_ref: str) -> LatentInfo:
    """A latent file's header, and that it was inverted with this model (cheap: no tensor is read)."""
    info = read_latent_info(path)
    _refuse_other_model(path, info, manifest, model_ref)
    return info


def _refuse_other_model(path: Path, info: LatentInfo, manifest: Manifest, model_ref: str) -> None:
    if info.model_fingerprint != manifest.fingerprint:
        raise InputError(f"{path.name}: inverted with model '{info.model}' ({info.model_fingerprint}), "
                         f"not '{model_ref}' ({manifest.fingerprint}): use --model {info.model}")


def check_input(path: Path, manifest: Manifest, model_ref: str) -> None:
    """The cheap header pass of one edit input: an image's format and size, or a latent's metadata."""
    if is_latent_file(path):
        check_latent(path, manifest, model_ref)
    else:
        probe_image(path)


def _load_checked_latent(settings: Settings, path: Path):
    """The latent and its record, read once, and refused when another model inverted it."""
    latent, info = load_latent(path)
    _refuse_other_model(path, info, settings.manifest, settings.model_ref)
    return latent, info


def _resized(pixels, info: LatentInfo):
    """Decoded pixels back to the size of the photo the latent came from."""
    return from_model_output(pixels[0], None).resize((info.original_width, info.original_height))


def reconstruct_file(settings: Settings, path: Path, output: Path) -> Path:
    """Latent file -> image, decoded with its own prompt and w = 0."""
    latent, info = _load_checked_latent(settings, path)
    image = _resized(settings.runner.reconstruct(latent, info.prompt), info)
    save_image(image, output, overwrite=settings.overwrite,
               metadata=settings.metadata(command="reconstruct", prompt=info.prompt, seed=info.seed, source=info.source))
    return output


@dataclass
class EditOptions:
    source: str | None
    target: str
    method: str | None = None
    guidance: float | None = None
    tau: float | None = None
    p2p: P2PConfig | None = None
    mask: Path | None = None  # where the edit may act (white) and where the photo is kept (black)
    keep_outside: bool = True  # with a mask: the input photo's own pixels outside it
    mask_output: Path | None = None  # --save-mask: where the map the edit used goes
    strength: float | None = None  # recorded: the knobs it set are in guidance, tau and p2p already


def check_edit(options: EditOptions, inputs: list[Path], overwrite: bool, masks: dict[Path, np.ndarray]) -> None:
    """The header pass of an edit's own files: its mask read (once per file, into `masks`, which the run then
    uses) and its --save-mask output, which must not replace an input or, without --overwrite, a file."""
    if options.mask is not None and options.mask not in masks:
        masks[options.mask] = read_mask(options.mask)
    written = options.mask_output
    if written is None:
        return
    if any(real_path(written) == real_path(path) for path in inputs):
        raise InputError(f"--save-mask {written} is one of the inputs: choose another")
    if written.exists() and not overwrite:
        raise InputError(f"--save-mask {written} exists (use --overwrite to replace it)")


def edit_file(settings: Settings, path: Path, options: EditOptions, output: Path) -> tuple[Path, list[str]]:
    """Image or latent file -> edited image; returns the output and any notes (e.g. empty P2P windows)."""
    if is_latent_file(path):
        latent, info = _load_checked_latent(settings, path)
        source = options.source or info.prompt
        original = None
    else:
        if not options.source:
            raise ICDError("--src is needed to edit an image (a latent file carries its own prompt)")
        inverted = settings.inversions.get((str(path), options.source, settings.seed, settings.width,
                                            settings.height, settings.manifest.fingerprint),
                                           lambda: _inverted(settings, path, options.source))
        latent, info, original = inverted.latent, inverted.info, inverted.original
        source = options.source
    method, guidance, tau = astuple(edit_settings(settings.manifest, options.method, options.guidance, options.tau))
    mask = None if options.mask is None else settings.mask(options.mask)
    edited, notes, used = settings.runner.edit(latent, source, options.target, method, guidance, tau, options.p2p,
                                               None if mask is None else mask_array(mask, (info.width, info.height)))
    notes = [f"{path.name}: {note}" if note.startswith(MASK_WORDS_NOTE) else note for note in notes]
    image = from_model_output(edited[0], original) if original else _resized(edited, info)
    kept = mask is not None and options.keep_outside and original is not None
    if kept:
        image = keep_outside(image, original, mask, FEATHER_PX * original.original_size[0] / info.width)
    elif mask is not None and options.keep_outside:
        notes.append(f"{path.name}: a latent file holds no photo to keep outside the mask: the pixels there are "
                     "the decoded ones")
    size = {} if original is None else {"width": info.width, "height": info.height}
    local = {} if mask is None else {"mask": str(options.mask), "keep_outside": kept}
    metadata = settings.metadata(command="edit", prompt=options.target, source_prompt=source, method=method,
                                 guidance_steps=guidance_on_steps(settings.manifest, guidance, tau),
                                 guidance_w=guidance, tau=tau, seed=info.seed, source=str(path), **size,
                                 strength=options.strength, **local,
                                 **(p2p_fields(options.p2p or P2PConfig()) if method == "p2p" else {}))
    save_image(image, output, metadata=metadata, overwrite=settings.overwrite)
    if options.mask_output is not None:
        if used is None:
            raise ICDError(f"--save-mask {options.mask_output}: the edit was confined by no mask")
        save_mask(used, options.mask_output, image.size, overwrite=settings.overwrite)
    return output, notes


def _inverted(settings: Settings, path: Path, source: str) -> Inverted:
    original = load_image(path)
    return Inverted(*_invert_image(settings, original, source), original)


def p2p_fields(config: P2PConfig) -> dict:
    """Prompt-to-Prompt's settings as metadata, in the forms the command line takes them back."""
    fields = {"cross_replace": config.cross_replace, "self_replace": config.self_replace}
    if config.amplify is not None:
        fields["amplify"] = [f"{word}={factor:g}" for word, factor in config.amplify.items()]
    if config.blend is not None:
        fields["blend"] = " ".join(config.blend[0]) + ":" + " ".join(config.blend[1])
    return fields


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "image"


def generate_file(settings: Settings, prompt: str, seed: int, guidance: float, tau: float, output: Path) -> Path:
    width, height = working_size((settings.manifest.resolution,) * 2, resolution=settings.manifest.resolution,
                                 multiple=settings.runner.size_multiple, width=settings.width, height=settings.height)
    pixels = settings.runner.generate(prompt, seed, width, height, guidance, tau)
    metadata = settings.metadata(command="generate", prompt=prompt, seed=seed, guidance_w=guidance, tau=tau,
                                 width=width, height=height,
                                 guidance_steps=guidance_on_steps(settings.manifest, guidance, tau))
    save_image(from_model_output(pixels[0], None), output, metadata=metadata, overwrite=settings.overwrite)
    return output
