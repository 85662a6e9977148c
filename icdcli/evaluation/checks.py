"""Judges for data sets that know what an edit should have drawn where: a synthetic world whose renderer
gives every object's mask and colour (bench/miniature writes its editing sets so).

A row of a folder data set may carry `palettes` (named lists of named RGB colours) and `checks`, each one
value of the record's metrics under its `name`:

- `colour`: the palette entry nearest to the median pixel of the edit under `region` is `expect` (1) or not (0);
- `shape`: the pixels whose nearest entry (among every palette of the row) is `colour` form the shape `expect`
  (circle, square or triangle, told apart by how much of their bounding box they fill) (1) or not (0);
- `psnr`: the PSNR of the edit against the source photo inside `region` (the whole image without one).

Checks of the same name are combined: judges must all pass (the minimum), PSNRs are averaged. `region` is a
mask picture (white = the pixels to look at) relative to the data set.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Identical pixels have an infinite PSNR, which no mean survives: every PSNR here and in the metrics stops at
# this value. An 8-bit edit that differs anywhere stays well below it only on small images, so read a mean
# near the cap as "mostly identical".
PSNR_CAP = 60.0
SHAPES = ("circle", "square", "triangle")
RGB = tuple[int, int, int]


class Check(BaseModel):
    """One judge of a row (see the module's docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["colour", "shape", "psnr"]
    region: str | None = Field(None, min_length=1)
    palette: str | None = None
    colour: str | None = None
    expect: str | None = None
    min_pixels: int = Field(24, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> Check:
        needed = {"colour": ("region", "palette", "expect"), "shape": ("colour", "expect"), "psnr": ()}[self.kind]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} check needs {', '.join(missing)}")
        if self.kind == "shape" and self.expect not in SHAPES:
            raise ValueError(f"a shape check expects one of {', '.join(SHAPES)}, not {self.expect!r}")
        return self


def colour_under(image: np.ndarray, region: np.ndarray, palette: dict[str, RGB]) -> str:
    """The palette entry nearest (Euclidean in RGB) to the median pixel of an (H, W, 3) 0..255 image under a
    boolean region."""
    median = np.median(np.asarray(image)[region], axis=0).astype(np.float32)
    centres = np.asarray(list(palette.values()), np.float32)
    return list(palette)[int(np.argmin(np.linalg.norm(centres - median, axis=1)))]


def colour_regions(image: np.ndarray, palette: dict[str, RGB], min_pixels: int) -> dict[str, np.ndarray]:
    """Each entry's pixels (those nearest to it), for entries with at least `min_pixels`, most frequent first."""
    centres = np.asarray(list(palette.values()), np.float32)
    labels = np.argmin(np.linalg.norm(np.asarray(image, np.float32)[..., None, :] - centres, axis=-1), axis=-1)
    regions = {name: labels == i for i, name in enumerate(palette)}
    kept = ((name, region) for name, region in regions.items() if region.sum() >= min_pixels)
    return dict(sorted(kept, key=lambda item: -item[1].sum()))


def shape_of(mask: np.ndarray) -> str | None:
    """Shapes told apart by how much of their bounding box they fill: triangle 1/2, circle pi/4, square 1.
    A 3x3 majority filter first drops stray pixels that would widen the box; None if nothing is left."""
    padded = np.pad(mask, 1).astype(np.int8)
    height, width = mask.shape
    votes = sum(padded[i:i + height, j:j + width] for i in range(3) for j in range(3))
    rows, cols = np.nonzero(votes >= 5)
    if rows.size == 0:
        return None
    fill = rows.size / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    return "triangle" if fill < 0.68 else "circle" if fill < 0.88 else "square"


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """PSNR of two 8-bit images over the pixels of a boolean region (all of them without one), capped at PSNR_CAP."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = float(np.mean((diff if region is None else diff[region]) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255.0**2 / mse))


def run_checks(checks: list[Check], edit: np.ndarray, source: np.ndarray, palettes: dict[str, dict[str, RGB]],
               region_of: Callable[[str], np.ndarray]) -> dict[str, float | None]:
    """Every check's value, same names combined; `region_of(path)` reads a region as a boolean mask of the
    images' size. A check whose region is empty gives None."""
    values: dict[str, list[float | None]] = defaultdict(list)
    for check in checks:
        region = None if check.region is None else region_of(check.region)
        if region is not None and not region.any():
            values[check.name].append(None)
        elif check.kind == "psnr":
            values[check.name].append(psnr(edit, source, region))
        elif check.kind == "colour":
            values[check.name].append(float(colour_under(edit, region, palettes[check.palette]) == check.expect))
        else:
            every = {name: rgb for palette in palettes.values() for name, rgb in palette.items()}
            pixels = colour_regions(edit, every, check.min_pixels).get(check.colour)
            values[check.name].append(float(pixels is not None and shape_of(pixels) == check.expect))
    kinds = {check.name: check.kind for check in checks}
    return {name: _combined(found, kinds[name]) for name, found in values.items()}


def _combined(values: list[float | None], kind: str) -> float | None:
    known = [value for value in values if value is not None]
    if not known:
        return None
    return float(np.mean(known)) if kind == "psnr" else min(known)
