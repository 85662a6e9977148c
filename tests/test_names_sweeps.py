"""One naming scheme (--name, the input's format, --format/--quality, icd's own results left out of folders),
sweeps from one inversion with their contact sheet, --dry-run, --jobs -, the progress bar, -v's settings and
stage timings, and the metadata keys A1111 readers expect."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from icd.app import batch
from icd.app.cli import common
from icd.app.naming import naming, slug
from icd.errors import UsageError
from icd.images import embedded_texts, read_metadata
from icd.latents import read_latent_info
from tests.fixtures.cli import icd

TINY = ("-m", "tiny", "--device", "cpu")
EDIT = ("--src", "a red cat", "--tgt", "a dog", "--method", "none", *TINY)


def photo(path: Path, size=(64, 48), colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.paste((20, 20, 220), (8, 8, 24, 24))
    image.save(path)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(common, "open_model", lambda *a, **k: pytest.fail("the model was opened"))


@pytest.fixture
def inversions(monkeypatch):
    """The seeds of the inversions the local runner ran."""
    from icd.app.requests import Invert
    from icd.app.runner import LocalRunner

    seen = []
    real = LocalRunner.run
    monkeypatch.setattr(LocalRunner, "run", lambda self, request: (
        isinstance(request, Invert) and seen.append(request.seed), real(self, request))[1])
    return seen


def test_slugs_end_at_a_word_boundary():
    assert slug("A green square on a very long sandy background with stones") == "a-green-square-on-a-very-long-sandy"
    assert slug("x" * 50) == "x" * 40  # one word longer than the limit is cut
    assert slug("Café, au lait!") == "caf-au-lait" and slug("!!!") == "image"


def test_templates_are_checked_before_anything_runs():
    fields = ("stem", "seed", "guidance", "n")
    named = naming("{stem}-w{guidance}-{n:03d}.jpg", None, fields)
    assert (named.suffix, named.fill("", {"stem": "cat", "guidance": 19.0, "n": 7})) == (".jpg", "cat-w19-007")
    assert naming(None, "jpeg", fields).suffix == naming("{stem}.JPEG", None, fields).suffix == ".jpg"
    refusals = {"{stem}-{target}": "--name {stem}-{target}: unknown field {target}: this command knows {stem}, "
                                   "{seed}, {guidance}, {n}",
                "{target.__class__}": "unknown field {target.__class__}",
                "out/{stem}": "--name out/{stem}: a file name without folders (-o chooses the folder)",
                "{stem": "--name {stem: expected '}' before end of string",
                "{seed:q}": "--name {seed:q}: Unknown format code 'q'",
                "{stem!r}": "no conversions (!r) in a field"}
    for template, message in refusals.items():
        with pytest.raises(UsageError) as refused:
            naming(template, None, fields)
        assert message in str(refused.value), template
    with pytest.raises(UsageError, match=r"--name \{stem\}.png ends with .png, but --format asks for .webp"):
        naming("{stem}.png", "webp", fields)


def test_a_sweep_decodes_every_value_from_one_inversion_and_lays_them_out(icd_home, tmp_path, inversions):
    source = photo(tmp_path / "a.png")
    result = icd("edit", source, *EDIT, "-n", "2", "--guidance", "2,4", "--strength", "0.25,0.75", "-o", "out",
                 "--grid", "sheet.png", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert inversions == [0, 1]  # one per seed, each decoded under the 4 settings
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"a-edit-s{seed}-g{w}-strength{s}.png" for seed in (0, 1) for w in (2, 4)
                           for s in (0.25, 0.75))
    meta = read_metadata(tmp_path / "out" / "a-edit-s1-g4-strength0.25.png")
    assert (meta["seed"], meta["guidance_w"], meta["strength"]) == (1, 4.0, 0.25)  # --guidance wins over strength
    assert result.stdout.strip().splitlines()[-1] == "sheet.png"
    sheet = Image.open(tmp_path / "sheet.png")
    panel = round(64 * 256 / 48)  # every panel 256 high (the demo's rows), the photo first
    assert sheet.size == (5 * panel, 2 * (256 + 28))
    labels = sheet.convert("L").crop((0, 256, sheet.width, 256 + 28))
    for column in range(5):  # a dark label under every panel
        assert labels.crop((column * panel, 0, (column + 1) * panel, 28)).getextrema()[0] < 100
    assert read_metadata(tmp_path / "sheet.png")["columns"] == ["guidance", "strength"]


def test_the_grid_rows_and_captions(tmp_path):
    from icd.app.batch import Item
    from icd.app.grid import layout

    items = [Item("x", Path(f"{stem}.png"), Path(f"{stem}-{target}-{seed}.png"),
                  values={"target": target, "seed": seed, "guidance": 19.0})
             for stem in ("a", "b") for target in ("a dog", "a fox") for seed in (0, 1)]
    sheet = layout(str(tmp_path / "s.png"), items, ("target", "seed"))
    assert [label for _, label, _ in sheet.rows] == ["a.png, a dog", "a.png, a fox", "b.png, a dog", "b.png, a fox"]
    assert [sheet.caption(item) for item in sheet.rows[1][2]] == ["seed 0", "seed 1"]
    only_targets = layout(str(tmp_path / "s.png"), items[:4:2], ("target",))
    assert [sheet_row[1] for sheet_row in only_targets.rows] == ["a.png"]
    assert [only_targets.caption(item) for item in only_targets.rows[0][2]] == ["a dog", "a fox"]
    with pytest.raises(UsageError, match=r"--grid .*s.gif: name a .png, .jpg or .webp file"):
        layout(str(tmp_path / "s.gif"), items, ("target",))


def test_names_from_a_template_and_clashes_refused(icd_home, tmp_path, no_model_load):
    source = photo(tmp_path / "a.png")
    result = icd("edit", source, *EDIT, "--tgt", "A fox in the snow, at night", "--tau", "0.5,1", "--name",
                 "{stem}_{target}_t{tau}_{n:02d}", "-o", "out", "--dry-run", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    planned = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["outputs"] for record in planned] == [
        ["out/a_a-dog_t0.5_01.png"], ["out/a_a-dog_t1_02.png"], ["out/a_a-fox-in-the-snow-at-night_t0.5_03.png"],
        ["out/a_a-fox-in-the-snow-at-night_t1_04.png"]]
    assert planned[3]["settings"]["tau"] == 1.0 and planned[3]["settings"]["target"] == "A fox in the snow, at night"
    result = icd("edit", source, *EDIT, "--tgt", "a fox", "--name", "{stem}-{seed}", "-n", "2", "-o", "out",
                 cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"icd: error: --name {{stem}}-{{seed}}: {source} ('a dog', seed 0) and {source} ('a fox', seed 0) would "
        f"both be written to {Path('out') / 'a-0.png'}: add {{target}}")
    assert not (tmp_path / "out").exists()


def test_formats_kept_chosen_and_stage_timings_shown(icd_home, tmp_path):
    for name in ("a.jpg", "b.webp", "c.bmp"):
        photo(tmp_path / "in" / name)
    result = icd("edit", tmp_path / "in", *EDIT, "-o", "out", "-v", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    formats = {p.name: Image.open(p).format for p in (tmp_path / "out").iterdir()}
    assert formats == {"a-edit.jpg": "JPEG", "b-edit.webp": "WEBP", "c-edit.png": "PNG"}
    assert read_metadata(tmp_path / "out" / "a-edit.jpg")["prompt"] == "a dog"
    timing = re.compile(r'icd: debug: .*a\.jpg: source "a red cat", target "a dog", seed 0, method none, guidance '
                        r'[\d.]+, tau [\d.]+, mix 1; invert \d+\.\d{3} s, edit \d+\.\d{3} s, write \d+\.\d{3} s, rest '
                        r'\d+\.\d{3} s \(of \d+\.\d{3} s\)')
    assert timing.search(result.stderr), result.stderr
    result = icd("edit", tmp_path / "in" / "c.bmp", *EDIT, "--format", "webp", "-o", "out", cwd=tmp_path)
    assert result.exit_code == 0 and Image.open(tmp_path / "out" / "c-edit.webp").format == "WEBP"


def test_quality_and_format_options(icd_home, tmp_path, no_model_load):
    for args, message in [(("--format", "png", "--quality", "80"), "--quality applies to JPEG and WebP results"),
                          (("--format", "jpg", "-o", "x.png"), "-o x.png is not a .jpg file, which --format asks for"),
                          (("--name", "{seed}", "-o", "x.png"), "-o x.png names the result's file: --name names")]:
        result = icd("generate", "a red cat", "--seed", "1", *TINY, *args, cwd=tmp_path)
        assert result.exit_code == 2 and message in result.stderr, args


def test_jpeg_quality(icd_home, tmp_path):
    for quality in ("10", "95"):
        result = icd("generate", "a red cat", "--seed", "1", *TINY, "--format", "jpg", "--quality", quality,
                     "--name", f"q{quality}", cwd=tmp_path)
        assert result.exit_code == 0, result.output
    low, high = (tmp_path / "q10.jpg"), (tmp_path / "q95.jpg")
    assert Image.open(low).format == "JPEG" and low.stat().st_size < high.stat().st_size / 2
    assert read_metadata(low)["seed"] == 1


def test_icd_results_in_a_folder_are_not_new_inputs(icd_home, tmp_path, no_model_load):
    folder = tmp_path / "in"
    photo(folder / "x.png")
    photo(folder / "x-edit.png")  # a photo of that name, without icd's record: an input
    earlier = folder / "x-edit-edit.png"
    Image.new("RGB", (64, 48)).save(earlier, pnginfo=_record({"command": "edit", "prompt": "a dog"}))
    result = icd("edit", folder, *EDIT, "-o", folder, "--dry-run", cwd=tmp_path)
    assert result.exit_code == 1  # x-edit-edit.png exists: the second item would be refused
    assert [line.split(" -> ")[0] for line in result.stdout.splitlines()] == [str(folder / "x-edit.png"),
                                                                             str(folder / "x.png")]
    assert "icd: info: left out 1 file(s) that are icd's own results of an earlier run: name them one by one " \
           "to use them" in result.stderr
    named = icd("edit", earlier, *EDIT, "-o", "out", "--dry-run", cwd=tmp_path)  # named one by one: an input
    assert named.exit_code == 0 and named.stdout.startswith(f"{earlier} -> {Path('out') / 'x-edit-edit-edit.png'}")
    alone = icd("edit", tmp_path / "in" / "*-edit.png", *EDIT, "--dry-run", cwd=tmp_path)  # a glob leaves it out
    assert alone.exit_code == 0 and alone.stdout.count(" -> ") == 1


def _record(fields: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("icd", json.dumps(fields))
    return info


def test_dry_run_prints_the_plan_and_loads_nothing(icd_home, tmp_path, no_model_load):
    source = photo(tmp_path / "a.png")
    Image.new("L", (64, 48), 255).save(tmp_path / "m.png")
    before = files(tmp_path)
    result = icd("edit", source, *EDIT, "--mask", "m.png", "--strength", "0,1", "--grid", "g.png", "--dry-run",
                 cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f'{source} (\'a dog\', seed 0, strength 0) -> a-edit-strength0.png: source "a red cat", target "a dog", '
        'seed 0, method none, guidance 0, tau 0.8, strength 0, mix 0, mask m.png, keep_outside True',
        f'{source} (\'a dog\', seed 0, strength 1) -> a-edit-strength1.png: source "a red cat", target "a dog", '
        'seed 0, method none, guidance 19, tau 1, strength 1, mix 1, mask m.png, keep_outside True',
        "grid -> g.png: 1 row(s) x 2 result(s)"]
    assert "icd: info: dry run: 2 to run, 0 skipped, 0 refused; nothing was loaded or written" in result.stderr
    assert files(tmp_path) == before
    (tmp_path / "a-edit-strength1.png").write_bytes(b"taken")
    result = icd("invert", source, "--prompt", "a cat", *TINY, "--dry-run", "--json", cwd=tmp_path)
    assert json.loads(result.stdout) == {"input": str(source), "status": "planned", "outputs": ["a.latent.safetensors"],
                                         "settings": {"prompt": "a cat", "seed": 0}}
    result = icd("edit", source, *EDIT, "--strength", "0,1", "--dry-run", cwd=tmp_path)
    assert result.exit_code == 1  # an item that would fail
    assert "-> a-edit-strength1.png: error: " in result.stdout and "a-edit-strength1.png exists" in result.stdout


def test_jobs_from_standard_input(icd_home, tmp_path, no_model_load):
    photo(tmp_path / "a.png")
    rows = "image,source,target,guidance\na.png,a cat,a dog,3\na.png,a cat,a fox,\n"
    result = icd("edit", "--jobs", "-", *TINY, "-o", "out", "--dry-run", "--json", cwd=tmp_path, stdin=rows)
    assert result.exit_code == 0, result.output
    planned = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(p["input"], p["outputs"], p["settings"]["guidance"]) for p in planned] == [
        ("<stdin> row 1", ["out/a-edit-a-dog-s0.png"], 3.0), ("<stdin> row 2", ["out/a-edit-a-fox-s0.png"], 19.0)]
    named = icd("edit", "--jobs", "-", *TINY, "--name", "{n}-{target}-w{guidance}", "--format", "webp", "--dry-run",
                cwd=tmp_path, stdin=rows)
    assert [line.split(":")[0] for line in named.stdout.splitlines()] == ["<stdin> row 1 -> 1-a-dog-w3.webp",
                                                                          "<stdin> row 2 -> 2-a-fox-w19.webp"]
    lines = '{"image": "a.png", "source": "a cat", "seed": 4}\n'
    result = icd("invert", "--jobs", "-", *TINY, "--dry-run", cwd=tmp_path, stdin=lines)
    assert result.exit_code == 0 and result.stdout.startswith("<stdin> row 1 -> a.latent.safetensors: ")
    result = icd("invert", "--jobs", "-", *TINY, cwd=tmp_path, stdin='{"image": "b.png", "sauce": "x"}\n')
    assert result.exit_code == 2 and "icd: error: <stdin> row 1: sauce: not a column this command takes" in \
        result.stderr


def test_progress_bar_on_a_terminal_only(icd_home, tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "on_terminal", lambda: True)
    result = icd("generate", "a red cat", "-n", "2", "--seed", "1", *TINY, "-o", "out", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert re.search(r"2/2 \[\d\d:\d\d<\d\d:\d\d left", result.stderr), result.stderr
    quiet = icd("generate", "a red cat", "-n", "2", "--seed", "3", *TINY, "-o", "out", "--json", cwd=tmp_path)
    assert quiet.exit_code == 0 and " left" not in quiet.stderr
    assert [json.loads(line)["output"] for line in quiet.stdout.splitlines()] == ["out/a-red-cat-3.png",
                                                                                  "out/a-red-cat-4.png"]


def test_metadata_keys_a1111_readers_expect(icd_home, tmp_path):
    source = photo(tmp_path / "a.png")
    mask = tmp_path / "m.png"
    Image.new("L", (64, 48), 255).save(mask)
    result = icd("edit", source, "--src", "a red cat", "--tgt", "a dog", *TINY, "--mask", mask, "--mask-words",
                 "cat:dog", "-o", "masked.png", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "masked.png")
    assert meta["mask_hash"] == hashlib.sha256(mask.read_bytes()).hexdigest()[:10]
    parameters = embedded_texts(tmp_path / "masked.png")[0]
    assert f"Size: 64x48, Model hash: {meta['model_fingerprint']}, Model: tiny" in parameters
    assert 'Mask words: "cat:dog"' in parameters and f"Mask hash: {meta['mask_hash']}" in parameters
    assert "fingerprint" not in parameters and "Blend" not in parameters
    Image.new("L", (64, 48), 128).save(mask)
    rerun = icd("edit", "--from", "masked.png", "--dry-run", cwd=tmp_path)
    assert rerun.exit_code == 0, rerun.output
    now = hashlib.sha256(mask.read_bytes()).hexdigest()[:10]
    assert f"icd: warning: --from masked.png: its mask m.png has changed since (hash {now}, recorded " \
           f"{meta['mask_hash']}): the rerun uses it as it is now" in rerun.stderr
    assert icd("invert", source, "--prompt", "a red cat", *TINY, cwd=tmp_path).exit_code == 0
    result = icd("edit", "a.latent.safetensors", "--tgt", "a dog", "--method", "none", *TINY, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    meta, latent = read_metadata(tmp_path / "a-edit.png"), read_latent_info(tmp_path / "a.latent.safetensors")
    assert (meta["width"], meta["height"]) == (latent.width, latent.height)  # the working size, for latent edits too
    assert "Size: 64x48" in embedded_texts(tmp_path / "a-edit.png")[0]
    rerun = icd("edit", "--from", "a-edit.png", "-o", "again.png", cwd=tmp_path)  # a latent's size is its own
    assert rerun.exit_code == 0, rerun.output
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "a-edit.png").tobytes()
