"""File-level jobs: one input file (or prompt) in, one output file out, with its parameters recorded.

The CLI loops over these; Python users can call them too. Each raises an `ICDError` subclass with a
one-line message when its item cannot be done, and never touches the input files.
"""

from __future__ import annotations

import glob
import re
from dataclasses import astuple, dataclass
from pathlib import Path

from icd import __version__
from icd.errors import ICDError, InputError
from icd.images import LoadedImage, from_model_output, load_image, save_image, to_model_input, working_size
from icd.latents import LatentInfo, is_latent_file, load_latent, save_latent
from icd.models.manifest import Manifest
from icd.p2p import P2PConfig
from icd.pipeline import edit, edit_settings, generate, guidance_on_steps, invert, reconstruct

from .session import Session

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OUTPUT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
LATENT_NAME = ".latent.safetensors"


def expand_inputs(args: list[str], suffixes: set[str]) -> list[Path]:
    """Files as given, folders as their files with `suffixes` (sorted, not recursive), globs expanded.

    A name that matches nothing is kept, so that it fails as its own item with a clear message.
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
    return list(dict.fromkeys(found))


def output_path(output: str | None, default_name: str, many: bool) -> Path:
    """`-o` is the file for a single result, or the folder for several; default: the current folder."""
    if output is None:
        return Path(default_name)
    target = Path(output)
    if not many and (target.suffix.lower() in OUTPUT_SUFFIXES or target.name.endswith(".safetensors")):
        return target
    return target / default_name


def output_stem(path: Path) -> str:
    name = path.name
    return name[: -len(LATENT_NAME)] if name.endswith(LATENT_NAME) else path.stem


def needs_inversion(paths: list[Path]) -> bool:
    return any(not is_latent_file(p) for p in paths)


@dataclass
class Settings:
    """What every job shares: the opened model and the run's parameters."""

    session: Session
    model_ref: str
    seed: int = 0
    width: int | None = None
    height: int | None = None
    overwrite: bool = False

    @property
    def manifest(self) -> Manifest:
        return self.session.manifest

    def metadata(self, **fields) -> dict:
        return {"model": self.model_ref, "model_fingerprint": self.manifest.fingerprint,
                "icd_version": __version__, **{k: v for k, v in fields.items() if v is not None}}

    def size_for(self, original: tuple[int, int]) -> tuple[int, int]:
        return working_size(original, resolution=self.manifest.resolution, multiple=self.session.model.size_multiple,
                            width=self.width, height=self.height)


def _invert_image(settings: Settings, image: LoadedImage, prompt: str) -> tuple:
    size = settings.size_for(image.original_size)
    latent = invert(settings.session, to_model_input(image, size), prompt, settings.seed)
    info = LatentInfo(model=settings.model_ref, model_fingerprint=settings.manifest.fingerprint, prompt=prompt,
                      seed=settings.seed, width=size[0], height=size[1], original_width=image.original_size[0],
                      original_height=image.original_size[1], source=str(image.path))
    return latent, info


def invert_file(settings: Settings, path: Path, prompt: str, output: Path) -> Path:
    """Image -> latent file (x_T and its metadata)."""
    latent, info = _invert_image(settings, load_image(path), prompt)
    save_latent(output, latent, info, overwrite=settings.overwrite)
    return output


def _load_checked_latent(settings: Settings, path: Path):
    latent, info = load_latent(path)
    if info.model_fingerprint != settings.manifest.fingerprint:
        raise InputError(f"{path.name}: inverted with model '{info.model}' ({info.model_fingerprint}), "
                         f"not '{settings.model_ref}' ({settings.manifest.fingerprint}): use --model {info.model}")
    return latent, info


def _resized(pixels, info: LatentInfo):
    """Decoded pixels back to the size of the photo the latent came from."""
    return from_model_output(pixels[0], None).resize((info.original_width, info.original_height))


def reconstruct_file(settings: Settings, path: Path, output: Path) -> Path:
    """Latent file -> image, decoded with its own prompt and w = 0."""
    latent, info = _load_checked_latent(settings, path)
    image = _resized(reconstruct(settings.session, latent, info.prompt), info)
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


def edit_file(settings: Settings, path: Path, options: EditOptions, output: Path) -> tuple[Path, list[str]]:
    """Image or latent file -> edited image; returns the output and any notes (e.g. empty P2P windows)."""
    if is_latent_file(path):
        latent, info = _load_checked_latent(settings, path)
        source = options.source or info.prompt
        original = None
    else:
        if not options.source:
            raise ICDError("--src is needed to edit an image (a latent file carries its own prompt)")
        original = load_image(path)
        latent, info = _invert_image(settings, original, options.source)
        source = options.source
    method, guidance, tau = astuple(edit_settings(settings.manifest, options.method, options.guidance, options.tau))
    result = edit(settings.session, latent, source, options.target, method=method, guidance=guidance, tau=tau,
                  p2p=options.p2p, with_reconstruction=False)
    image = from_model_output(result.edited[0], original) if original else _resized(result.edited, info)
    p2p = options.p2p or P2PConfig()
    p2p_fields = dict(cross_replace=p2p.cross_replace, self_replace=p2p.self_replace) if method == "p2p" else {}
    metadata = settings.metadata(command="edit", prompt=options.target, source_prompt=source, method=method,
                                 guidance_steps=guidance_on_steps(settings.manifest, guidance, tau),
                                 guidance_w=guidance, tau=tau, seed=info.seed, source=str(path), **p2p_fields)
    save_image(image, output, metadata=metadata, overwrite=settings.overwrite)
    return output, result.notes


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "image"


def generate_file(settings: Settings, prompt: str, seed: int, guidance: float, tau: float, output: Path) -> Path:
    width, height = working_size((settings.manifest.resolution,) * 2, resolution=settings.manifest.resolution,
                                 multiple=settings.session.model.size_multiple, width=settings.width, height=settings.height)
    pixels = generate(settings.session, prompt, seed, width, height, guidance, tau)
    metadata = settings.metadata(command="generate", prompt=prompt, seed=seed, guidance_w=guidance, tau=tau,
                                 guidance_steps=guidance_on_steps(settings.manifest, guidance, tau))
    save_image(from_model_output(pixels[0], None), output, metadata=metadata, overwrite=settings.overwrite)
    return output
