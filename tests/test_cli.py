"""The `icd` command end to end on the tiny model: outputs, messages, exit codes, untouched inputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.fixtures.cli import icd
from bench.miniature.world import DEMO_SCENE as MINI_SCENE
from icd.images import read_metadata
from icd.models.hub import resolve_model
from bench.miniature.world import background_of, colour_under, render


def photo(path: Path, size=(100, 60), mode="RGB", color=(200, 40, 40)) -> Path:
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 10):
        for y in range(size[1]):
            image.putpixel((x, y), (20, 20, 220))
    if mode == "CMYK":
        image = image.convert("CMYK")
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putpixel((0, 0), (255, 0, 0, 0))
    image.save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """Good and bad inputs side by side, as a user's folder would be."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo(inputs / "a.png")
    photo(inputs / "b.jpg", size=(90, 130), mode="CMYK")
    photo(inputs / "c.png", mode="RGBA")
    (inputs / "broken.jpg").write_text("this is not a picture")
    good = (inputs / "a.png").read_bytes()
    (inputs / "truncated.png").write_bytes(good[: len(good) // 2])
    (inputs / "notes.txt").write_text("ignored: not an image suffix")
    return inputs


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_edit_folder_with_good_and_bad_files(icd_home, folder, tmp_path):
    before = snapshot(folder)
    out = tmp_path / "out"
    result = icd("edit", folder, "--src", "a red cat", "--tgt", "a blue cat", "-m", "tiny", "-o", out,
                 "--device", "cpu", cwd=tmp_path)
    assert result.exit_code == 1
    assert snapshot(folder) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["a-edit.png", "b-edit.jpg", "c-edit.png"]  # formats kept
    assert "icd: error: broken.jpg: not an image (cannot identify the format)" in result.stderr
    assert "icd: error: truncated.png: truncated or corrupt image data" in result.stderr
    assert "icd: error: 2 of 5 items failed" in result.stderr
    assert "notes.txt" not in result.output
    # each result keeps its input's size; the alpha input gets its alpha back
    assert Image.open(out / "a-edit.png").size == (100, 60)
    assert Image.open(out / "b-edit.jpg").size == (90, 130) and Image.open(out / "b-edit.jpg").format == "JPEG"
    assert Image.open(out / "c-edit.png").mode == "RGBA"
    meta = read_metadata(out / "a-edit.png")
    assert (meta["prompt"], meta["source_prompt"], meta["method"], meta["guidance_w"], meta["tau"]) == (
        "a blue cat", "a red cat", "p2p", 19.0, 0.8)
    assert meta["command"] == "edit" and meta["model"] == "tiny" and len(meta["model_fingerprint"]) == 16
    assert meta["guidance_steps"] == [[999, 0.0], [779, 19.0], [519, 19.0], [259, 19.0]]  # dynamic guidance, tau 0.8


def test_invert_reconstruct_edit_chain_with_json(icd_home, tmp_path):
    source = photo(tmp_path / "cat.png")
    result = icd("invert", source, "--prompt", "a red cat", "-m", "tiny", "--seed", "7", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip())
    assert record["status"] == "ok" and record["output"] == "cat.latent.safetensors"
    latent = tmp_path / "cat.latent.safetensors"

    result = icd("reconstruct", latent, cwd=tmp_path)  # the model comes from the latent's metadata
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "cat-recon.png"
    meta = read_metadata(tmp_path / "cat-recon.png")
    assert (meta["prompt"], meta["seed"], meta["command"]) == ("a red cat", 7, "reconstruct")
    assert Image.open(tmp_path / "cat-recon.png").size == (100, 60)

    result = icd("edit", latent, "--tgt", "a blue cat", "--method", "none", "-m", "tiny", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "cat-edit.png")
    assert (meta["source_prompt"], meta["method"]) == ("a red cat", "none")


def test_outputs_are_never_overwritten_without_flag(icd_home, tmp_path):
    source = photo(tmp_path / "dog.png")
    args = ("edit", source, "--src", "a dog", "-m", "tiny", "--method", "swap")
    assert icd(*args, "--tgt", "a cat", cwd=tmp_path).exit_code == 0
    first = (tmp_path / "dog-edit.png").read_bytes()
    result = icd(*args, "--tgt", "a fox", cwd=tmp_path)
    assert result.exit_code == 1
    assert f"icd: error: {source}: dog-edit.png exists (use --overwrite to replace it, or --skip-existing to " \
           "leave it)" in result.stderr
    assert (tmp_path / "dog-edit.png").read_bytes() == first
    assert icd(*args, "--tgt", "a fox", "--overwrite", cwd=tmp_path).exit_code == 0
    assert read_metadata(tmp_path / "dog-edit.png")["prompt"] == "a fox"


def test_generate_is_reproducible_per_seed(icd_home, tmp_path):
    result = icd("generate", "a red cat", "-n", "2", "--seed", "5", "-m", "tiny", "-o", "gen", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert names == ["a-red-cat-5.png", "a-red-cat-6.png"]
    again = icd("generate", "a red cat", "--seed", "6", "-m", "tiny", "-o", "again.png", cwd=tmp_path)
    assert again.exit_code == 0
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "gen" / names[1]).tobytes()
    assert Image.open(tmp_path / "again.png").size == (128, 128)  # the tiny model's resolution


def test_sdxl_edit_defaults_to_swap(icd_home, tmp_path):
    source = photo(tmp_path / "x.png")
    result = icd("edit", source, "--src", "a cat", "--tgt", "a dog", "-m", "tiny-sdxl", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "x-edit.png")
    assert (meta["method"], meta["tau"], meta["guidance_w"]) == ("swap", 0.7, 19.0)


def test_usage_errors_exit_2(icd_home, tmp_path):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png")
    result = icd("edit", a, b, "--src", "x", "--tgt", "y", "-m", "tiny", "-o", "one.png", cwd=tmp_path)
    assert result.exit_code == 2
    assert "names one file, but there are 2 results" in result.output
    assert icd("edit", a, "--src", "x", cwd=tmp_path).exit_code == 2  # --tgt missing
    result = icd("edit", a, "--src", "x", "--tgt", "y", "--amplify", "bear", cwd=tmp_path)
    assert result.exit_code == 2 and "is not WORD=FACTOR" in result.output


def test_model_problems_are_one_line(icd_home, tmp_path):
    source = photo(tmp_path / "a.png")
    result = icd("edit", source, "--src", "x", "--tgt", "y", "-m", "sd15", cwd=tmp_path)
    assert result.exit_code == 1
    assert result.stderr.strip() == "icd: error: model 'sd15' is not downloaded yet: run `icd pull sd15`"
    result = icd("edit", source, "--src", "x", "--tgt", "y", "-m", "nope", cwd=tmp_path)
    assert result.exit_code == 2 and "unknown model 'nope'" in result.stderr
    # cuda:64 is past every machine's GPUs, and plain cuda on a machine without one
    result = icd("edit", source, "--src", "x", "--tgt", "y", "-m", "tiny", "--device", "cuda:64", cwd=tmp_path)
    assert result.exit_code == 2
    assert "--device cuda:64" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = icd("pull", "sd15", cwd=tmp_path)
    assert result.exit_code == 1 and "offline" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_latent_from_another_model_is_refused(icd_home, tmp_path):
    source = photo(tmp_path / "a.png")
    assert icd("invert", source, "--prompt", "a cat", "-m", "tiny", cwd=tmp_path).exit_code == 0
    result = icd("edit", "a.latent.safetensors", "--tgt", "a dog", "-m", "tiny-sdxl", cwd=tmp_path)
    assert result.exit_code == 1
    assert "a.latent.safetensors: inverted with model 'tiny'" in result.stderr
    assert "use --model tiny" in result.stderr


def test_demo_shows_a_real_edit_with_the_shipped_mini_model(icd_home, tmp_path):
    result = icd("demo", "-o", "demo", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "demo"
    assert sorted(p.name for p in folder.iterdir()) == [
        "before-after.png", "sample-edit.png", "sample-recon.png", "sample.latent.safetensors", "sample.png"]
    sample = Image.open(folder / "sample.png")
    assert read_metadata(folder / "sample-edit.png")["prompt"] == "a blue circle on a sandy background"
    [circle] = render(MINI_SCENE).objects
    assert colour_under(sample, circle.mask) == "red"
    assert colour_under(Image.open(folder / "sample-recon.png"), circle.mask) == "red"  # the inversion is faithful
    assert colour_under(Image.open(folder / "sample-edit.png"), circle.mask) == "blue"  # and the edit happened
    assert background_of(Image.open(folder / "sample-edit.png"), [circle.mask]) == "sandy"
    # the picture, its labels and reruns: tests/test_demo.py


@pytest.mark.parametrize("method", ["p2p", "swap", "none"])
def test_mini_edits_the_colour_under_the_mask(icd_home, tmp_path, method):
    scene = render(MINI_SCENE.edited(colour="yellow", shape="square"))
    scene.image.save(tmp_path / "scene.png")
    target = scene.spec.edited(colour="green")
    result = icd("edit", "scene.png", "--model", "mini", "--src", scene.caption, "--tgt", target.caption,
                 "--method", method, "-o", "out.png", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert colour_under(Image.open(tmp_path / "out.png"), scene.objects[0].mask) == "green"


def test_demo_with_another_model_edits_the_photo(icd_home, tmp_path):
    result = icd("demo", "-o", "demo", "--model", "tiny", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "demo" / "sample-edit.png")["prompt"] == "a white dog in front of a house"


def test_info_and_help(icd_home, tmp_path):
    result = icd("info", cwd=tmp_path)
    assert result.exit_code == 0
    device = "device cuda:0: " if torch.cuda.is_available() else "device: cpu"
    assert device in result.output and f"cache: {icd_home}" in result.output
    help_text = icd("edit", "--help", cwd=tmp_path).output
    assert "floor(cross*(K+1))" in help_text and "classical CFG scale minus one" in help_text


def test_p2p_window_that_maps_to_no_step_is_warned(icd_home, tmp_path):
    source = photo(tmp_path / "a.png")
    result = icd("edit", source, "--src", "a red cat", "--tgt", "a blue cat", "-m", "tiny", "--self-replace", "0.2",
                 cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "icd: warning: self_replace 0.2 controls no step of 4 (at least 0.25 is needed)" in result.stderr


def test_base_model_missing_from_cache_fails_fast(icd_home, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(resolve_model("tiny").path.parent, model)
    manifest = json.loads((model / "icd.json").read_text())
    (model / "icd.json").write_text(json.dumps({**manifest, "base": "nobody/not-a-model"}))
    result = icd("generate", "a cat", "-m", model, cwd=tmp_path)
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("icd: error: cannot load 'tokenizer' of base model nobody/not-a-model (not in the "
                           "Hugging Face cache: `icd pull` a preset, or `hf download nobody/not-a-model`): no vocabulary files found")
    assert "\n" not in line


def test_many_targets_and_seeds_invert_each_image_once_per_seed(icd_home, tmp_path, monkeypatch):
    from icd.app.runner import LocalRunner

    from icd.app.requests import Invert

    inversions = []
    real = LocalRunner.run
    monkeypatch.setattr(LocalRunner, "run", lambda self, request: (
        isinstance(request, Invert) and inversions.append(request.seed), real(self, request))[1])
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", color=(30, 200, 30))
    result = icd("edit", a, b, "--src", "a red cat", "--tgt", "a dog", "--tgt", "A dog!", "--tgt", "a fox",
                 "--seed", "4", "-n", "2", "--method", "none", "-m", "tiny", "-o", "out", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(inversions) == [4, 4, 5, 5]  # 2 images x 2 seeds, each reused for the 3 targets
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"{stem}-edit-{target}-s{seed}.png" for stem in "ab" for seed in (4, 5)
                           for target in ("a-dog", "a-dog-2", "a-fox"))
    meta = read_metadata(tmp_path / "out" / "b-edit-a-dog-2-s5.png")
    assert (meta["prompt"], meta["seed"], meta["source"]) == ("A dog!", 5, "../b.png")  # from the result's folder
    single = icd("edit", a, "--src", "a red cat", "--tgt", "a fox", "--seed", "5", "--method", "none", "-m", "tiny",
                 "-o", "single.png", cwd=tmp_path)
    assert single.exit_code == 0
    assert Image.open(tmp_path / "single.png").tobytes() == \
        Image.open(tmp_path / "out" / "a-edit-a-fox-s5.png").tobytes()  # as if edited alone


def test_several_targets_for_one_output_file_or_seeds_with_n_are_usage_errors(icd_home, tmp_path):
    a = photo(tmp_path / "a.png")
    result = icd("edit", a, "--src", "x", "--tgt", "y", "--tgt", "z", "-m", "tiny", "-o", "one.png", cwd=tmp_path)
    assert result.exit_code == 2 and "-o one.png names one file, but there are 2 results" in result.stderr
    result = icd("edit", a, "--src", "x", "--tgt", "y", "--seed", "1", "--seed", "2", "-n", "3", cwd=tmp_path)
    assert result.exit_code == 2 and "-n counts seeds up from one --seed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
