"""The command line against a hostile or careless user: bad options, bad items in a batch, outputs that
would be lost, interruptions, two runs on one folder. Every case asserts the exit code, the one line on
stderr and the files on disk before and after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from icd.app.cli import common
from icd.images import read_metadata
from tests.fixtures.cli import icd

TINY = ("-m", "tiny", "--device", "cpu")


def photo(path: Path, size=(64, 48), colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 8):
        for y in range(size[1]):
            image.putpixel((x, y), (20, 20, 220))
    image.save(path)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result) -> str:
    """The single line the command printed on stderr (no traceback, nothing else)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command opens a model: usage errors must be found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was opened")

    monkeypatch.setattr(common, "open_model", refuse)


# ---------------------------------------------------------------------------------------------------
# Options: usage errors exit 2 with one line, before any model loads.

USAGE_CASES = {
    "missing --src": (("edit", "{photo}", "--tgt", "a dog", *TINY), "no --src, and no caption for"),
    "missing --tgt": (("edit", "{photo}", "--src", "a cat", *TINY), "--tgt is required"),
    "width not a multiple": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--width", "100", *TINY),
                             "--width 100 is not a positive multiple of"),
    "width far too large": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--width", "16384", *TINY),
                            "16384 is not in the range 8<=x<=2048"),
    "tau nan": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--tau", "nan", *TINY), "nan is not a finite number"),
    "guidance inf": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--guidance", "inf", *TINY),
                     "inf is not a finite number"),
    "cross-replace nan": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--cross-replace", "nan", *TINY),
                          "nan is not a finite number"),
    "amplify nan": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--amplify", "b=nan", *TINY),
                    "is not WORD=FACTOR with a finite factor"),
    "gif output": (("edit", "{photo}", "--src", "a", "--tgt", "b", "-o", "out.gif", *TINY),
                   "-o out.gif: unknown image format '.gif'"),
    "image output for a latent": (("invert", "{photo}", "--prompt", "a", "-o", "x.png", *TINY),
                                  "-o x.png: invert writes latent files"),
    "latent output for an image": (("edit", "{photo}", "--src", "a", "--tgt", "b", "-o", "x.latent.safetensors",
                                    *TINY), "this command writes images"),
    "empty folder to invert": (("invert", "{empty}", "--prompt", "a", *TINY), "no input files in"),
    "empty folder to reconstruct": (("reconstruct", "{empty}"), "no input files in"),
    "blend with swap": (("edit", "{photo}", "--src", "a cat", "--tgt", "a dog", "--method", "swap", "--blend",
                         "cat:dog", *TINY), "--blend apply to --method p2p, not swap"),
    "p2p options with none": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--method", "none", "--amplify",
                               "b=2", "--cross-replace", "0.5", *TINY),
                              "--cross-replace, --amplify apply to --method p2p, not none"),
    "p2p option with an sdxl model's swap default": (("edit", "{photo}", "--src", "a", "--tgt", "b",
                                                      "--self-replace", "0.5", "-m", "tiny-sdxl"),
                                                     "--self-replace apply to --method p2p, not swap"),
    "quiet and verbose": (("edit", "{photo}", "--src", "a", "--tgt", "b", "-q", "-v", *TINY),
                          "-q and -v cannot be used together"),
    "seed past 2**64": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--seed", str(2**64), *TINY),
                        "is not in the range 0<=x<=18446744073709551615"),
    "seeds running past 2**64": (("generate", "a cat", "-n", "3", "--seed", str(2**64 - 2), *TINY),
                                 "runs past the largest seed"),
    "compile with onnx": (("edit", "{photo}", "--src", "a", "--tgt", "b", "--compile", "--backend", "onnx", *TINY),
                          "--compile applies to the torch backend"),
    "size for latent inputs": (("edit", "{latent}", "--tgt", "b", "--width", "64", *TINY),
                               "--width/--height apply to images"),
    "unknown model": (("edit", "{photo}", "--src", "a", "--tgt", "b", "-m", "no-such-model"),
                      "unknown model 'no-such-model'"),
}


@pytest.mark.parametrize("case", USAGE_CASES, ids=list(USAGE_CASES))
def test_usage_errors_exit_2_before_the_model_loads(icd_home, tmp_path, no_model_load, case):
    args, message = USAGE_CASES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    values = {"photo": photo(tmp_path / "a.png"), "empty": tmp_path / "empty",
              "latent": tmp_path / "a.latent.safetensors"}
    (tmp_path / "a.latent.safetensors").write_bytes(b"")
    before = files(tmp_path)
    result = icd(*[str(a).format(**values) for a in args], cwd=tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert files(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# Batches: a bad item is its own line; everything else still runs.

@pytest.fixture(scope="module")
def latent(icd_home, tmp_path_factory):
    """A good latent file of the tiny model, inverted once for the module."""
    folder = tmp_path_factory.mktemp("latent")
    photo(folder / "cat.png")
    result = icd("invert", folder / "cat.png", "--prompt", "a red cat", *TINY, cwd=folder)
    assert result.exit_code == 0, result.output
    return folder / "cat.latent.safetensors"


def hostile_latent(good: Path, target: Path, *, tensor=None, **fields) -> Path:
    """A copy of a good latent file with its tensor or metadata fields replaced."""
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    info = {**json.loads(metadata["icd"]), **fields}
    latent = load_file(str(good))["latent"] if tensor is None else tensor
    save_file({"latent": latent}, str(target), metadata={**metadata, "icd": json.dumps(info)})
    return target


def test_bad_latents_in_a_folder_do_not_stop_the_batch(icd_home, latent, tmp_path):
    import torch

    batch = tmp_path / "batch"
    batch.mkdir()
    good = load_file(str(latent))["latent"]
    hostile_latent(latent, batch / "a-good.latent.safetensors")
    hostile_latent(latent, batch / "b-channels.latent.safetensors", tensor=good[:, :3].contiguous())
    (batch / "c-empty.latent.safetensors").write_bytes(b"")
    hostile_latent(latent, batch / "d-width.latent.safetensors", width=-1)
    hostile_latent(latent, batch / "e-prompt.latent.safetensors", prompt=7)
    hostile_latent(latent, batch / "f-nan.latent.safetensors", tensor=torch.full_like(good, float("nan")))
    hostile_latent(latent, batch / "g-good.latent.safetensors")
    before = files(batch)
    out = tmp_path / "out"
    result = icd("edit", batch, "--tgt", "a blue cat", "--method", "none", *TINY, "-o", out, cwd=tmp_path)
    assert result.exit_code == 1
    assert files(batch) == before
    assert sorted(p.name for p in out.iterdir()) == ["a-good-edit.png", "g-good-edit.png"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("icd: error: ")]
    assert len(errors) == 6 and "Traceback" not in result.stderr
    for name in ("b-channels", "c-empty", "d-width", "e-prompt", "f-nan"):
        assert sum(f"{name}.latent.safetensors" in line for line in errors) == 1, (name, errors)
    assert errors[-1] == "icd: error: 5 of 7 items failed"
    assert any("NaN or inf" in line for line in errors)


def test_an_unexpected_error_in_one_item_is_one_line_and_the_batch_goes_on(icd_home, tmp_path, monkeypatch):
    from icd.app import jobs

    real = jobs.edit_file

    def flaky(settings, path, plan, output, mask_output=None):
        if path.name == "b.png":
            raise RuntimeError("boom inside the model")
        return real(settings, path, plan, output, mask_output)

    monkeypatch.setattr(jobs, "edit_file", flaky)
    for name in ("a", "b", "c"):
        photo(tmp_path / "in" / f"{name}.png")
    args = ("edit", tmp_path / "in", "--src", "a cat", "--tgt", "a dog", "--method", "none", *TINY)
    result = icd(*args, "-o", tmp_path / "out", cwd=tmp_path)
    assert result.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-edit.png", "c-edit.png"]
    assert f"icd: error: {tmp_path / 'in' / 'b.png'}: unexpected RuntimeError: boom inside the model (run with -v " \
           "or ICD_DEBUG=1 for the traceback)" in result.stderr
    assert "Traceback" not in result.stderr
    verbose = icd(*args, "-o", tmp_path / "out2", "-v", cwd=tmp_path)
    assert "Traceback" in verbose.stderr and "boom inside the model" in verbose.stderr


# ---------------------------------------------------------------------------------------------------
# Never lose data.

def test_same_named_inputs_get_distinct_outputs(icd_home, tmp_path):
    a, b = photo(tmp_path / "a" / "x.png"), photo(tmp_path / "b" / "x.png", colour=(30, 200, 30))
    result = icd("edit", a, b, "--src", "a cat", "--tgt", "a dog", "--method", "none", *TINY, "-o", "out",
                 "--overwrite", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-x-edit.png", "b-x-edit.png"]
    assert read_metadata(tmp_path / "out" / "a-x-edit.png")["source"] == "../a/x.png"  # from the result's folder
    assert read_metadata(tmp_path / "out" / "b-x-edit.png")["source"] == "../b/x.png"


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(icd_home, tmp_path):
    source = photo(tmp_path / "a.png")
    before = files(tmp_path)
    result = icd("edit", source, "--src", "a cat", "--tgt", "a dog", *TINY, "-o", source, "--overwrite",
                 cwd=tmp_path)
    assert result.exit_code == 1
    assert one_error_line(result) == f"icd: error: {source}: the output {source} is one of the inputs: " \
                                     "choose another -o"
    assert files(tmp_path) == before


def test_a_finished_batch_is_not_recomputed(icd_home, tmp_path, monkeypatch):
    for name in ("a", "b"):
        photo(tmp_path / "in" / f"{name}.png")
    args = ("edit", tmp_path / "in", "--src", "a cat", "--tgt", "a dog", "--method", "none", *TINY, "-o", "out")
    assert icd(*args, cwd=tmp_path).exit_code == 0
    done = files(tmp_path / "out")
    monkeypatch.setattr(common, "open_model", lambda *a, **k: pytest.fail("the model was opened"))
    rerun = icd(*args, cwd=tmp_path)
    assert rerun.exit_code == 1
    assert rerun.stderr.count("exists (use --overwrite to replace it, or --skip-existing to leave it)") == 2
    resumed = icd(*args, "--skip-existing", "--json", cwd=tmp_path)
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(line)["status"] for line in resumed.stdout.splitlines()] == ["skipped", "skipped"]
    assert files(tmp_path / "out") == done


def test_skip_existing_runs_only_what_is_missing(icd_home, tmp_path):
    for name in ("a", "b"):
        photo(tmp_path / "in" / f"{name}.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a-edit.png").write_bytes(b"kept as it is")
    result = icd("edit", tmp_path / "in", "--src", "a cat", "--tgt", "a dog", "--method", "none", *TINY,
                 "-o", "out", "--skip-existing", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a-edit.png").read_bytes() == b"kept as it is"
    assert read_metadata(tmp_path / "out" / "b-edit.png")["prompt"] == "a dog"


def test_temporary_files_of_a_dead_run_are_swept(icd_home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".a-edit.png.{dead.stdout.strip()}-0badf00d.tmp"
    stale.write_bytes(b"half")
    mine = out / f".other.png.{os.getpid()}-0badf00d.tmp"  # a live writer's: left alone
    mine.write_bytes(b"in progress")
    result = icd("edit", photo(tmp_path / "a.png"), "--src", "a cat", "--tgt", "a dog", "--method", "none", *TINY,
                 "-o", "out", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and mine.exists()
    assert sorted(p.name for p in out.iterdir()) == [mine.name, "a-edit.png"]


def _icd_process(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ICD_HOME": os.environ["ICD_HOME"], "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "icd", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_runs_into_one_folder_never_replace_each_others_results(icd_home, tmp_path):
    for i in range(6):
        photo(tmp_path / "in" / f"p{i}.png", colour=(40 * i, 90, 200))
    args = ("edit", tmp_path / "in", "--src", "a cat", "--method", "none", *TINY, "-o", "out", "--json")
    runs = [_icd_process(*args, "--tgt", tgt, cwd=tmp_path) for tgt in ("a dog", "a fox")]
    outputs = [run.communicate(timeout=240) for run in runs]
    written = []
    for stdout, _ in outputs:
        records = [json.loads(line) for line in stdout.splitlines()]
        written.append({r["output"] for r in records if r["status"] == "ok"})
    assert not written[0] & written[1]  # no file was reported written by both
    assert len(written[0] | written[1]) == 6
    for tgt, outs in zip(("a dog", "a fox"), written):
        for output in outs:  # each file holds the result of the run that reported it
            assert read_metadata(tmp_path / output)["prompt"] == tgt
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_sigterm_mid_batch_leaves_no_temporary_file(icd_home, tmp_path):
    for i in range(12):
        photo(tmp_path / "in" / f"p{i:02}.png")
    run = _icd_process("edit", tmp_path / "in", "--src", "a cat", "--tgt", "a dog", "--method", "none", *TINY,
                       "-o", "out", cwd=tmp_path)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 143, stderr
    assert "icd: error: terminated: no result was left half-written" in stderr
    assert "Traceback" not in stderr
    left = sorted(p.name for p in out.iterdir())
    assert left and all(not name.startswith(".") for name in left)
    for name in left:  # every output there is whole
        Image.open(out / name).load()


# ---------------------------------------------------------------------------------------------------
# Saying what happened: -q, -v, metadata and --from.

def test_quiet_prints_nothing_on_success(icd_home, tmp_path):
    result = icd("edit", photo(tmp_path / "a.png"), "--src", "a cat", "--tgt", "a dog", *TINY, "-q",
                 "--self-replace", "0.2", cwd=tmp_path)
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""  # not even the warning about an empty p2p window
    assert (tmp_path / "a-edit.png").is_file()


def test_rerun_from_a_result_repeats_the_edit_exactly(icd_home, tmp_path):
    source = photo(tmp_path / "a.png", size=(96, 64))
    first = icd("edit", source, "--src", "a red cat", "--tgt", "a blue cat", "--blend", "cat:cat", "--amplify",
                "blue=3", "--cross-replace", "0.5", "--seed", "11", "--guidance", "5", "--width", "64",
                "--height", "64", *TINY, "-o", "first.png", cwd=tmp_path)
    assert first.exit_code == 0, first.output
    meta = read_metadata(tmp_path / "first.png")
    assert (meta["blend"], meta["amplify"], meta["cross_replace"], meta["width"], meta["height"]) == (
        "cat:cat", ["blue=3"], 0.5, 64, 64)
    assert (meta["backend"], meta["dtype"], meta["seed"], meta["guidance_w"]) == ("torch", "fp32", 11, 5.0)
    again = icd("edit", "--from", "first.png", "-o", "again.png", "--device", "cpu", cwd=tmp_path)
    assert again.exit_code == 0, again.output
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "first.png").tobytes()
    changed = icd("edit", "--from", "first.png", "--tgt", "a green cat", "-o", "changed.png", "--device", "cpu",
                  cwd=tmp_path)
    assert changed.exit_code == 0, changed.output
    assert read_metadata(tmp_path / "changed.png")["prompt"] == "a green cat"
    assert read_metadata(tmp_path / "changed.png")["blend"] == "cat:cat"


def test_from_an_image_without_edit_parameters_is_a_usage_error(icd_home, tmp_path, no_model_load):
    plain = photo(tmp_path / "plain.png")
    result = icd("edit", "--from", plain, cwd=tmp_path)
    assert result.exit_code == 2
    assert "holds no parameters of `icd edit`" in result.output


def test_info_and_pull_list_show_every_offline_model(icd_home, tmp_path):
    info = icd("info", cwd=tmp_path)
    assert info.exit_code == 0
    models_line = next(line for line in info.stdout.splitlines() if line.startswith("models: "))
    for name in ("mini (shipped", "tiny (built", "tiny-sdxl (built"):
        assert name in models_line
    listing = icd("pull", "--list", cwd=tmp_path).stdout
    assert "sd15-4step-259" in listing and "mini" in listing and "tiny-sdxl" in listing
