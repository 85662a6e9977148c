"""`icd demo`: the whole chain on the bundled sample photo, offline."""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from icd.editing import edit_plan
from icd.files import atomic_write
from icd.models.manifest import Manifest

from .jobs import Settings, edit_file, invert_file, reconstruct_file

SAMPLE = files("icd") / "assets" / "sample.png"
PANEL_HEIGHT = 256  # the smallest height a panel is shown at: mini's 64x64 scenes are upscaled 4x
LABEL_HEIGHT = 28
FONT_SIZE = 15


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


def _fitted(text: str, font, width: int) -> str:
    """`text`, its last words replaced by an ellipsis until it fits `width` pixels."""
    if font.getlength(text) <= width:
        return text
    words = text.split()
    while len(words) > 1 and font.getlength(" ".join(words) + "...") > width:
        words.pop()
    return " ".join(words) + "..."


def labelled_row(panels: list[tuple[Image.Image, str]]) -> Image.Image:
    """The images side by side at one height (at least PANEL_HEIGHT: small images are enlarged with nearest
    neighbours, so each model pixel shows as a block rather than a blur), each with its label under it."""
    height = max(PANEL_HEIGHT, panels[0][0].height)
    images = []
    for image, _ in panels:
        width = round(image.width * height / image.height)
        scaling = Image.Resampling.NEAREST if height >= image.height else Image.Resampling.LANCZOS
        images.append(image.convert("RGB").resize((width, height), scaling))
    canvas = Image.new("RGB", (sum(im.width for im in images), height + LABEL_HEIGHT), "white")
    pen, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=FONT_SIZE)
    x = 0
    for im, (_, label) in zip(images, panels):
        canvas.paste(im, (x, 0))
        text = _fitted(label, font, im.width - 8)
        pen.text((x + im.width / 2, height + LABEL_HEIGHT / 2), text, fill="black", font=font, anchor="mm")
        x += im.width
    return canvas


def run_demo(settings: Settings, folder: Path) -> list[Path]:
    """invert -> edit -> reconstruct; returns the files written, the before/after picture last."""
    demo = demo_input(settings.manifest)
    original = folder / "sample.png"  # a real file for the jobs, inside the demo folder
    # An earlier run of this demo (its input copy is this picture) is replaced; any other file is refused as usual.
    if original.is_file() and not original.is_symlink() and original.read_bytes() == demo.png:
        settings = replace(settings, overwrite=True)
    atomic_write(original, lambda tmp: tmp.write_bytes(demo.png), overwrite=settings.overwrite)
    latent = invert_file(settings, original, demo.source, 0, folder / "sample.latent.safetensors")
    edited, _ = edit_file(settings, latent, edit_plan(settings.manifest, None, demo.target), folder / "sample-edit.png")
    recon = reconstruct_file(settings, latent, folder / "sample-recon.png")
    picture = labelled_row([(Image.open(original), "input"), (Image.open(recon), "reconstruction"),
                            (Image.open(edited), f"edit: {demo.target}")])
    before_after = folder / "before-after.png"
    atomic_write(before_after, lambda tmp: picture.save(tmp, format="PNG"), overwrite=settings.overwrite)
    return [original, latent, recon, edited, before_after]
