"""Where results go, against a hostile or careless user: every output (from -o, job rows, --save-mask, the
names of images and latents together) is planned and checked before a model loads: inside the job file's
folder, never a file the command reads, distinct across all items, of its kind's suffix; `--from` finds the
recorded input from the result's folder and refuses a record of the wrong types; an edit and its saved map
are written together or not at all. Each case asserts the exit code, the line and the files before and
after."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from icd.app.cli import common
from tests.fixtures.cli import icd
from tests.test_hostile_cli import TINY, files, one_error_line, photo

EDIT = ("--src", "a red cat", "--tgt", "a blue cat", "--method", "none", *TINY)


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(common, "open_model", lambda *a, **k: pytest.fail("the model was opened"))


def jobs(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("column, value", [("output", "../x.png"), ("output", "/tmp/x.png"),
                                           ("output", "a/../../x.png"), ("save_mask", "../../m.png")])
def test_a_job_row_writes_only_inside_its_folder(icd_home, tmp_path, no_model_load, column, value):
    photo(tmp_path / "jobs" / "a.png")
    row = {"image": "a.png", "source": "a cat", "target": "a dog", "mask_words": "cat:dog", column: value}
    job_file = jobs(tmp_path / "jobs" / "edits.jsonl", [row])
    before = files(tmp_path)
    result = icd("edit", "--jobs", job_file, *TINY, "--overwrite", cwd=tmp_path)
    assert result.exit_code == 2
    assert one_error_line(result) == (f"icd: error: {job_file} row 1: {column} {value}: name a file inside the job "
                                      f"file's folder ({job_file.parent})")
    assert files(tmp_path) == before


def test_an_invert_row_writes_a_latent_file_and_two_rows_never_share_one(icd_home, tmp_path):
    photo(tmp_path / "jobs" / "a.png")
    photo(tmp_path / "jobs" / "b.png", colour=(30, 200, 30))
    named_png = jobs(tmp_path / "jobs" / "png.jsonl", [{"image": "a.png", "source": "a cat", "output": "x.png"}])
    result = icd("invert", "--jobs", named_png, *TINY, cwd=tmp_path)
    assert result.exit_code == 2
    assert one_error_line(result) == f"icd: error: {named_png} row 1: output x.png: must end with .latent.safetensors"
    shared = jobs(tmp_path / "jobs" / "shared.jsonl", [
        {"image": "a.png", "source": "a cat", "output": "x.latent.safetensors"},
        {"image": "b.png", "source": "a cat", "output": "x.latent.safetensors"}])
    result = icd("invert", "--jobs", shared, *TINY, cwd=tmp_path)
    assert result.exit_code == 2
    assert one_error_line(result) == f"icd: error: {shared} row 2: {shared.parent / 'x.latent.safetensors'} is " \
                                     f"also written by {shared} row 1: give each result its own name"
    assert not (tmp_path / "jobs" / "x.latent.safetensors").exists()  # refused before anything ran


def test_an_image_and_a_latent_of_one_stem_never_share_an_output(icd_home, tmp_path):
    source = photo(tmp_path / "x.png")
    assert icd("invert", source, "--prompt", "a red cat", *TINY, cwd=tmp_path).exit_code == 0
    result = icd("edit", source, tmp_path / "x.latent.safetensors", *EDIT, "-o", "out", cwd=tmp_path)
    assert result.exit_code == 2
    assert one_error_line(result) == f"icd: error: {tmp_path / 'x.latent.safetensors'}: {Path('out') / 'x-edit.png'} " \
                                     f"is also written by {source}: give each result its own name"
    assert not (tmp_path / "out").exists()


def test_save_mask_never_replaces_the_mask_it_reads(icd_home, tmp_path, no_model_load):
    source = photo(tmp_path / "a.png")
    Image.new("L", (64, 48), 255).save(tmp_path / "m.png")
    before = files(tmp_path)
    result = icd("edit", source, *EDIT, "--mask", "m.png", "--save-mask", "m.png", "--overwrite", cwd=tmp_path)
    assert result.exit_code == 1
    assert "the output m.png is one of the inputs: choose another -o" in result.stderr
    assert files(tmp_path) == before


def test_overwrite_and_skip_existing_together_are_refused(icd_home, tmp_path, no_model_load):
    result = icd("edit", photo(tmp_path / "a.png"), *EDIT, "--overwrite", "--skip-existing", cwd=tmp_path)
    assert result.exit_code == 2
    assert one_error_line(result) == "icd: error: --overwrite and --skip-existing contradict each other: give one"


def test_from_finds_the_input_from_the_result_folder(icd_home, tmp_path):
    first = photo(tmp_path / "a" / "p.png")
    result = icd("edit", first, *EDIT, "-o", tmp_path / "a" / "out" / "r.png", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    elsewhere = tmp_path / "b"
    photo(elsewhere / "a" / "p.png", colour=(30, 200, 30))  # another picture of the same relative name
    again = icd("edit", "--from", tmp_path / "a" / "out" / "r.png", "-o", "again.png", "--device", "cpu",
                cwd=elsewhere)
    assert again.exit_code == 0, again.output
    assert Image.open(elsewhere / "again.png").tobytes() == Image.open(tmp_path / "a" / "out" / "r.png").tobytes()


@pytest.mark.parametrize("field, value, why", [
    ("prompt", ["a", "dog"], "its recorded prompt is ['a', 'dog'], not a str"),
    ("seed", True, "its recorded seed is True, not a int"),
    ("guidance_w", "7", "its recorded guidance_w is '7', not a float"),
    ("tau", 3.0, "its recorded tau 3.0 is outside 0..1"),
    ("source", 5, "its recorded source is 5, not a path"),
])
def test_from_refuses_a_record_of_the_wrong_types(icd_home, tmp_path, no_model_load, field, value, why):
    record = {"command": "edit", "prompt": "a dog", "source_prompt": "a cat", "seed": 0, "source": "a.png",
              "model": "tiny", field: value}
    info = PngInfo()
    info.add_text("icd", json.dumps(record))
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png", pnginfo=info)
    result = icd("edit", "--from", "r.png", cwd=tmp_path)
    assert result.exit_code == 2
    assert why in one_error_line(result)


def test_an_edit_and_its_saved_map_are_written_together_or_not_at_all(icd_home, tmp_path):
    source = photo(tmp_path / "a.png")
    Image.new("L", (64, 48), 255).save(tmp_path / "m.png")
    (tmp_path / "blocker").write_text("a file where the edit's folder would be")
    result = icd("edit", source, *EDIT, "--mask", "m.png", "--save-mask", "used.png", "-o",
                 tmp_path / "blocker" / "edit.png", cwd=tmp_path)
    assert result.exit_code == 1
    assert "edit.png: cannot write" in result.stderr
    assert not (tmp_path / "used.png").exists()  # the map was written first, and taken back
    os.remove(tmp_path / "blocker")


@pytest.mark.parametrize("command", [("generate", "a red cat"), ("edit", "a.png", *EDIT)])
def test_an_existing_json_log_is_refused_before_the_model_loads(icd_home, tmp_path, no_model_load, command):
    photo(tmp_path / "a.png")
    (tmp_path / "log.jsonl").write_text("earlier\n")
    before = files(tmp_path)
    result = icd(*command, *TINY, "-o", "out/", "--json-log", "log.jsonl", cwd=tmp_path)
    assert result.exit_code == 2
    assert one_error_line(result) == "icd: error: --json-log log.jsonl exists (use --overwrite to replace it)"
    assert files(tmp_path) == before


def test_from_with_a_job_file_is_refused(icd_home, tmp_path):
    """--from's record would set the model but not the rows' settings: the two are refused together."""
    photo(tmp_path / "a.png")
    assert icd("edit", "a.png", *EDIT, "-o", "done.png", cwd=tmp_path).exit_code == 0
    jobs(tmp_path / "jobs.jsonl", [{"image": "a.png", "source": "a cat", "target": "a dog"}])
    before = files(tmp_path)
    result = icd("edit", "--jobs", "jobs.jsonl", "--from", "done.png", "-o", "out/", cwd=tmp_path)
    assert result.exit_code == 2
    assert one_error_line(result) == ("icd: error: --from reruns one recorded edit: not with --jobs, whose rows "
                                      "hold the edits")
    assert files(tmp_path) == before


def test_a_symlink_loop_among_the_results_does_not_break_the_grid_check(icd_home, tmp_path, no_model_load):
    """--grid compares real paths as the planning does: a looping link is a path like any other there."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x1.png").symlink_to("x1.png")
    result = icd("generate", "a red cat", *TINY, "--name", "x{n}", "-o", "out/", "--grid", "g.png", "--dry-run",
                 cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "grid -> g.png: 1 row(s) x 1 result(s)"
    assert not (tmp_path / "g.png").exists()
