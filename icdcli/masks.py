"""Masks, in one place: where an edit may act (white), where the photo is kept (black), grey partly.

A mask file is read once (`read_mask`: any picture, its brightness, transparent pixels black), resized by the
one `resize` (Pillow's antialiased bilinear filter on float values, in either direction) to the working size
the model sees and to the photo's size where its own pixels are kept outside (`keep_outside`, which also puts
the photo's grain back inside where the edit changed nothing: `with_photo_detail`); the pipeline then averages
it onto the latent grid (`icd.pipeline.latent_mask`). The map an edit was confined to comes back
on the latent grid and is saved with each cell a block (`save_mask`)."""

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
# Inside the mask the photo's detail comes back where the edit kept to the reconstruction and the reconstruction
# to the photo (`with_photo_detail`): blurred differences up to 16 levels of 255 count as detail, from 48 levels
# on as content. Without it the decoder's smooth texture inside the mask met the photo's grain at the mask's
# edge, a seam that no feathering removes (on mini's oval-mask scenes the texture energy just inside the edge was
# 0.28 of the photo's; BENCHMARKS.md, "The seam of a mask"). The second test keeps a part the reconstruction
# failed (an object it drew in another colour) from coming back as a crisp sliver of the photo.
DETAIL_LEVELS = (16.0, 48.0)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask picture (any image format, like the photos) as (h, w) float32 in [0, 1]: its brightness, white
    where the edit may act, black where the photo is kept, grey partly; transparent pixels count as black.
    One that selects nothing is refused, naming the file."""
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
    """(h, w, 1): 1 where two pictures (float RGB) differ by at most DETAIL_LEVELS[0] levels of 255, 0 from
    DETAIL_LEVELS[1] on: their largest channel difference, blurred over a working pixel (so that grain, which
    differs everywhere a little, counts as detail, and a changed shape or colour as content)."""
    gap = Image.fromarray(np.rint(np.abs(one - other).max(axis=-1)).astype(np.uint8))
    gap = np.asarray(gap.filter(ImageFilter.GaussianBlur(working_pixel)), np.float32)[..., np.newaxis]
    low, high = DETAIL_LEVELS
    return 1.0 - np.clip((gap - low) / (high - low), 0.0, 1.0)


def with_photo_detail(edited: Image.Image, reconstruction: Image.Image, photo: Image.Image,
                      working_pixel: float) -> Image.Image:
    """The edit (RGB, the photo's size) with the photo's own detail put back where the edit changed nothing:
    the photo less the reconstruction of its inversion (grain and fine texture that the decoder does not draw,
    and what the working size lost), added where the edit kept to the reconstruction and the reconstruction to
    the photo (`_detail_share`, over a `working_pixel` of photo pixels); elsewhere the edit stands as it is."""
    edit, rebuilt, own = (np.asarray(image.convert("RGB"), np.float32) for image in (edited, reconstruction, photo))
    share = _detail_share(edit, rebuilt, working_pixel) * _detail_share(own, rebuilt, working_pixel)
    return Image.fromarray(np.clip(np.rint(edit + share * (own - rebuilt)), 0, 255).astype(np.uint8))


def keep_outside(edited: Image.Image, reconstruction: Image.Image, photo: LoadedImage, mask: np.ndarray,
                 working_width: int) -> Image.Image:
    """The edit inside the mask, with the photo's detail where it changed nothing (`with_photo_detail`, given
    the reconstruction decoded beside it), and the input photo outside it, at the photo's size. The mask is
    feathered inwards by FEATHER_PX working pixels, so every pixel the mask leaves black is exactly the photo's."""
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
