"""`icd demo`: the whole chain on the bundled sample photo, offline."""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from PIL import Image

from .images import atomic_write
from .jobs import EditOptions, Settings, edit_file, invert_file, reconstruct_file
from .manifest import Manifest
from .miniworld import Placed, Spec, render

SAMPLE = files("icdcli") / "assets" / "sample.png"
# The miniature world's demo scene (not one it was trained on: training scenes are seeds 0-3999).
MINI_SCENE = Spec("sandy", (Placed("circle", "red", 0.5, 0.5, 0.24),), seed=10**6 - 1)
MINI_TARGET = MINI_SCENE.edited(colour="blue")


@dataclass(frozen=True)
class DemoInput:
    png: bytes
    source: str
    target: str


def demo_input(manifest: Manifest) -> DemoInput:
    """The `mini` model edits a scene of its world; any other model, the bundled photo."""
    if manifest.name == "mini":
        buffer = io.BytesIO()
        render(MINI_SCENE, manifest.resolution).image.save(buffer, format="PNG")
        return DemoInput(buffer.getvalue(), MINI_SCENE.caption, MINI_TARGET.caption)
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
