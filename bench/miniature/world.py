"""A miniature procedural world small enough to train a real iCD model on a CPU.

Scenes are one or two flat shapes on a lightly textured background, captioned from a template
("a red circle and a blue square on a grassy background"). A scene is rendered from an explicit `Spec`,
so an edit (another colour, shape or background) re-renders the same scene with the same texture and
gives the edit's ground truth and masks. The judges read colours, shapes and backgrounds back from any
image, generated ones included, so tests and benchmarks can check what a model drew.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from transformers import CLIPTokenizer

from icd.evaluation import checks

# Saturated object colours, each far (> 75 in RGB) from every other colour and from every background.
COLOURS = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 60, 230), "yellow": (245, 215, 30),
           "white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
# Background: (base colour, smooth-noise amplitude, per-pixel grain, top-to-bottom brightening).
BACKGROUNDS = {"sandy": ((215, 180, 130), 10, 6, 0), "grassy": ((110, 135, 55), 12, 7, 0),
               "snowy": ((190, 200, 220), 6, 3, 0), "night sky": ((30, 40, 100), 5, 3, 30)}
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered: anti-aliased edges, fractional coverage


@dataclass(frozen=True)
class Placed:
    """One object of a spec; centre and radius are fractions of the image side (any render size)."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Spec:
    """Everything a scene is drawn from; objects are listed back to front, `seed` fixes the texture."""

    background: str
    objects: tuple[Placed, ...]
    seed: int

    @property
    def caption(self) -> str:
        things = " and ".join(f"a {o.colour} {o.shape}" for o in self.objects)
        return f"{things} on a {self.background} background"

    def edited(self, index: int = 0, background: str | None = None, **changes) -> Spec:
        """The same scene with object `index`'s shape/colour (and/or the background) changed."""
        objects = list(self.objects)
        objects[index] = replace(objects[index], **changes)
        return replace(self, objects=tuple(objects), background=background or self.background)


@dataclass
class Thing:
    shape: str
    colour: str
    mask: np.ndarray  # bool HxW: pixels at least half covered by this object and not hidden by a later one
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive) of the whole shape


@dataclass
class Scene:
    image: Image.Image
    caption: str
    objects: list[Thing]
    background: str
    spec: Spec


def _coverage(thing: Placed, size: int) -> np.ndarray:
    """The fraction of each pixel the shape covers, HxW in [0, 1]."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    x, y, r = thing.x * big, thing.y * big, thing.radius * big
    pen = ImageDraw.Draw(canvas)
    if thing.shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif thing.shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=255)
    elif thing.shape == "triangle":
        pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=255)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}")
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255


def _texture(background: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base, smooth, grain, gradient = BACKGROUNDS[background]
    coarse = Image.fromarray(rng.normal(size=(size // 8 + 1,) * 2).astype(np.float32), mode="F")
    light = smooth * np.asarray(coarse.resize((size, size), Image.BICUBIC)) + grain * rng.normal(size=(size, size))
    light += gradient * (np.linspace(-0.5, 0.5, size)[:, None])
    return np.asarray(base, dtype=np.float32) + light[..., None]


def render(spec: Spec, size: int = 64) -> Scene:
    """Draw a spec: textured background, then the objects back to front, then a faint grain on everything."""
    rng = np.random.default_rng(spec.seed)
    pixels = _texture(spec.background, size, rng)
    covers = [_coverage(thing, size) for thing in spec.objects]
    for thing, cover in zip(spec.objects, covers):
        pixels = pixels * (1 - cover[..., None]) + np.asarray(COLOURS[thing.colour], np.float32) * cover[..., None]
    pixels += 2 * rng.normal(size=(size, size, 1))
    things = []
    for i, (thing, cover) in enumerate(zip(spec.objects, covers)):
        visible = cover * np.prod([1 - later for later in covers[i + 1:]], axis=0)
        rows, cols = np.nonzero(cover >= 0.5)
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        things.append(Thing(thing.shape, thing.colour, visible >= 0.5, box))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return Scene(image, spec.caption, things, spec.background, spec)


def random_spec(seed: int) -> Spec:
    """One or two objects of distinct colours; a second one never hides more than a sliver of the first."""
    rng = random.Random(seed)
    count = rng.choice((1, 2))
    colours = rng.sample(sorted(COLOURS), count)
    objects: list[Placed] = []
    while len(objects) < count:
        radius = rng.uniform(0.14, 0.25)
        x, y = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
        if all(np.hypot(x - o.x, y - o.y) >= 0.8 * (radius + o.radius) for o in objects):
            objects.append(Placed(rng.choice(SHAPES), colours[len(objects)], x, y, radius))
    return Spec(rng.choice(sorted(BACKGROUNDS)), tuple(objects), seed)


def random_scene(seed: int, size: int = 64) -> Scene:
    return render(random_spec(seed), size)


def vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = {"a", "and", "on", "background", *COLOURS, *SHAPES}
    return sorted(words | {word for name in BACKGROUNDS for word in name.split()})


def write_imagefolder(folder: str | Path, seeds, size: int = 64) -> Path:
    """PNGs plus a Hugging Face imagefolder `metadata.jsonl` (file_name, text, and the seed that remakes the spec)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        scene = random_scene(seed, size)
        name = f"{seed:07d}.png"
        scene.image.save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": scene.caption, "seed": seed}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(rows))
    return folder / "metadata.jsonl"


# --- judges (icd eval's checks: the same functions judge the sets `edit_sets.py` writes) ----------------

_BACKGROUND_RGB = {name: texture[0] for name, texture in BACKGROUNDS.items()}


def colour_under(image: Image.Image, mask: np.ndarray) -> str:
    """The palette colour nearest to the median pixel under a mask."""
    return checks.colour_under(np.asarray(image), mask, COLOURS)


def background_of(image: Image.Image, masks=()) -> str:
    """The background nearest to the median pixel outside the masks (a generated image has none: objects
    cover well under half of any scene, so the median is still the background's)."""
    outside = ~np.any(np.asarray(masks, dtype=bool).reshape(-1, *image.size[::-1]), axis=0)
    return checks.colour_under(np.asarray(image), outside, _BACKGROUND_RGB)


def colour_masks(image: Image.Image, min_pixels: int = 24) -> dict[str, np.ndarray]:
    """Pixels nearest to each object colour (backgrounds compete too), for colours with enough of them,
    the most frequent first."""
    regions = checks.colour_regions(np.asarray(image), {**COLOURS, **_BACKGROUND_RGB}, min_pixels)
    return {name: region for name, region in regions.items() if name in COLOURS}


shape_of = checks.shape_of


def follows(image: Image.Image, spec: Spec) -> dict[str, bool]:
    """Whether an image shows a spec's caption: its background, exactly its object colours as the most
    frequent ones, and (one-object captions) its shape."""
    masks = colour_masks(image)
    wanted = [o.colour for o in spec.objects]
    result = {"background": background_of(image) == spec.background,
              "colours": sorted(list(masks)[:len(wanted)]) == sorted(wanted)}
    if len(wanted) == 1:
        result["shape"] = result["colours"] and shape_of(masks[wanted[0]]) == spec.objects[0].shape
    return result


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """A mask widened by `pixels` in every direction (a square neighbourhood), so that an edit region drawn
    from the renderer's mask also covers the shape's anti-aliased rim."""
    padded = np.pad(mask, pixels)
    height, width = mask.shape
    span = range(2 * pixels + 1)
    return np.any([padded[i:i + height, j:j + width] for i in span for j in span], axis=0)


def recoloured(spec: Spec, index: int) -> Spec:
    """The spec with object `index` in a colour drawn from the spec's seed that no object of the scene has,
    so the judges can tell the edited object from every other one."""
    taken = {thing.colour for thing in spec.objects}
    rng = np.random.default_rng([spec.seed, index])
    return spec.edited(index, colour=str(rng.choice([c for c in COLOURS if c not in taken])))


# --- tokenizer ----------------------------------------------------------------------------------------

def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the best-ranked adjacent pair everywhere, repeat."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if tuple(parts[i:i + 2]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def world_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer in which every world word is one token (`word</w>`), written to `directory`.

    Merges are added one at a time, each joining the leftmost pair of a word that earlier merges leave
    in pieces; a new merge ranks last, so it never changes how already-whole words are split.
    Characters stay in the vocabulary, so another word is spelled out rather than unknown."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab.update({char: len(vocab), char + "</w>": len(vocab) + 1})
    ranks: dict[tuple[str, str], int] = {}
    for word in vocabulary():
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


# The scene `icd demo` edits with `mini` (not one it was trained on: training scenes are seeds 0-3999);
# ship.py packs its picture and prompts into the model folder.
DEMO_SCENE = Spec("sandy", (Placed("circle", "red", 0.5, 0.5, 0.24),), seed=10**6 - 1)
DEMO_TARGET = DEMO_SCENE.edited(colour="blue")
