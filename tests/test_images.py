"""Loading odd photos, the working-size policy, tensor round trips and safe metadata-carrying saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icd import images
from icd.errors import ICDError, InputError, OutputExistsError
from icd.files import atomic_write
from icd.images import (
    from_model_output,
    load_image,
    parameters_text,
    pixels_to_image,
    read_metadata,
    embedded_texts,
    save_image,
    to_model_input,
    working_size,
)

RED_TRANSPARENT = (255, 0, 0, 0)


def load_unchanged(path: Path, **kwargs):
    """load_image, asserting that it leaves the input file byte-identical."""
    before = path.read_bytes()
    try:
        return load_image(path, **kwargs)
    finally:
        assert path.read_bytes() == before


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        if path.is_file():
            load_unchanged(path, **kwargs)
        else:
            load_image(path, **kwargs)
    return str(info.value)


def noise_jpeg(path: Path, size=(64, 64)) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


# --- load_image: failures -------------------------------------------------------------------

def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("not a picture")
    assert load_error(path) == "photo.jpg: not an image (cannot identify the format)"


def test_truncated_jpeg(tmp_path):
    path = noise_jpeg(tmp_path / "x.jpg")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert load_error(path) == "x.jpg: truncated or corrupt image data"


def test_missing_file_and_directory(tmp_path):
    assert load_error(tmp_path / "nope.png") == "nope.png: no such file"
    (tmp_path / "photos").mkdir()
    assert load_error(tmp_path / "photos") == "photos: not a regular file (a directory)"


def test_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    real_open = os.open

    def refuse(target, *args, **kwargs):  # chmod would not stop root, who runs some of these tests
        if Path(target) == path:
            raise PermissionError(13, "Permission denied")
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert load_error(path) == "locked.png: permission denied"


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    noisy = np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path)
    path.write_bytes(path.read_bytes()[:200])  # pixel data cut off: decoding would fail
    monkeypatch.setenv("ICD_MAX_PIXELS", "5000")
    assert load_error(path) == (
        "big.png: 120x100 pixels is over the 5000-pixel limit (set ICD_MAX_PIXELS to raise it)")


def test_default_limit_and_megapixel_wording(tmp_path, monkeypatch):
    monkeypatch.delenv("ICD_MAX_PIXELS", raising=False)
    assert images.max_pixels_limit() == 64_000_000
    monkeypatch.setenv("ICD_MAX_PIXELS", "lots")
    with pytest.raises(ICDError) as info:
        images.max_pixels_limit()
    assert str(info.value) == "ICD_MAX_PIXELS must be a positive whole number of pixels, not 'lots'"
    path = tmp_path / "wide.png"
    Image.new("L", (2000, 1000)).save(path)
    assert load_error(path, max_pixels=1_000_000) == (
        "wide.png: 2000x1000 pixels is over the 1-megapixel limit (set ICD_MAX_PIXELS to raise it)")


def test_our_limit_decides_over_pillows_and_pillows_is_restored(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100), 9).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10000 pixels: Pillow alone would refuse them
    assert load_unchanged(path).rgb.getpixel((50, 50)) == (9, 9, 9)
    assert images.probe_image(path) == (100, 100)
    assert load_error(path, max_pixels=9999).startswith("big.png: 100x100 pixels is over the 9999-pixel limit")
    assert Image.MAX_IMAGE_PIXELS == 4000


@pytest.mark.parametrize("raised", [Image.DecompressionBombError("too big"),
                                    Image.DecompressionBombWarning("too big")])
def test_pillow_decompression_bomb_guard_becomes_an_input_error(tmp_path, monkeypatch, raised):
    """Pillow checks again while decoding some formats (GIF frames, ICO entries): its refusal is one line too."""
    path = tmp_path / "bomb.gif"
    Image.new("L", (10, 10)).save(path)

    def refuse(*args, **kwargs):
        raise raised

    monkeypatch.setattr(Image.Image, "load", refuse)
    assert load_error(path) == "bomb.gif: refused as a possible decompression bomb (too big)"


# --- load_image: odd but valid inputs ----------------------------------------------------------

def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    loaded = load_unchanged(path)
    assert loaded.mode == "CMYK" and loaded.rgb.mode == "RGB" and loaded.alpha is None
    assert all(abs(got - want) <= 3 for got, want in zip(loaded.rgb.getpixel((8, 8)), (255, 0, 0)))


@pytest.mark.parametrize(("name", "dtype", "mode"), [("deep.png", np.uint16, "I;16"),
                                                     ("deep.tif", ">u2", "I;16B"),
                                                     ("deep32.tif", np.int32, "I")])
def test_16_bit_pixels_are_scaled_not_clipped(tmp_path, name, dtype, mode):
    path = tmp_path / name
    Image.fromarray(np.array([[0, 1000, 30000, 65535]], dtype=dtype)).save(path)
    loaded = load_unchanged(path)
    assert loaded.mode == mode
    assert [loaded.rgb.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (4, 4, 4), (117, 117, 117),
                                                                (255, 255, 255)]


def test_float_pixels_in_0_to_1_are_scaled(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)
    loaded = load_unchanged(path)
    assert loaded.mode == "F"
    assert [loaded.rgb.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize(("mode", "value", "expected"), [("1", 1, (255, 255, 255)), ("L", 77, (77, 77, 77))])
def test_bilevel_and_grayscale(tmp_path, mode, value, expected):
    path = tmp_path / "gray.png"
    Image.new(mode, (3, 2), value).save(path)
    loaded = load_unchanged(path)
    assert (loaded.mode, loaded.rgb.mode, loaded.alpha) == (mode, "RGB", None)
    assert loaded.rgb.getpixel((1, 1)) == expected


def test_rgba_hidden_colour_does_not_leak_and_alpha_comes_back(tmp_path):
    path = tmp_path / "cutout.png"
    picture = Image.new("RGBA", (4, 2), (0, 0, 255, 255))
    picture.putpixel((0, 0), RED_TRANSPARENT)
    picture.save(path)
    loaded = load_unchanged(path)
    assert loaded.mode == "RGBA"
    assert loaded.rgb.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.rgb.getpixel((1, 0)) == (0, 0, 255)
    assert list(loaded.alpha.tobytes()) == [0, 255, 255, 255, 255, 255, 255, 255]

    result = from_model_output(to_model_input(loaded, (8, 8))[0], loaded)
    assert result.mode == "RGBA" and result.size == (4, 2)
    assert list(result.getchannel("A").tobytes()) == list(loaded.alpha.tobytes())


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "icon.png"
    picture = Image.new("P", (2, 1))
    picture.putpalette([255, 0, 0, 0, 255, 0])
    picture.putpixel((1, 0), 1)
    picture.save(path, transparency=0)
    loaded = load_unchanged(path)
    assert loaded.mode == "P"
    assert [loaded.rgb.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 255, 0)]
    assert list(loaded.alpha.tobytes()) == [0, 255]


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (10, 200, 10)).save(path, exif=exif)
    loaded = load_unchanged(path)
    assert loaded.rgb.size == (20, 40) and loaded.original_size == (20, 40)
    assert loaded.path == path


def test_multi_frame_gif_uses_the_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    first, second = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    first.save(path, save_all=True, append_images=[second])
    assert load_unchanged(path).rgb.getpixel((2, 2)) == (255, 0, 0)


# --- working size ------------------------------------------------------------------------------

@pytest.mark.parametrize(("original", "resolution", "multiple", "expected"), [
    ((512, 384), 512, 64, (576, 448)),
    ((4000, 3000), 512, 64, (576, 448)),
    ((1080, 1920), 512, 64, (384, 704)),
    ((4000, 3000), 1024, 32, (1184, 896)),
    ((512, 512), 512, 64, (512, 512)),
    ((1, 400), 64, 8, (8, 1280)),  # never below one multiple
])
def test_working_size_keeps_aspect_and_area(original, resolution, multiple, expected):
    assert working_size(original, resolution=resolution, multiple=multiple) == expected


def test_working_size_with_explicit_sides():
    assert working_size((4000, 3000), resolution=512, multiple=64, width=768, height=512) == (768, 512)
    assert working_size((4000, 3000), resolution=512, multiple=64, width=768) == (768, 576)
    assert working_size((1080, 1920), resolution=512, multiple=64, height=1024) == (576, 1024)


@pytest.mark.parametrize(("sides", "message"), [
    ({"width": 500, "height": 512},
     "--width 500 is not a positive multiple of 64 (nearest valid: 448 or 512)"),
    ({"height": 30}, "--height 30 is not a positive multiple of 64 (nearest valid: 64)"),
    ({"width": 0}, "--width 0 is not a positive multiple of 64 (nearest valid: 64)"),
    ({"height": 2048}, "its working size would be 2752x2048, over the 2048-pixel limit of a side (the photo is "
                       "512x384): give --width and --height"),
])
def test_working_size_rejects_sides_that_are_not_multiples(sides, message):
    with pytest.raises(ICDError) as info:
        working_size((512, 384), resolution=512, multiple=64, **sides)
    assert str(info.value) == message


# --- tensors -------------------------------------------------------------------------------------

def test_model_input_range_shape_and_round_trip(tmp_path):
    path = tmp_path / "halves.png"
    picture = Image.new("RGB", (96, 64), (255, 255, 255))
    picture.paste((0, 0, 0), (0, 0, 48, 64))
    picture.save(path)
    loaded = load_unchanged(path)
    pixels = to_model_input(loaded, (128, 64))
    assert pixels.shape == (1, 3, 64, 128) and pixels.dtype == torch.float32
    assert pixels[0, :, 32, 5].tolist() == [-1.0, -1.0, -1.0]
    assert pixels[0, :, 32, 120].tolist() == [1.0, 1.0, 1.0]

    restored = from_model_output(pixels[0], loaded)
    assert restored.mode == "RGB" and restored.size == (96, 64)
    assert restored.getpixel((5, 30)) == (0, 0, 0) and restored.getpixel((90, 30)) == (255, 255, 255)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_result_with_nan_or_inf_is_refused(tmp_path, bad):
    pixels = torch.zeros(3, 8, 8)
    pixels[1, 4, 4] = bad
    with pytest.raises(ICDError, match=r"^the result holds NaN or inf values: nothing was written \(try --dtype fp32\)$"):
        pixels_to_image(pixels)
    with pytest.raises(ICDError, match="NaN or inf"):
        from_model_output(pixels, None)


def test_generated_output_is_returned_at_tensor_size():
    pixels = torch.full((3, 16, 32), -2.0)  # out of range values are clamped
    pixels[0] = 0.0
    generated = from_model_output(pixels, None)
    assert generated.size == (32, 16) and generated.getpixel((0, 0)) == (128, 0, 0)


# --- saving ----------------------------------------------------------------------------------------

# What `icd edit` records: the decoding steps as (t, w) pairs and the paper's w (the classical scale is w + 1).
METADATA = {"prompt": "a cat, in the snow", "guidance_steps": [[999, 0.0], [779, 6.5], [519, 6.5], [259, 6.5]],
            "guidance_w": 6.5, "tau": 0.8, "seed": 42, "model": "sd15-icd", "source_prompt": "a dog",
            "loras": ["a.safetensors"]}


def test_png_metadata_round_trip_and_parameters_text(tmp_path):
    path = tmp_path / "deep" / "dir" / "out.png"  # parents are created
    save_image(Image.new("RGB", (24, 16), (1, 2, 3)), path, metadata=METADATA)
    assert read_metadata(path) == METADATA
    with Image.open(path) as saved:
        assert saved.text["parameters"] == (
            "a cat, in the snow\n"
            "Steps: 4, Sampler: iCD, CFG scale: 7.5, Seed: 42, Size: 24x16, Model: sd15-icd, Tau: 0.8, "
            "Source prompt: a dog, Loras: a.safetensors")
        assert json.loads(saved.text["icd"]) == METADATA
        assert saved.getpixel((0, 0)) == (1, 2, 3)


def test_jpeg_metadata_and_white_background(tmp_path):
    path = tmp_path / "out.jpeg"
    picture = Image.new("RGBA", (16, 16), RED_TRANSPARENT)
    save_image(picture, path, metadata={"prompt": "café → snow", "seed": 7})
    assert read_metadata(path) == {"prompt": "café → snow", "seed": 7}
    with Image.open(path) as saved:
        assert saved.format == "JPEG" and saved.mode == "RGB"
        assert saved.getexif()[0x0131] == f"icd {images.__version__}"
        assert all(channel >= 250 for channel in saved.getpixel((8, 8)))


def test_webp_metadata_keeps_alpha(tmp_path):
    path = tmp_path / "out.webp"
    save_image(Image.new("RGBA", (16, 16), (0, 0, 255, 0)), path, metadata={"steps": 8})
    assert read_metadata(path) == {"steps": 8}
    with Image.open(path) as saved:
        assert saved.format == "WEBP" and saved.getpixel((8, 8))[3] == 0


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_every_format_carries_the_same_parameters_and_icd_json(tmp_path, suffix):
    """A1111 readers find `parameters` (a PNG text chunk, else EXIF UserComment); our JSON comes back whole."""
    metadata = {**METADATA, "prompt": "café → snow", "blend": [0.5, 0.25], "amplify": {"cross": 2, "self": [1, 3]},
                "model_fingerprint": "0123456789abcdef", "mask_hash": "fedcba9876"}
    path = tmp_path / f"out{suffix}"
    save_image(Image.new("RGB", (24, 16), (1, 2, 3)), path, metadata=metadata)
    assert read_metadata(path) == metadata
    assert embedded_texts(path)[0] == parameters_text(metadata, (24, 16)) == (
        "café → snow\n"
        "Steps: 4, Sampler: iCD, CFG scale: 7.5, Seed: 42, Size: 24x16, Model hash: 0123456789abcdef, "
        "Model: sd15-icd, Tau: 0.8, Source prompt: a dog, Loras: a.safetensors, Mask words: \"0.5, 0.25\", "
        'Amplify: "cross: 2, self: (1, 3)", Mask hash: fedcba9876')
    if suffix != ".png":
        with Image.open(path) as saved:
            comment = saved.getexif().get_ifd(0x8769)[0x9286]
        assert comment == b"UNICODE\0" + embedded_texts(path)[0].encode("utf-16-be")  # what A1111 writes


def test_jpeg_parameters_too_long_for_exif_are_refused_before_writing(tmp_path):
    with pytest.raises(ICDError, match=r"^out.jpg: the parameters are too long for a JPEG's EXIF block "
                                       r"\(save as .png or .webp\)$"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "out.jpg", metadata={"prompt": "x" * 40000})
    assert list(tmp_path.iterdir()) == []
    save_image(Image.new("RGB", (4, 4)), tmp_path / "out.webp", metadata={"prompt": "x" * 40000})
    assert read_metadata(tmp_path / "out.webp") == {"prompt": "x" * 40000}


def test_read_metadata_of_a_plain_image_is_empty(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_metadata(path) == {}
    assert embedded_texts(path)[0] is None


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ICDError) as info:
        save_image(Image.new("RGB", (4, 4)), tmp_path / "out.bmp", metadata={})
    assert str(info.value) == "out.bmp: unknown image format '.bmp' (use .png, .jpg, .jpeg or .webp)"
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError) as info:
        save_image(Image.new("RGB", (4, 4)), path, metadata={})
    assert str(info.value) == "out.png exists (use --overwrite to replace it)"
    assert path.read_bytes() == b"precious"

    save_image(Image.new("RGB", (4, 4), (9, 9, 9)), path, metadata={"seed": 1}, overwrite=True)
    assert read_metadata(path) == {"seed": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    def half_then_fail(temporary: Path):
        temporary.write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(tmp_path / "latent.pt", half_then_fail)
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old.pt"
    old.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        atomic_write(old, half_then_fail, overwrite=True)
    assert old.read_bytes() == b"old" and list(tmp_path.iterdir()) == [old]


def test_atomic_write_of_a_folder_replaces_it_whole(tmp_path):
    """A model's base folder is written the same way: it appears complete, an old one is replaced whole."""
    def folder_of(*names):
        def write(temporary: Path):
            for name in names:
                (temporary / "sub").mkdir(parents=True, exist_ok=True)
                (temporary / "sub" / name).write_text(name)
        return write

    target = tmp_path / "base"
    atomic_write(target, folder_of("a", "b"))
    assert sorted(p.name for p in (target / "sub").iterdir()) == ["a", "b"]
    with pytest.raises(OutputExistsError):
        atomic_write(target, folder_of("c"))
    atomic_write(target, folder_of("c"), overwrite=True)
    assert [p.name for p in (target / "sub").iterdir()] == ["c"]

    def half_then_fail(temporary: Path):
        folder_of("d")(temporary)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, half_then_fail, overwrite=True)
    assert [p.name for p in (target / "sub").iterdir()] == ["c"] and list(tmp_path.iterdir()) == [target]


def test_atomic_write_reports_os_errors_as_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ICDError) as info:
        atomic_write(blocker / "out.pt", lambda temporary: temporary.write_bytes(b"data"))
    assert str(info.value) == f"out.pt: cannot write (File exists: {blocker})"


def test_bundled_sample():
    sample = Path(images.__file__).parent / "assets" / "sample.png"
    assert sample.stat().st_size < 300_000
    loaded = load_unchanged(sample)
    assert loaded.original_size == (512, 384) and loaded.alpha is None
