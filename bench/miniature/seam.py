"""Does a masked edit show where its mask ends? Texture energy in bands across the mask's edge.

An edit inside a mask is the model's decoding; outside it, with `--keep-outside`, the photo's own pixels. The
decoder draws smoother textures than a photo has, so where the two meet a seam can show: a step in texture
energy (the squared high-pass of the luma, which the eye reads as grain) from one side of the edge to the other.
`seam_step` measures it against the photo's own energy on the same pixels, so that a photo whose texture
changes across the edge by itself shows no seam; `profile` gives the whole profile. Pixels near an object
(of the photo or of the intended result) are left out: an object's outline is an edge of its own, not a seam.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SEAM_BAND = 3  # pixels each side of the edge that `seam_step` compares
SEAM_EDGES = [-SEAM_BAND, 0, SEAM_BAND]  # signed distances: the band outside the edge, the band inside
HIGH_PASS_SIGMA = 1.0  # the Gaussian whose blur the high-pass removes (pixels)


def _blurred(values: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of a 2-D array, edges mirrored."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(values, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        values = sum(tap * np.take(padded, range(i, i + values.shape[axis]), axis=axis) for i, tap in enumerate(taps))
    return values


def texture_energy(image: Image.Image) -> np.ndarray:
    """(h, w) squared high-pass of the image's luma (levels of 255, squared)."""
    luma = np.asarray(image.convert("RGB"), np.float64) @ np.array([0.299, 0.587, 0.114])
    return (luma - _blurred(luma, HIGH_PASS_SIGMA)) ** 2


def edge_distance(mask: np.ndarray) -> np.ndarray:
    """(h, w) signed distance in pixels from each pixel's centre to the nearest pixel on the other side of the
    mask's edge: positive inside (1 on its first row of pixels), negative outside (-1 on the first outside)."""
    inside = np.asarray(mask, bool)
    points = np.argwhere(np.ones_like(inside)).astype(np.float64)
    distance = np.empty(inside.size)
    for side in (True, False):
        others = np.argwhere(inside != side).astype(np.float64)
        rows = np.flatnonzero(inside.ravel() == side)
        if not len(others):
            distance[rows] = np.inf
            continue
        for start in range(0, len(rows), 512):  # nearest pixel of the other side, in chunks
            chunk = rows[start:start + 512]
            gaps = ((points[chunk, None, :] - others[None]) ** 2).sum(-1)
            distance[chunk] = np.sqrt(gaps.min(1))
    return np.where(inside.ravel(), distance, -distance).reshape(inside.shape)


def _usable(mask: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Pixels whose high-pass reads only texture: away from the objects and the picture's border."""
    keep = ~np.asarray(objects, bool)
    for _ in range(3):  # three pixels clear of an object's outline
        padded = np.pad(keep, 1, constant_values=True)
        keep = keep & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    keep[:2], keep[-2:], keep[:, :2], keep[:, -2:] = False, False, False, False
    return keep


def band_energies(energy: np.ndarray, distance: np.ndarray, usable: np.ndarray, edges: list[float]) -> np.ndarray:
    """Sum of `energy` and pixel count in each band [edges[i], edges[i + 1]) of signed distance (2, bands)."""
    sums, counts = [], []
    for low, high in zip(edges, edges[1:]):
        band = usable & (distance >= low) & (distance < high)
        sums.append(energy[band].sum())
        counts.append(band.sum())
    return np.array([sums, counts], np.float64)


def seam_bands(edited: Image.Image, photo: Image.Image, mask: np.ndarray, objects: np.ndarray,
               edges: list[float]) -> np.ndarray:
    """(3, bands): the edit's and the photo's summed texture energy and the pixel count of each band (bands
    summed over scenes give a set's profile)."""
    distance, usable = edge_distance(mask), _usable(mask, objects)
    edit = band_energies(texture_energy(edited), distance, usable, edges)
    own = band_energies(texture_energy(photo), distance, usable, edges)
    return np.array([edit[0], own[0], edit[1]])


def profile(bands: np.ndarray) -> np.ndarray:
    """Each band's texture energy in the edit over the photo's on the same pixels (1: the photo's grain)."""
    return bands[0] / np.maximum(bands[1], 1e-12)


def seam_step(bands: np.ndarray) -> float:
    """The seam in `seam_bands` taken with SEAM_EDGES (outside, inside): |log2| of the edit's relative texture
    energy just inside the edge over that just outside; 0 when the grain runs on unchanged, 1 when it halves
    (or doubles) at the edge."""
    outside, inside = np.maximum(profile(bands), 1e-12)
    return float(abs(np.log2(inside / outside)))


def oval(box: tuple[int, int, int, int], margin: float, size: int) -> np.ndarray:
    """A (size, size) bool ellipse around `box` (left, top, right, bottom): the one through the box's corners,
    widened by `margin` pixels, as a person paints a mask around an object."""
    left, top, right, bottom = box
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    half_x = (right - left) / 2 * np.sqrt(2) + margin
    half_y = (bottom - top) / 2 * np.sqrt(2) + margin
    y, x = np.mgrid[:size, :size] + 0.5
    return ((x - centre_x) / half_x) ** 2 + ((y - centre_y) / half_y) ** 2 <= 1.0


def mask_image(mask: np.ndarray) -> Image.Image:
    """A bool mask as the black-and-white picture `icd edit --mask` reads."""
    return Image.fromarray(np.asarray(mask, np.uint8) * 255)
