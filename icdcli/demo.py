"""`icd demo`: the whole chain on the bundled sample photo, offline."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from PIL import Image

from .images import atomic_write
from .jobs import EditOptions, Settings, edit_file, invert_file, reconstruct_file

SAMPLE = files("icdcli") / "assets" / "sample.png"
SOURCE_PROMPT = "a black cat in front of a house"
TARGET_PROMPT = "a white dog in front of a house"


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
    with SAMPLE.open("rb") as source:  # a real file for the jobs, inside the demo folder
        sample_bytes = source.read()
    original = folder / "sample.png"
    atomic_write(original, lambda tmp: tmp.write_bytes(sample_bytes), overwrite=settings.overwrite)
    latent = invert_file(settings, original, SOURCE_PROMPT, folder / "sample.latent.safetensors")
    edited, _ = edit_file(settings, latent, EditOptions(None, TARGET_PROMPT), folder / "sample-edit.png")
    recon = reconstruct_file(settings, latent, folder / "sample-recon.png")
    picture = side_by_side([original, recon, edited])
    before_after = folder / "before-after.png"
    atomic_write(before_after, lambda tmp: picture.save(tmp, format="PNG"), overwrite=settings.overwrite)
    return [original, latent, recon, edited, before_after]
