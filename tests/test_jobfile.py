"""Job files (`icd edit --jobs`, `icd invert --jobs`) and metadata.jsonl captions: every row checked before the
model loads, the row number in every error, and what each row asked for in its result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from icd.app.cli import common
from icd.images import read_metadata
from icd.latents import read_latent_info
from tests.fixtures.cli import icd

TINY = ("-m", "tiny", "--device", "cpu")


def photo(path: Path, colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(common, "open_model", lambda *a, **k: pytest.fail("the model was opened"))


def test_edit_jobs_run_each_row_with_its_own_settings(icd_home, tmp_path, monkeypatch):
    from icd.app.runner import LocalRunner

    from icd.app.requests import Invert

    inversions = []
    real = LocalRunner.run
    monkeypatch.setattr(LocalRunner, "run", lambda self, request: (
        isinstance(request, Invert) and inversions.append((request.prompt, request.seed)), real(self, request))[1])
    photo(tmp_path / "jobs" / "a.png")
    photo(tmp_path / "jobs" / "b.png", colour=(30, 200, 30))
    jobs = jsonl(tmp_path / "jobs" / "edits.jsonl", [
        {"image": "a.png", "source": "a red cat", "target": "a dog", "method": "none"},
        {"image": "b.png", "source": "a green cat", "target": "a fox", "seed": 3, "guidance": 5, "tau": 0.5,
         "method": "swap", "output": "fox.png"},
        {"image": "a.png", "source": "a red cat", "target": "a bear", "method": "p2p", "blend": "cat:bear",
         "amplify": "bear=2"},
    ])
    result = icd("edit", "--jobs", jobs, *TINY, "-o", "out", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert inversions == [("a red cat", 0), ("a green cat", 3)]  # rows 1 and 3 share one inversion
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-edit-a-bear-s0.png", "a-edit-a-dog-s0.png"]
    fox = read_metadata(tmp_path / "jobs" / "fox.png")  # a row's output is relative to the job file
    assert (fox["prompt"], fox["seed"], fox["guidance_w"], fox["tau"], fox["method"]) == ("a fox", 3, 5.0, 0.5, "swap")
    bear = read_metadata(tmp_path / "out" / "a-edit-a-bear-s0.png")
    assert (bear["blend"], bear["amplify"]) == ("cat:bear", ["bear=2"])


BAD_ROWS = {
    "missing target": ({"image": "a.png", "source": "a cat"}, "row 2: target: Field required"),
    "tau above 1": ({"image": "a.png", "source": "a", "target": "b", "tau": 1.5},
                    "row 2: tau: Input should be less than or equal to 1"),
    "guidance nan": ('{"image": "a.png", "source": "a", "target": "b", "guidance": NaN}',
                     "row 2: guidance: Input should be a finite number"),
    "unknown column": ({"image": "a.png", "source": "a", "target": "b", "colour": 3},
                       "row 2: colour: not a column this command takes"),
    "strength out of range": ({"image": "a.png", "source": "a", "target": "b", "strength": 3},
                              "row 2: strength: Input should be less than or equal to 1"),
    "mask words twice": ({"image": "a.png", "source": "a", "target": "b", "blend": "a:b", "mask_words": "a:b"},
                         "row 2: mask_words and blend are one column under two names: give one"),
    "blend with swap": ({"image": "a.png", "source": "a", "target": "b", "method": "swap", "blend": "a:b"},
                        "row 2: blend apply to method p2p, not swap"),
    "bad amplify": ({"image": "a.png", "source": "a", "target": "b", "amplify": "bear"},
                    "row 2: amplify: 'bear' is not WORD=FACTOR"),
    "no source for an image": ({"image": "a.png", "target": "b"}, "row 2: source: needed to edit an image"),
    "not json": ('{"image": "a.png",', "row 2: not JSON"),
    "seed negative": ({"image": "a.png", "source": "a", "target": "b", "seed": -1},
                      "row 2: seed: Input should be greater than or equal to 0"),
    "same output": ({"image": "a.png", "source": "a", "target": "c", "output": "x.png"},
                    "row 2: {folder}/x.png is also written by {jobs} row 1: give each result its own name"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_a_bad_row_stops_everything_before_the_model_loads(icd_home, tmp_path, no_model_load, case):
    row, message = BAD_ROWS[case]
    photo(tmp_path / "a.png")
    good = {"image": "a.png", "source": "a", "target": "b", "output": "x.png"}
    jobs = jsonl(tmp_path / "jobs.jsonl", [good, row, {**good, "target": "z", "output": "z.png"}])
    before = files(tmp_path)
    result = icd("edit", "--jobs", jobs, *TINY, cwd=tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"icd: error: {jobs} " + message.format(folder=tmp_path, jobs=jobs)), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert files(tmp_path) == before


def test_csv_jobs_count_rows_after_the_header(icd_home, tmp_path, no_model_load):
    photo(tmp_path / "a.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,source,target,seed\na.png,a cat,a dog,1\na.png,a cat,a fox,x\n")
    result = icd("edit", "--jobs", jobs, *TINY, cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"icd: error: {jobs} row 2: seed: Input should be a valid integer")
    result = icd("edit", "--jobs", jobs, "a.png", *TINY, cwd=tmp_path)
    assert result.exit_code == 2 and "holds the inputs, prompts and seeds: drop INPUTS" in result.stderr


def test_invert_jobs_csv_and_captions_from_metadata_jsonl(icd_home, tmp_path):
    for name in ("a", "b"):
        photo(tmp_path / "photos" / f"{name}.png")
    jsonl(tmp_path / "photos" / "metadata.jsonl", [{"file_name": "a.png", "text": "a red square"},
                                                   {"file_name": "b.png", "text": "a red circle"}])
    result = icd("invert", tmp_path / "photos", *TINY, "-o", "latents", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert read_latent_info(tmp_path / "latents" / "b.latent.safetensors").prompt == "a red circle"
    jobs = tmp_path / "photos" / "jobs.csv"
    jobs.write_text("image,source,seed,output\na.png,a square,7,sq.latent.safetensors\nb.png,,2,\n")
    result = icd("invert", "--jobs", jobs, *TINY, "-o", "more", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    square = read_latent_info(tmp_path / "photos" / "sq.latent.safetensors")
    assert (square.prompt, square.seed) == ("a square", 7)
    circle = read_latent_info(tmp_path / "more" / "b.latent.safetensors")  # no source: the caption
    assert (circle.prompt, circle.seed) == ("a red circle", 2)


def test_an_image_without_a_caption_is_a_usage_error(icd_home, tmp_path, no_model_load):
    photo(tmp_path / "photos" / "a.png")
    photo(tmp_path / "photos" / "b.png")
    jsonl(tmp_path / "photos" / "metadata.jsonl", [{"file_name": "a.png", "text": "a red square"}])
    before = files(tmp_path)
    result = icd("invert", tmp_path / "photos", *TINY, cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr == f"icd: error: {tmp_path / 'photos' / 'b.png'}: no --prompt, and no caption for b.png " \
                            f"in {tmp_path / 'photos' / 'metadata.jsonl'}\n"
    jsonl(tmp_path / "photos" / "metadata.jsonl", [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png"}])
    result = icd("invert", tmp_path / "photos", *TINY, cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"icd: error: {tmp_path / 'photos' / 'metadata.jsonl'} row 2: text: Field required")
    assert files(tmp_path).keys() == before.keys()  # nothing written
