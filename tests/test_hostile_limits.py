"""The command line at the edges: sizes past the one limit, names at the file system's limits and names that are
not UTF-8, a reader that closes the pipe, a full disk and exhausted memory, model files that are empty or of
rank 0, inputs named twice or looping, job files and training configurations that lie. Every case asserts the
exit code, the one line on stderr (never "unexpected", never a traceback) and the files before and after."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from icd.app import jobs
from icd.app.cli import common
from icd.files import atomic_write
from icd.images import read_metadata
from icd.latents import FORMAT, read_latent_info
from icd.limits import MAX_SIDE
from tests.fixtures.cli import icd
from tests.test_hostile_cli import TINY, files, one_error_line, photo

EDIT = ("--src", "a red cat", "--tgt", "a blue cat", "--method", "none", *TINY)


def error_lines(result) -> list[str]:
    """The error lines a command printed on stderr (its info lines aside); never a traceback or "unexpected"."""
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if not line.startswith("icd: info: ")]


def tiny_model_with(icd_home: Path, folder: Path, **fields) -> Path:
    """A model folder whose icd.json is the tiny model's (paths made absolute) with `fields` changed."""
    tiny = icd_home / "models" / "tiny"
    data = json.loads((tiny / "icd.json").read_text())
    data.update({key: str(tiny / data[key]) for key in ("base", "teacher", "forward_lora", "reverse_lora")})
    folder.mkdir(parents=True)
    (folder / "icd.json").write_text(json.dumps({**data, **fields}))
    return folder


def process(*args, cwd: Path, home: Path, **options) -> subprocess.CompletedProcess:
    """`icd ARGS` in a process of its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ICD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "icd", *map(str, args)], cwd=cwd, env=env, text=True, timeout=300,
                          stderr=subprocess.PIPE, **options)


# ---------------------------------------------------------------------------------------------------
# One size limit, checked before any work.

def huge_latent(path: Path, side: int) -> Path:
    """A latent file consistent in every field with a working size of side x side (its data sparse on disk)."""
    info = {"model": "tiny", "model_fingerprint": "0123456789abcdef", "prompt": "a cat", "seed": 0, "width": side,
            "height": side, "original_width": side, "original_height": side, "source": "cat.png"}
    data_bytes = 4 * 4 * (side // 8) ** 2
    header = json.dumps({"__metadata__": {"format": FORMAT, "icd": json.dumps(info)},
                         "latent": {"dtype": "F32", "shape": [1, 4, side // 8, side // 8],
                                    "data_offsets": [0, data_bytes]}}).encode()
    with open(path, "wb") as file:
        file.write(len(header).to_bytes(8, "little") + header)
        file.truncate(8 + len(header) + data_bytes)
    return path


def test_a_latent_claiming_a_huge_size_is_refused_before_the_model_loads(icd_home, tmp_path, no_model_load):
    huge_latent(tmp_path / "big.latent.safetensors", 16384)
    before = files(tmp_path)
    result = icd("reconstruct", "big.latent.safetensors", *TINY, cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert one_error_line(result) == ("icd: error: big.latent.safetensors: metadata field 'width': Input should be "
                                      f"less than or equal to {MAX_SIDE}")
    assert files(tmp_path) == before


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(common, "open_model", lambda *a, **k: pytest.fail("the model was opened"))


@pytest.mark.parametrize("fields, problem", [
    ({"resolution": 4096}, f"field 'resolution': Input should be less than or equal to {MAX_SIDE} (got 4096)"),
    ({"resolution": 200000}, f"field 'resolution': Input should be less than or equal to {MAX_SIDE} (got 200000)"),
    ({"base": "https://example.com/sd15"}, "field 'base': 'https://example.com/sd15' is a URL, which base cannot "
                                           "be: name a Hugging Face hub id (owner/name) or a local diffusers folder"),
])
def test_a_manifest_past_the_limits_is_one_line(icd_home, tmp_path, fields, problem):
    model = tiny_model_with(icd_home, tmp_path / "model", **fields)
    before = files(tmp_path)
    result = icd("generate", "a cat", "-m", "./model", "--device", "cpu", cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert one_error_line(result) == f"icd: error: {model.name}/icd.json: {problem}"
    assert files(tmp_path) == before


def test_a_photo_whose_working_size_would_pass_the_limit_fails_alone(icd_home, tmp_path):
    photo(tmp_path / "a.png")
    Image.new("RGB", (16384, 4), (9, 9, 9)).save(tmp_path / "strip.png")
    result = icd("edit", "a.png", "strip.png", *EDIT, "-q", cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == ["icd: error: strip.png: its working size would be 8192x32, over the 2048-pixel limit of a "
                      "side (the photo is 16384x4): give --width and --height", "icd: error: 1 of 2 items failed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-edit.png", "a.png", "strip.png"]


# ---------------------------------------------------------------------------------------------------
# Names: as long as the file system allows, and bytes that are not UTF-8.

def test_a_name_of_the_longest_legal_length_is_written(icd_home, tmp_path):
    long_input = "p" * 236 + ".png"  # 240 bytes: its output, pppp-edit.png, has 245
    photo(tmp_path / long_input)
    long_output = "é" * 125 + "o.png"  # 255 bytes in UTF-8, the limit
    result = icd("edit", long_input, *EDIT, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    result = icd("edit", long_input, *EDIT, "-o", long_output, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long_input, "p" * 236 + "-edit.png", long_output])


def test_temporary_names_fit_the_limit_and_cut_no_character_in_two(tmp_path):
    target = tmp_path / ("é" * 127 + "x")  # 255 bytes
    seen = []
    atomic_write(target, lambda temporary: (seen.append(temporary.name), temporary.write_bytes(b"data")))
    (name,) = seen
    assert len(os.fsencode(name)) <= 255 and name.encode("utf-8") and name.startswith(".éé")
    assert target.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_name_that_is_not_utf8_is_edited_inverted_and_reconstructed(icd_home, tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # as Python gives a Latin-1 name: surrogate escapes
    photo(tmp_path / name)
    edited = icd("edit", name, *EDIT, cwd=tmp_path)
    assert edited.exit_code == 0, edited.output
    assert edited.stdout_bytes == b"caf\xe9-edit.png\n"  # printed as the bytes it is, as ls does
    assert read_metadata(tmp_path / os.fsdecode(b"caf\xe9-edit.png"))["source"] == name
    inverted = icd("invert", name, "--prompt", "a red cat", *TINY, cwd=tmp_path)
    assert inverted.exit_code == 0, inverted.output
    latent = tmp_path / os.fsdecode(b"caf\xe9.latent.safetensors")
    assert read_latent_info(latent).source == name
    rebuilt = icd("reconstruct", latent.name, *TINY, cwd=tmp_path)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert sorted(os.fsencode(p.name) for p in tmp_path.iterdir()) == [
        b"caf\xe9-edit.png", b"caf\xe9-recon.png", b"caf\xe9.latent.safetensors", b"caf\xe9.png"]
    assert "Traceback" not in edited.stderr + inverted.stderr + rebuilt.stderr


# ---------------------------------------------------------------------------------------------------
# Inputs named twice, or looping.

def test_a_symlink_loop_fails_alone_and_a_file_named_twice_runs_once(icd_home, tmp_path):
    photo(tmp_path / "a.png")
    (tmp_path / "loop.png").symlink_to("loop2.png")
    (tmp_path / "loop2.png").symlink_to("loop.png")
    before = {p.name for p in tmp_path.iterdir()}
    result = icd("edit", "loop.png", "a.png", "./a.png", tmp_path / "a.png", *EDIT, "-o", "out", cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert error_lines(result) == ["icd: error: loop.png: cannot open (Too many levels of symbolic links)",
                                   "icd: error: 1 of 2 items failed"]
    assert result.stdout.splitlines() == [str(Path("out") / "a-edit.png")]
    assert {p.name for p in tmp_path.iterdir()} == before | {"out"}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a-edit.png"]


# ---------------------------------------------------------------------------------------------------
# A closed pipe, exhausted memory, a full disk.

def test_a_reader_that_closes_the_pipe_ends_nothing_and_prints_no_traceback(icd_home, tmp_path):
    photo(tmp_path / "a.png")
    photo(tmp_path / "b.png")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -0`: every write to stdout fails with EPIPE
    try:
        batch = process("edit", "a.png", "b.png", *EDIT, cwd=tmp_path, home=icd_home, stdout=write_end)
        info = process("info", cwd=tmp_path, home=icd_home, stdout=write_end)
    finally:
        os.close(write_end)
    assert batch.returncode == 0, batch.stderr
    assert [line for line in batch.stderr.splitlines() if "error" in line or "Traceback" in line] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-edit.png", "a.png", "b-edit.png", "b.png"]
    assert info.returncode == 141 and info.stderr == ""  # 128 + SIGPIPE, as git or cat give


def cpu_allocation_failure() -> RuntimeError:
    """The error torch's CPU allocator raises when the memory is not there (asked here for 2**60 bytes)."""
    try:
        torch.empty(1 << 60, dtype=torch.uint8)
    except RuntimeError as err:
        return err
    pytest.skip("this machine allocated 2**60 bytes")


def test_running_out_of_memory_is_said_so_and_the_batch_goes_on(icd_home, tmp_path, monkeypatch):
    real, failure = jobs.edit_file, cpu_allocation_failure()
    assert "can't allocate memory" in str(failure)
    errors = {"b.png": failure, "c.png": MemoryError()}

    def short_of_memory(settings, path, plan, output, mask_output=None):
        if path.name in errors:
            raise errors[path.name]
        return real(settings, path, plan, output, mask_output)

    monkeypatch.setattr(jobs, "edit_file", short_of_memory)
    for name in ("a", "b", "c"):
        photo(tmp_path / f"{name}.png")
    result = icd("edit", "a.png", "b.png", "c.png", *EDIT, cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [
        f"icd: error: {name}: out of memory: try a smaller --width/--height, or free memory for icd"
        for name in ("b.png", "c.png")] + ["icd: error: 2 of 3 items failed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-edit.png", "a.png", "b.png", "c.png"]


def test_running_out_of_memory_while_loading_the_model_is_one_line(icd_home, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(common, "open_model", no_memory)
    photo(tmp_path / "a.png")
    result = icd("edit", "a.png", *EDIT, cwd=tmp_path)
    assert result.exit_code == 1
    assert one_error_line(result) == "icd: error: out of memory: try a smaller --width/--height, or free memory for icd"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def limit_file_size(limit: int):
    """For a child process: writes past `limit` bytes fail with EFBIG, as a full disk fails them with ENOSPC."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_disk_that_fills_during_an_export_leaves_no_temporary_file(icd_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(icd_home / "models" / "tiny", home / "models" / "tiny")
    before = files(home)
    result = process("export", "-m", "tiny", "--no-onnx", cwd=tmp_path, home=home, stdout=subprocess.PIPE,
                     preexec_fn=limit_file_size(64 << 10))
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == f"icd: error: cannot write to the icd cache ICD_HOME={home}: File too large"
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    (folder,) = (home / "artifacts").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing half-written, no temporary
    assert {k: v for k, v in files(home).items() if not k.startswith(("artifacts", "checked"))} == before


# ---------------------------------------------------------------------------------------------------
# Model files that are empty, or LoRAs of rank 0.

def rank_zero(lora: Path, target: Path) -> Path:
    tensors = {key: torch.zeros(0, *value.shape[1:]) if "lora_A" in key else
               torch.zeros(value.shape[0], 0, *value.shape[2:]) for key, value in load_file(str(lora)).items()}
    save_file(tensors, str(target))
    return target


@pytest.mark.parametrize("part", ["teacher", "forward_lora"])
def test_an_empty_teacher_or_a_rank_zero_lora_is_one_line(icd_home, tmp_path, part):
    if part == "teacher":
        (tmp_path / "teacher.pt").write_bytes(b"")
        weights = tmp_path / "teacher.pt"
    else:
        weights = rank_zero(icd_home / "models" / "tiny" / "tiny-forward.safetensors", tmp_path / "lora.safetensors")
    model = tiny_model_with(icd_home, tmp_path / "model", **{part: str(weights)})
    photo(tmp_path / "a.png")
    before = files(tmp_path)
    result = icd("invert", "a.png", "--prompt", "a cat", "-m", model, "--device", "cpu", "-q", cwd=tmp_path)
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert "unexpected" not in line
    if part == "teacher":
        assert line == f"icd: error: {weights}: an empty file (0 bytes), not a teacher state dict"
    else:
        assert re.fullmatch(rf"icd: error: {re.escape(str(weights))}: LoRA for '[\w.]+' has rank 0 \(A is \(0, \d+"
                            r"(, \d+, \d+)?\)\): it holds no update, so the file is not a trained LoRA", line), line
    assert files(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# Job files: what a row says is what runs, or the file is refused whole before the model loads.

DEEP = "[" * 100_000 + "]" * 100_000
JOB_FILES = {
    "a repeated CSV column": ("jobs.csv", "image,target,target\na.png,a dog,a cat\n",
                              "jobs.csv: the column 'target' appears twice in the header: give each column once"),
    "a repeated JSON key": ("jobs.jsonl", '{"image": "a.png", "target": "a dog", "target": "a cat"}\n',
                            "jobs.jsonl row 1: the key 'target' appears twice: give each key once"),
    "a prompt that is a list": ("jobs.jsonl", '{"image": "a.png", "target": ["a dog"]}\n',
                                "jobs.jsonl row 1: target: Input should be a valid string"),
    "a seed that is true": ("jobs.jsonl", '{"image": "a.png", "target": "a dog", "seed": true}\n',
                            "jobs.jsonl row 1: seed: Input should be a valid integer"),
    "deep JSON": ("jobs.jsonl", '{"image": "a.png", "target": "a dog"}\n{"image": ' + DEEP + "}\n",
                  "jobs.jsonl row 2: not a job (its JSON is nested too deeply)"),
    "a NUL in a JSON path": ("jobs.jsonl", '{"image": "a\\u0000.png", "target": "a dog"}\n',
                             "jobs.jsonl row 1: image: a path cannot hold a NUL character"),
    "a NUL in a CSV path": ("jobs.csv", 'image,target\n"a.png",a dog\nb\0.png,a cat\n',
                            "jobs.csv row 2: image: a path cannot hold a NUL character"),
}


@pytest.mark.parametrize("case", JOB_FILES, ids=list(JOB_FILES))
def test_a_job_file_that_lies_is_refused_in_one_line(icd_home, tmp_path, no_model_load, case):
    name, text, message = JOB_FILES[case]
    photo(tmp_path / "a.png")
    (tmp_path / name).write_text(text)
    before = files(tmp_path)
    result = icd("edit", "--jobs", name, *TINY, "-o", "out", cwd=tmp_path)
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == f"icd: error: {message}"
    assert files(tmp_path) == before


def test_a_quoted_line_break_in_a_csv_prompt_is_kept(icd_home, tmp_path):
    photo(tmp_path / "a.png")
    (tmp_path / "jobs.csv").write_text('image,source,target,method,output\r\na.png,"a red\ncat","a blue\r\ncat",none,'
                                       'b.png\r\n')
    result = icd("edit", "--jobs", "jobs.csv", *TINY, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    recorded = read_metadata(tmp_path / "b.png")
    assert (recorded["source_prompt"], recorded["prompt"]) == ("a red\ncat", "a blue\r\ncat")


# ---------------------------------------------------------------------------------------------------
# Training configurations: checked whole before anything is written.

@pytest.mark.parametrize("settings, message", [
    ("[train]\nlr = nan\nmax_steps = 0\n", "train.lr: must be a finite number, not nan"),
    ("[train]\nmax_steps = 0\n", "train.max_steps: must be at least 1"),
    ("[icd]\nddim_steps = 0\n", "icd.ddim_steps: must divide 1000 (50 gives the grid 19, 39, ..., 999)"),
    ("[icd]\nguidance_scales = " + DEEP + "\n", "run.toml: not a configuration (nested too deeply)"),
])
def test_a_training_configuration_that_cannot_train_writes_nothing(icd_home, tmp_path, settings, message):
    (tmp_path / "run.toml").write_text(f'[model]\npath = "tiny"\n[data]\npath = "photos"\n{settings}')
    before = files(tmp_path)
    result = icd("train", "icd", "--config", "run.toml", "-o", "out", cwd=tmp_path)
    assert result.exit_code == 2, result.output
    assert one_error_line(result).startswith(f"icd: error: {message} (see `")  # ... train icd -h`
    assert files(tmp_path) == before and not (tmp_path / "out").exists()


def test_settings_that_do_not_fit_the_model_write_nothing(icd_home, tmp_path):
    for name in ("a", "b"):
        photo(tmp_path / "photos" / f"{name}.png")
    (tmp_path / "photos" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{name}.png", "text": "a cat"}) + "\n" for name in ("a", "b")))
    before = files(tmp_path)
    result = icd("train", "icd", "--set", f"model.path={icd_home / 'models' / 'tiny'}", "--set", "data.path=photos",
                 "--set", "lora.targets=no_such_layer", "--set", "train.max_steps=1", "-o", "out", cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert error_lines(result)[-1] == "icd: error: lora.targets: Target modules {'no_such_layer'} not found in the " \
                                      "base model. Please check the target modules and try again."
    assert files(tmp_path) == before and not (tmp_path / "out").exists()
