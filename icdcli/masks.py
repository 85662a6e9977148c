"""Masks, in one place: where an edit may act (white), where the photo is kept (black), grey partly. A mask file
is read once (`read_mask`) and resized by the one `resize` to the working size and to the photo's (`keep_outside`);
the pipeline averages it onto the latent grid (`icd.pipeline.latent_mask`), and the map an edit was confined to
is saved with each latent cell a block (`save_mask`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

from .errors import InputError
from .files import atomic_write
from .images import ALPHA_MODES, INTEGER_MODES, LoadedImage, as_array, max_pixels_limit, opened, to_8bit

# --keep-outside feathers the mask inwards by 2 working pixels, a quarter of a latent cell: on mini's two-object
# scenes 4 pixels blurred the photo's colour into small objects (success 0.42 -> 0.33), 0.5-2 pixels did not.
FEATHER_PX = 2.0
# `with_photo_detail`: blurred differences up to 16 levels of 255 count as detail, from 48 on as content. Without
# the photo's detail the decoder's smooth texture met the photo's grain at the mask's edge, a seam no feathering
# removes (BENCHMARKS.md, "The seam of a mask").
DETAIL_LEVELS = (16.0, 48.0)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask picture (any format the photos may have) as (h, w) float32 in [0, 1], its brightness (transparent
    pixels black); one that selects nothing is refused, naming the file."""
    path = Path(path)
    with opened(path, max_pixels_limit()) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in INTEGER_MODES or im.mode == "F":
            im = to_8bit(im)
        if im.mode in ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            brightness = Image.composite(rgba.convert("L"), Image.new("L", rgba.size, 0), rgba.getchannel("A"))
        else:
            brightness = im.convert("L")
    mask = np.asarray(brightness, dtype=np.float32) / 255.0
    if not mask.any():
        raise InputError(f"{path.name}: the mask selects nothing (it is all black): paint white where the edit "
                         "may act")
    return mask


def selects_everything(mask: np.ndarray) -> bool:
    """Whether a mask lets the edit act everywhere (all white): then it confines nothing."""
    return bool(mask.min() >= 1.0)


def resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) mask at `size` (w, h), values kept in [0, 1]: the one resize every use of a mask goes through."""
    if mask.shape[::-1] == tuple(size):
        return mask
    resized = Image.fromarray(np.asarray(mask, dtype=np.float32)).resize(tuple(size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def model_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask at the working size (w, h), as the (1, 1, h, w) float32 array `icd.pipeline.edit` takes (small
    enough to send to `icd serve`, fine enough for any latent grid)."""
    return resize(mask, size)[np.newaxis, np.newaxis]


def _detail_share(one: np.ndarray, other: np.ndarray, working_pixel: float) -> np.ndarray:
    """(h, w, 1): 1 where two float RGB pictures differ by at most DETAIL_LEVELS[0], 0 from DETAIL_LEVELS[1] on:
    their largest channel difference blurred over a working pixel (grain is detail, a changed shape content)."""
    gap = Image.fromarray(np.rint(np.abs(one - other).max(axis=-1)).astype(np.uint8))
    gap = np.asarray(gap.filter(ImageFilter.GaussianBlur(working_pixel)), np.float32)[..., np.newaxis]
    low, high = DETAIL_LEVELS
    return 1.0 - np.clip((gap - low) / (high - low), 0.0, 1.0)


def with_photo_detail(edited: Image.Image, reconstruction: Image.Image, photo: Image.Image,
                      working_pixel: float) -> Image.Image:
    """The edit (RGB, the photo's size) plus the photo's own detail (the photo less its reconstruction: grain the
    decoder does not draw, what the working size lost) where the edit kept to the reconstruction and the
    reconstruction to the photo (so a part the reconstruction failed does not come back as a crisp sliver)."""
    edit, rebuilt, own = (np.asarray(image.convert("RGB"), np.float32) for image in (edited, reconstruction, photo))
    share = _detail_share(edit, rebuilt, working_pixel) * _detail_share(own, rebuilt, working_pixel)
    return Image.fromarray(np.clip(np.rint(edit + share * (own - rebuilt)), 0, 255).astype(np.uint8))


def keep_outside(edited: Image.Image, reconstruction: Image.Image, photo: LoadedImage, mask: np.ndarray,
                 working_width: int) -> Image.Image:
    """At the photo's size: the edit inside the mask (`with_photo_detail`), the photo outside it, the mask
    feathered inwards by FEATHER_PX working pixels so that every pixel it leaves black is exactly the photo's."""
    working_pixel = photo.original_size[0] / working_width
    inside = with_photo_detail(edited, reconstruction, photo.rgb, working_pixel).convert(edited.mode)
    if "A" in edited.getbands():
        inside.putalpha(edited.getchannel("A"))
    grey = Image.fromarray(np.rint(resize(mask, photo.original_size) * 255).astype(np.uint8))
    alpha = ImageChops.darker(grey, grey.filter(ImageFilter.GaussianBlur(FEATHER_PX * working_pixel)))
    kept = photo.rgb.convert(edited.mode)
    if photo.alpha is not None:
        kept.putalpha(photo.alpha)
    return Image.composite(inside, kept, alpha)


def cells_image(mask, size: tuple[int, int]) -> Image.Image:
    """A (1, 1, h, w) map on the latent grid, array or tensor, as the greyscale picture of the size (w, h) it
    applies to, each latent cell a block (what `--save-mask` writes: the cells the edit worked on)."""
    values = np.clip(as_array(mask)[0, 0], 0.0, 1.0)
    grey = Image.fromarray(np.rint(values * 255).astype(np.uint8))
    return grey.resize(tuple(size), Image.Resampling.NEAREST)


def save_mask(mask, path: str | Path, size: tuple[int, int], *, overwrite: bool = False) -> None:
    """Write `cells_image` as a PNG through the one writer of user files."""
    picture = cells_image(mask, size)
    atomic_write(Path(path), lambda temporary: picture.save(temporary, format="PNG"), overwrite=overwrite)
