"""Hostile inputs and racing outputs: each input is refused at once with its own line, no output is lost.

Inputs that are not regular files (a FIFO would hang a plain open), broken images and broken latent files;
outputs that appear while we write, file modes under a umask, and temporaries left by dead writers.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from icd import files
from icd.errors import ICDError, InputError, OutputExistsError
from icd.files import atomic_write, open_regular, sweep_temporaries
from icd.images import load_image, probe_image, read_metadata
from icd.latents import FORMAT, LatentInfo, load_latent, read_latent_info, save_latent
from tests.fixtures.deadline import within

INFO = LatentInfo(model="tiny", model_fingerprint="0123456789abcdef", prompt="a cat on a mat", seed=30,
                  width=64, height=48, original_width=70, original_height=50, source="cat.png")
LATENT = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))


def refusal(call, path: Path, seconds: float = 10.0) -> str:
    """The InputError line `call(path)` gives; a call that hangs (a FIFO opened blocking) fails the test."""
    with pytest.raises(InputError) as error:
        within(seconds, lambda: call(path), path)
    return str(error.value)


def blank_png(path: Path, width: int, height: int) -> Path:
    """A real one-bit black PNG: a few kilobytes on disk whatever pixel count its header declares."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = bytes(1 + (width + 7) // 8) * height  # filter byte 0, then the packed row
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))
    return path


# --- images: what is not a regular file ---------------------------------------------------------------

IMAGE_READERS = [load_image, probe_image, read_metadata]


@pytest.mark.parametrize("reader", IMAGE_READERS)
def test_a_fifo_named_like_an_image_is_refused_at_once(tmp_path, reader):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    assert refusal(reader, fifo) == "x.png: not a regular file (a FIFO)"


@pytest.mark.parametrize("reader", IMAGE_READERS)
def test_a_directory_named_like_an_image_is_refused(tmp_path, reader):
    (tmp_path / "x.png").mkdir()
    assert refusal(reader, tmp_path / "x.png") == "x.png: not a regular file (a directory)"


def test_a_device_is_refused_without_being_read():
    zero = Path("/dev/zero")
    if not os.access(zero, os.R_OK):
        pytest.skip("no readable /dev/zero here")
    assert refusal(load_image, zero) == "zero: not a regular file (a device)"


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert refusal(load_image, path) == "s.png: not a regular file (a socket)"


def test_symlinks_are_followed_to_what_they_name(tmp_path):
    image = tmp_path / "real.png"
    Image.new("RGB", (6, 4), (9, 8, 7)).save(image)
    (tmp_path / "link.png").symlink_to(image)
    assert load_image(tmp_path / "link.png").rgb.getpixel((1, 1)) == (9, 8, 7)
    assert probe_image(tmp_path / "link.png") == (6, 4)

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-fifo.png").symlink_to(tmp_path / "pipe")
    assert refusal(load_image, tmp_path / "to-fifo.png") == "to-fifo.png: not a regular file (a FIFO)"
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert refusal(load_image, tmp_path / "dangling.png") == "dangling.png: no such file"


def test_open_regular_gives_a_blocking_reader(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc")
    with open_regular(path) as file:
        assert os.get_blocking(file.fileno()) and file.read() == b"abc"


# --- images: broken files -------------------------------------------------------------------------------

@pytest.mark.parametrize("reader", IMAGE_READERS)
def test_empty_and_text_files_named_png(tmp_path, reader):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("hello, not a picture\n")
    for name in ("empty.png", "notes.png"):
        assert refusal(reader, tmp_path / name) == f"{name}: not an image (cannot identify the format)"


def test_truncated_png_passes_the_probe_and_fails_the_load(tmp_path):
    """probe_image reads the header only: the decode is where cut pixel data shows."""
    path = tmp_path / "cut.png"
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    assert probe_image(path) == (64, 64)
    assert refusal(load_image, path) == "cut.png: truncated or corrupt image data"


def test_probe_matches_load_for_a_rotated_photo(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert probe_image(path) == load_image(path).original_size == (20, 40)


def test_the_pixel_limit_can_be_lifted_above_pillows_own(tmp_path, monkeypatch):
    """100 megapixels: over our default and over Pillow's bomb threshold, yet accepted when ICD_MAX_PIXELS says so."""
    path = blank_png(tmp_path / "huge.png", 10_000, 10_000)
    assert path.stat().st_size < 100_000 and 10_000 * 10_000 > Image.MAX_IMAGE_PIXELS
    threshold = Image.MAX_IMAGE_PIXELS
    monkeypatch.delenv("ICD_MAX_PIXELS", raising=False)
    assert refusal(probe_image, path) == (
        "huge.png: 10000x10000 pixels is over the 64-megapixel limit (set ICD_MAX_PIXELS to raise it)")
    assert read_metadata(path) == {}  # metadata needs no pixels, so no limit
    monkeypatch.setenv("ICD_MAX_PIXELS", "120000000")
    assert probe_image(path) == (10_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS == threshold


# --- latent files ------------------------------------------------------------------------------------------

def write_latent(path: Path, latent: torch.Tensor = LATENT, icd: object = None, **changes) -> Path:
    """A latent file as save_latent writes it, with `changes` to the record or `icd` as the raw record text."""
    fields = {**INFO.model_dump(), **changes}
    text = icd if icd is not None else json.dumps(fields)
    save_file({"latent": latent}, str(path), metadata={"format": FORMAT, "icd": text})
    return path


def latent_refusal(path: Path) -> str:
    """The line both readers give (the header pass finds everything the header can show)."""
    message = refusal(read_latent_info, path)
    assert refusal(load_latent, path) == message
    return message


def test_latent_round_trip_and_header_pass(tmp_path):
    path = tmp_path / "cat.latent.safetensors"
    save_latent(path, LATENT, INFO)
    assert read_latent_info(path) == INFO
    latent, info = load_latent(path)
    assert torch.equal(torch.from_numpy(latent), LATENT) and info == INFO
    assert write_latent(tmp_path / "newer.latent.safetensors", future_field=[1, 2]) and \
        read_latent_info(tmp_path / "newer.latent.safetensors") == INFO  # unknown fields: ignored


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_latent_of_another_float_type_loads_as_float32(tmp_path, dtype):
    """Other tools may store x_T in half or double precision: it loads exactly, widened to float32 (numpy has
    no bfloat16: its bits are read by hand)."""
    stored = LATENT.to(dtype)
    latent, info = load_latent(write_latent(tmp_path / "x.latent.safetensors", stored))
    assert latent.dtype == np.float32 and info == INFO
    assert torch.equal(torch.from_numpy(latent), stored.float())


def test_a_fifo_named_like_a_latent_is_refused_at_once(tmp_path):
    fifo = tmp_path / "x.latent.safetensors"
    os.mkfifo(fifo)
    assert latent_refusal(fifo) == "x.latent.safetensors: not a regular file (a FIFO)"


@pytest.mark.parametrize(("changes", "message"), [
    ({"width": 0}, "metadata field 'width': Input should be greater than 0"),
    ({"width": -1}, "metadata field 'width': Input should be greater than 0"),
    ({"width": "abc"}, "metadata field 'width': Input should be a valid integer"),
    ({"width": 64.0}, "metadata field 'width': Input should be a valid integer"),
    ({"width": 16384}, "metadata field 'width': Input should be less than or equal to 2048"),
    ({"height": 200000}, "metadata field 'height': Input should be less than or equal to 2048"),
    ({"original_width": 16384, "original_height": 16384},
     "original size: 16384x16384 pixels is over the 64-megapixel limit (set ICD_MAX_PIXELS to raise it)"),
    ({"prompt": 7}, "metadata field 'prompt': Input should be a valid string"),
    ({"prompt": None}, "metadata field 'prompt': Input should be a valid string"),
    ({"seed": -1}, "metadata field 'seed': Input should be greater than or equal to 0"),
    ({"seed": 2**64}, "metadata field 'seed': Input should be less than or equal to 18446744073709551615"),
    ({"seed": True}, "metadata field 'seed': Input should be a valid integer"),
])
def test_bad_metadata_fields(tmp_path, changes, message):
    path = write_latent(tmp_path / "x.latent.safetensors", **changes)
    assert latent_refusal(path) == f"x.latent.safetensors: {message}"


@pytest.mark.parametrize(("icd", "message"), [
    ("[1, 2]", "metadata 'icd' is not a JSON object"),
    ("{not json", "metadata 'icd' is not JSON"),
    (json.dumps({k: v for k, v in INFO.model_dump().items() if k != "source"}),
     "metadata field 'source': Field required"),
])
def test_bad_metadata_record(tmp_path, icd, message):
    path = write_latent(tmp_path / "x.latent.safetensors", icd=icd)
    assert latent_refusal(path) == f"x.latent.safetensors: {message}"


@pytest.mark.parametrize(("latent", "message"), [
    (torch.zeros(1, 3, 6, 8), "latent has 3 channels, expected 4"),
    (torch.zeros(4, 6, 8), "latent has shape (4, 6, 8), expected (1, C, h, w)"),
    (torch.zeros(2, 4, 6, 8), "latent has shape (2, 4, 6, 8), expected (1, C, h, w)"),
    (torch.zeros(1, 4, 8, 8), "latent is 8x8, expected 8x6 for its 64x48 working size"),
    (torch.zeros(1, 4, 6, 8, dtype=torch.int64), "latent has dtype I64, expected floats (F32)"),
])
def test_latent_tensor_that_does_not_fit_its_record(tmp_path, latent, message):
    path = write_latent(tmp_path / "x.latent.safetensors", latent)
    assert latent_refusal(path) == f"x.latent.safetensors: {message}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_the_latent_is_found_when_loading(tmp_path, bad):
    latent = LATENT.clone()
    latent[0, 2, 3, 4] = bad
    path = write_latent(tmp_path / "x.latent.safetensors", latent)
    assert read_latent_info(path) == INFO  # the header is sound
    assert refusal(load_latent, path) == "x.latent.safetensors: the latent holds NaN or inf values"


def test_latent_files_cut_short_or_padded(tmp_path):
    whole = write_latent(tmp_path / "whole.latent.safetensors").read_bytes()
    header_length = int.from_bytes(whole[:8], "little")
    cases = {
        "empty": (b"", "empty file, not an icd latent"),
        "tiny": (whole[:5], "too short for a safetensors file (5 bytes)"),
        "header": (whole[:100], f"truncated (the file ends inside its {header_length}-byte header)"),
        "data": (whole[:-10], f"truncated ({len(whole) - 10} bytes; its header needs {len(whole)})"),
        "padded": (whole + b"\0" * 7, "7 bytes of unexpected data after the latent"),
    }
    for stem, (data, message) in cases.items():
        path = tmp_path / f"{stem}.latent.safetensors"
        path.write_bytes(data)
        assert latent_refusal(path) == f"{path.name}: {message}"


def test_latent_headers_that_are_not_what_they_claim(tmp_path):
    def with_header(name: str, header: bytes, declared: int | None = None) -> Path:
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header)
        return path

    huge = with_header("huge.latent.safetensors", b"{}", declared=2**40)
    assert latent_refusal(huge) == ("huge.latent.safetensors: not an icd latent (its header claims "
                                    "1099511627776 bytes; a latent's is under 1048576)")
    assert latent_refusal(with_header("bin.latent.safetensors", b"\xff\xfe{")) == (
        "bin.latent.safetensors: not a safetensors file (its header is not JSON)")
    assert latent_refusal(with_header("list.latent.safetensors", b"[]")) == (
        "list.latent.safetensors: not a safetensors file (its header is not a JSON object)")
    weights = tmp_path / "weights.latent.safetensors"
    save_file({"weight": torch.zeros(2)}, str(weights))
    assert latent_refusal(weights) == (
        "weights.latent.safetensors: a safetensors file, but not an icd latent (make one with `icd invert`)")
    extra = tmp_path / "extra.latent.safetensors"
    save_file({"latent": LATENT, "mask": torch.zeros(2)}, str(extra),
              metadata={"format": FORMAT, "icd": INFO.model_dump_json()})
    assert latent_refusal(extra) == (
        "extra.latent.safetensors: holds tensors other than 'latent' (mask), not an icd latent")
    no_record = tmp_path / "bare.latent.safetensors"
    save_file({"latent": LATENT}, str(no_record), metadata={"format": FORMAT})
    assert latent_refusal(no_record) == "bare.latent.safetensors: metadata 'icd' is missing"


def test_tensor_entry_that_lies_about_its_data(tmp_path):
    path = write_latent(tmp_path / "x.latent.safetensors")
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    start, end = header["latent"]["data_offsets"]
    for offsets, message in [(["0", end], "tensor 'latent' field 'data_offsets.0': Input should be a valid integer"),
                             ([start + 4, end], "tensor 'latent' has 764 bytes of data, not what its shape needs")]:
        header["latent"]["data_offsets"] = offsets
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + header_length:])
        assert latent_refusal(path) == f"x.latent.safetensors: {message}"


# --- outputs: claiming the name, modes, leftovers ----------------------------------------------------------

def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "out.png"
    seen = []

    def write_while_someone_else_does(temporary: Path):
        seen.append(temporary.name)
        temporary.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # appears after the initial check

    with pytest.raises(OutputExistsError, match=r"^out.png exists \(use --overwrite to replace it\)$"):
        atomic_write(target, write_while_someone_else_does)
    assert target.read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [target]
    assert re.fullmatch(rf"\.out\.png\.{os.getpid()}-[0-9a-f]+\.tmp", seen[0])


def test_a_folder_that_appears_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "base"

    def write_while_someone_else_does(temporary: Path):
        (temporary / "sub").mkdir(parents=True)
        (temporary / "sub" / "ours").write_text("ours")
        target.mkdir()
        (target / "theirs").write_text("theirs")

    with pytest.raises(OutputExistsError, match=r"^base exists"):
        atomic_write(target, write_while_someone_else_does)
    assert [p.name for p in target.iterdir()] == ["theirs"] and list(tmp_path.iterdir()) == [target]


def test_without_hard_links_the_name_is_still_claimed(tmp_path, monkeypatch):
    """FAT and some network file systems refuse os.link: an exclusive create claims the name instead."""
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.txt"
    atomic_write(target, lambda temporary: temporary.write_text("first"))
    assert target.read_text() == "first" and list(tmp_path.iterdir()) == [target]

    contested = tmp_path / "contested.txt"

    def racing(temporary: Path):
        temporary.write_text("ours")
        contested.write_text("theirs")

    with pytest.raises(OutputExistsError):
        atomic_write(contested, racing)
    assert contested.read_text() == "theirs" and sorted(tmp_path.iterdir()) == [contested, target]


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, umask, file_mode, folder_mode):
    def folder_with_private_file(temporary: Path):
        temporary.mkdir(mode=0o700)
        (temporary / "weights.safetensors").write_bytes(b"w")
        os.chmod(temporary / "weights.safetensors", 0o600)

    old = os.umask(umask)
    try:
        save_latent(tmp_path / "x.latent.safetensors", LATENT, INFO)  # safetensors alone makes 0600 files
        Image.new("RGB", (2, 2)).save(tmp_path / "unused.png")  # what a plain creation gives, for comparison
        atomic_write(tmp_path / "base", folder_with_private_file)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "unused.png").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "x.latent.safetensors").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "base").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "base" / "weights.safetensors").stat().st_mode) == file_mode


def test_sweep_removes_only_dead_writers_temporaries(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid  # exited and reaped (should the pid be reused meanwhile, the test fails, not the user)
    live = os.getpid()
    (tmp_path / f".out.png.{dead}-00ff.tmp").write_bytes(b"half")
    (tmp_path / f".base.{dead}-1234abcd.tmp").mkdir()
    (tmp_path / f".base.{dead}-1234abcd.tmp" / "unet").write_bytes(b"half")
    kept = [f".out.png.{live}-00ff.tmp", ".out.png.abc-00ff.tmp", ".out.png.00ff.tmp", "out.png",
            f"out.png.{dead}-00ff.tmp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep")
    assert sweep_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert sweep_temporaries(tmp_path / "absent") == 0


def test_write_errors_stay_one_line_and_leave_nothing(tmp_path):
    with pytest.raises(ICDError, match=r"^out.bin: cannot write \(No such file or directory: "):
        atomic_write(tmp_path / "out.bin", lambda temporary: None)  # a writer that wrote nothing
    assert list(tmp_path.iterdir()) == []
    assert files.sweep_temporaries(tmp_path) == 0


def test_a_failed_move_gives_the_claimed_name_back(tmp_path, monkeypatch):
    def no_move(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", no_move)
    with pytest.raises(ICDError, match=r"^base: cannot write \(\[Errno 5\] Input/output error\)$"):
        atomic_write(tmp_path / "base", lambda temporary: (temporary / "sub").mkdir(parents=True))
    assert list(tmp_path.iterdir()) == []
