"""Reading photos into UNet-ready tensors and writing results with their parameters.

A photo is resized (Lanczos) to a *working size* whose sides divide by the model's `multiple` (64 for SD1.5,
32 for SDXL), and the result back to the original size with its alpha re-attached. No width or height given:
the aspect ratio kept, the area about `resolution`², each side rounded to the nearest multiple; one given: the
other follows the aspect ratio; a given side that is no multiple is a usage error naming the nearest, never a
silent change. Inputs are normalised on load: EXIF orientation applied, alpha split off and the colour put over
white (hidden colours under transparency must not leak), 16-bit and float pixels scaled (not clipped) to 8
bits, first frame only; the pixel count is checked from the header, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .errors import ICDError, InputError, UsageError
from .files import atomic_write, open_regular
from .limits import DEFAULT_QUALITY, MAX_SIDE

DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "ICD_MAX_PIXELS"

ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
INTEGER_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # read as 16-bit full scale
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
OUTPUT_SUFFIXES = frozenset(_FORMATS)  # what save_image writes
_EXIF_IFD, _USER_COMMENT, _SOFTWARE, _DESCRIPTION, _ORIENTATION = 0x8769, 0x9286, 0x0131, 0x010E, 0x0112
# EXIF UserComment starts with its character code: A1111 writes UNICODE (UTF-16, in the EXIF byte order).
_ASCII_PREFIX, _UNICODE_PREFIX = b"ASCII\0\0\0", b"UNICODE\0"
_JPEG_EXIF_LIMIT = 65533  # one JPEG marker segment holds the whole EXIF block
# The record's keys that A1111-style readers know under another label than the key's own.
_PARAMETER_LABELS = {"model_fingerprint": "Model hash", "blend": "Mask words"}
_PILLOW_THRESHOLD_LOCK = threading.RLock()


@dataclass
class LoadedImage:
    """A photo ready for the model, plus what is needed to give the result back its shape."""

    rgb: Image.Image
    alpha: Image.Image | None
    path: Path
    original_size: tuple[int, int]
    mode: str


def max_pixels_limit() -> int:
    """The pixel limit: ICD_MAX_PIXELS when set (read now, so tests and users can change it)."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ICDError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, not {raw!r}")
    return limit


@contextmanager
def _pillow_pixel_threshold(pixels: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb threshold (about 89.5 megapixels) set to `pixels` (None: off) for a while, so
    that our own limit, checked from the header first, decides (ICD_MAX_PIXELS can lift it). The threshold is a
    module global: the lock keeps two of our threads from restoring each other's value."""
    with _PILLOW_THRESHOLD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def opened(path: Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The image with only its header read, refused when over `max_pixels` (when given), decodable within it;
    every failure is one InputError line that starts with the file name."""
    name = path.name
    with open_regular(path) as file:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with _pillow_pixel_threshold(None):
                    opened = Image.open(file)
                with opened as im:
                    if max_pixels is None:
                        yield im
                        return
                    check_pixel_count(name, _oriented_size(im), max_pixels)
                    with _pillow_pixel_threshold(max_pixels):
                        yield im
        except UnidentifiedImageError:
            raise InputError(f"{name}: not an image (cannot identify the format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{name}: refused as a possible decompression bomb ({exc})") from None
        except (OSError, SyntaxError, EOFError, ValueError):
            raise InputError(f"{name}: truncated or corrupt image data") from None


def check_pixel_count(name: str, size: tuple[int, int], limit: int) -> None:
    """An InputError when a picture of `size` (width, height) would be over `limit` pixels."""
    width, height = size
    if width * height > limit:
        described = f"{limit // 1_000_000}-megapixel" if limit % 1_000_000 == 0 else f"{limit}-pixel"
        raise InputError(f"{name}: {width}x{height} pixels is over the {described} limit "
                         f"(set {MAX_PIXELS_ENV} to raise it)")


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as the photo is shown: EXIF orientations 5 to 8 turn it a quarter."""
    width, height = im.size
    return (height, width) if _header_exif(im).get(_ORIENTATION) in {5, 6, 7, 8} else (width, height)


def _header_exif(im: Image.Image) -> Image.Exif:
    """The EXIF block as far as the header holds it (PNG's own getexif decodes the pixels to look further)."""
    if hasattr(im, "tag_v2"):  # TIFF: the tags are the header
        return im.getexif()
    exif = Image.Exif()
    if "exif" in im.info:
        exif.load(im.info["exif"])
    return exif


def probe_image(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """The (width, height) load_image would give, with the same refusals, from the header alone: cheap enough
    to check every input before any model loads (the pixel data is neither read nor checked)."""
    path = Path(path)
    with opened(path, max_pixels_limit() if max_pixels is None else max_pixels) as im:
        return _oriented_size(im)


def load_image(path: str | Path, *, max_pixels: int | None = None) -> LoadedImage:
    """Open any still image as 8-bit RGB plus optional alpha; `max_pixels` defaults to max_pixels_limit()."""
    path = Path(path)
    with opened(path, max_pixels_limit() if max_pixels is None else max_pixels) as im:
        im.load()
        mode = im.mode
        im = ImageOps.exif_transpose(im)
        rgb, alpha = _split_alpha(im)
    return LoadedImage(rgb=rgb, alpha=alpha, path=path, original_size=rgb.size, mode=mode)


def _split_alpha(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if im.mode in INTEGER_MODES or im.mode == "F":
        return to_8bit(im).convert("RGB"), None
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return _over_white(rgba), rgba.getchannel("A")
    return im.convert("RGB"), None


def to_8bit(im: Image.Image) -> Image.Image:
    """Scale wide pixels to 0..255; Pillow's own convert clips everything above 255 to white."""
    values = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if im.mode == "F":
        full_scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0  # 0..1 floats or 8-bit range
    else:
        full_scale = 65535.0
    return Image.fromarray(np.clip(np.round(values * (255.0 / full_scale)), 0, 255).astype(np.uint8))


def _over_white(im: Image.Image) -> Image.Image:
    """Flatten transparency onto white, as a viewer would show it."""
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")


def working_size(original_size: tuple[int, int], *, resolution: int, multiple: int,
                 width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The (w, h) the model works at; see the module docstring for the policy."""
    orig_w, orig_h = original_size
    if width is not None:
        check_multiple("width", width, multiple)
    if height is not None:
        check_multiple("height", height, multiple)
    if width is not None and height is not None:
        size = width, height
    elif width is not None:
        size = width, _nearest_multiple(width * orig_h / orig_w, multiple)
    elif height is not None:
        size = _nearest_multiple(height * orig_w / orig_h, multiple), height
    else:
        scale = resolution / (orig_w * orig_h) ** 0.5
        size = _nearest_multiple(orig_w * scale, multiple), _nearest_multiple(orig_h * scale, multiple)
    if max(size) > MAX_SIDE:  # a photo of an extreme aspect ratio
        raise InputError(f"its working size would be {size[0]}x{size[1]}, over the {MAX_SIDE}-pixel limit of a "
                         f"side (the photo is {orig_w}x{orig_h}): give --width and --height")
    return size


def _nearest_multiple(value: float, multiple: int) -> int:
    return max(1, int(value / multiple + 0.5)) * multiple


def check_multiple(name: str, value: int, multiple: int) -> None:
    """--width/--height must be positive multiples of the model's `multiple`: a usage error names the nearest."""
    if value > 0 and value % multiple == 0:
        return
    below = value // multiple * multiple
    nearest = f"{below} or {below + multiple}" if below > 0 else f"{multiple}"
    raise UsageError(f"--{name} {value} is not a positive multiple of {multiple} "
                   f"(nearest valid: {nearest})")


def as_array(values) -> np.ndarray:
    """A numpy array or a torch tensor (on any device, any float dtype) as a float32 numpy array on the CPU,
    without importing torch: the client of `icd serve` handles pictures and latents as arrays."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def image_to_array(image: Image.Image) -> np.ndarray:
    """An RGB picture as a (1, 3, h, w) float32 array in [-1, 1], what the VAE reads."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1)[np.newaxis])


def pixels_to_image(pixels) -> Image.Image:
    """A (3, h, w) array or tensor in [-1, 1] (values outside clamped) as an RGB picture. Every result passes
    here: a numerically broken one (fp16 overflow) stops before a black or noisy picture is written as fine."""
    values = as_array(pixels)
    if not np.isfinite(values).all():
        raise ICDError("the result holds NaN or inf values: nothing was written (try --dtype fp32)")
    scaled = (np.clip(values, -1, 1) + 1) * np.float32(127.5)
    return Image.fromarray(np.ascontiguousarray(np.round(scaled).astype(np.uint8).transpose(1, 2, 0)))


def to_model_array(img: LoadedImage, size: tuple[int, int]) -> np.ndarray:
    """The photo at the working size as a (1, 3, h, w) float32 array in [-1, 1]."""
    return image_to_array(img.rgb.resize(tuple(size), Image.Resampling.LANCZOS))


def to_model_input(img: LoadedImage, size: tuple[int, int]):
    """`to_model_array` as a torch tensor, for code that runs a model itself (training's data)."""
    import torch

    return torch.from_numpy(to_model_array(img, size))


def from_model_output(pixels, original: LoadedImage | None) -> Image.Image:
    """A (3, h, w) array or tensor in [-1, 1] as a picture of the original's size and alpha (as is when None)."""
    image = pixels_to_image(pixels)
    if original is None:
        return image
    image = image.resize(original.original_size, Image.Resampling.LANCZOS)
    if original.alpha is not None:
        image.putalpha(original.alpha)
    return image


def save_image(img: Image.Image, path: str | Path, *, metadata: dict, overwrite: bool = False,
               quality: int = DEFAULT_QUALITY) -> None:
    """Save in the format the suffix names (JPEG and WebP at `quality`) with the parameters embedded twice: the
    A1111 `parameters` text for the tools that read it and our JSON for read_metadata (PNG text chunks
    `parameters` and `icd`; in a JPEG or WebP, EXIF UserComment and ImageDescription)."""
    path = Path(path)
    image_format = _FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ICDError(f"{path.name}: unknown image format {path.suffix!r} (use .png, .jpg, .jpeg or .webp)")
    data = json.dumps(metadata, default=str)  # ASCII: json escapes the rest
    parameters = parameters_text(metadata, img.size)
    if image_format == "PNG":
        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("icd", data)
        options = {"pnginfo": info}
    else:  # where A1111 and the tools that read its files look in a JPEG or WebP; our JSON beside it
        exif = Image.Exif()
        exif[_SOFTWARE] = f"icd {__version__}"
        exif[_DESCRIPTION] = data
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + parameters.encode("utf-16-be")  # "MM" EXIF
        if image_format == "JPEG" and len(exif.tobytes()) > _JPEG_EXIF_LIMIT:
            raise ICDError(f"{path.name}: the parameters are too long for a JPEG's EXIF block "
                           "(save as .png or .webp)")
        options = {"exif": exif, "quality": quality}
        if image_format == "JPEG" and img.mode != "RGB":
            img = _over_white(img)  # JPEG has no alpha
    atomic_write(path, lambda temporary: img.save(temporary, format=image_format, **options),
                 overwrite=overwrite)


def parameters_text(metadata: dict, size: tuple[int, int]) -> str:
    """The A1111-style `parameters` string other tools read: the prompt line, then `Key: value` pairs (Steps:
    the decoding steps; CFG scale: the classical one, the paper's w + 1; the fingerprint as `Model hash`)."""
    steps = metadata.get("guidance_steps")
    w = metadata.get("guidance_w")
    fields = {"Steps": len(steps) if steps else None, "Sampler": "iCD" if steps else None,
              "CFG scale": w + 1 if isinstance(w, (int, float)) else None,
              "Seed": metadata.get("seed"), "Size": f"{size[0]}x{size[1]}",
              "Model hash": metadata.get("model_fingerprint"), "Model": metadata.get("model")}
    lines = [str(metadata.get("prompt", ""))]
    known = {"prompt", "guidance_steps", "guidance_w", "seed", "model", "model_fingerprint"}
    for key, value in metadata.items():
        if key not in known and value is not None:
            label = _PARAMETER_LABELS.get(key, key.replace("_", " ").capitalize())
            fields.setdefault(label, _readable(value))
    pairs = [f"{label}: {_quoted(value)}" for label, value in fields.items() if value is not None]
    # A file name that is not UTF-8 (surrogate escapes in a str) is shown with its bytes escaped, \xe9: the text
    # is for people and must be UTF-8; the `icd` JSON keeps the name exactly.
    text = "\n".join([*lines, ", ".join(pairs)])
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _readable(value: object, nested: bool = False) -> str:
    """A value as a person would write it: a list as `a, b`, a mapping as `key: value` pairs, inner ones in ()."""
    if isinstance(value, dict):
        text = ", ".join(f"{key}: {_readable(item, True)}" for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_readable(item, True) for item in value)
    else:
        return str(value)
    return f"({text})" if nested else text


def _quoted(value: object) -> str:
    """Quote values that would break the comma-separated list, as A1111 does."""
    text = str(value)
    return json.dumps(text) if any(char in text for char in ',:"\n') else text


def read_metadata(path: str | Path) -> dict:
    """The `icd` metadata written by save_image ({} when the file has none); reads the header only."""
    text = embedded_texts(Path(path))[1]
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def embedded_texts(path: str | Path) -> tuple[str | None, str | None]:
    """(A1111-style parameters text, icd JSON) as save_image embeds them, None for each that the file lacks."""
    path = Path(path)
    with opened(path) as im:
        if im.format == "PNG":
            parameters, data = im.info.get("parameters"), im.info.get("icd")
        else:
            exif = _header_exif(im)
            parameters, data = _user_comment(exif), exif.get(_DESCRIPTION)
    return tuple(text if isinstance(text, str) else None for text in (parameters, data))


def _user_comment(exif: Image.Exif) -> str | None:
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not isinstance(comment, bytes):
        return None
    code, text = comment[:8], comment[8:]
    if code == _UNICODE_PREFIX:
        return text.decode("utf-16-le" if exif.endian == "<" else "utf-16-be", errors="replace")
    return text.decode("ascii", errors="replace") if code == _ASCII_PREFIX else None
