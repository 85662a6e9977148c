"""`icd demo`: the whole chain on the bundled sample photo, offline."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from PIL import Image

from icd.files import atomic_write
from icd.models.manifest import Manifest

from .jobs import EditOptions, Settings, edit_file, invert_file, reconstruct_file

SAMPLE = files("icd") / "assets" / "sample.png"


@dataclass(frozen=True)
class DemoInput:
    png: bytes
    source: str
    target: str


def demo_input(manifest: Manifest) -> DemoInput:
    """The model's own demo picture and prompts (`mini`: a scene of its world); else the bundled photo."""
    if manifest.demo is not None:
        image, source, target = manifest.demo
        return DemoInput(image.read_bytes(), source, target)
    return DemoInput(SAMPLE.read_bytes(), "a black cat in front of a house", "a white dog in front of a house")


def side_by_side(paths: list[Path]) -> Image.Image:
    """The images in a row, each scaled to the first one's height."""
    images = [Image.open(p).convert("RGB") for p in paths]
    height = images[0].height
    images = [im.resize((round(im.width * height / im.height), height)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in images), height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def run_demo(settings: Settings, folder: Path) -> list[Path]:
    """invert -> edit -> reconstruct; returns the files written, the before/after picture last."""
    demo = demo_input(settings.manifest)
    original = folder / "sample.png"  # a real file for the jobs, inside the demo folder
    atomic_write(original, lambda tmp: tmp.write_bytes(demo.png), overwrite=settings.overwrite)
    latent = invert_file(settings, original, demo.source, folder / "sample.latent.safetensors")
    edited, _ = edit_file(settings, latent, EditOptions(None, demo.target), folder / "sample-edit.png")
    recon = reconstruct_file(settings, latent, folder / "sample-recon.png")
    picture = side_by_side([original, recon, edited])
    before_after = folder / "before-after.png"
    atomic_write(before_after, lambda tmp: picture.save(tmp, format="PNG"), overwrite=settings.overwrite)
    return [original, latent, recon, edited, before_after]
