"""`icd demo`: a before/after a person can read (panels at a visible size, labelled) that can be run again."""

import numpy as np
from PIL import Image

from bench.miniature.world import DEMO_SCENE, colour_under, render
from icd.app.demo import LABEL_HEIGHT, PANEL_HEIGHT, labelled_row
from tests.fixtures.cli import icd

DEMO_FILES = ["before-after.png", "sample-edit.png", "sample-recon.png", "sample.latent.safetensors", "sample.png"]


def panels(picture: Image.Image, count: int, side: int) -> list[Image.Image]:
    """The picture's square panels, each shrunk back to `side` pixels (exact for an integer nearest-neighbour
    enlargement: every sample falls inside one enlarged pixel)."""
    boxes = [(i * PANEL_HEIGHT, 0, (i + 1) * PANEL_HEIGHT, PANEL_HEIGHT) for i in range(count)]
    return [picture.crop(box).resize((side, side), Image.NEAREST) for box in boxes]


def test_the_demo_shows_input_reconstruction_and_edit_enlarged_and_labelled(icd_home, tmp_path):
    result = icd("demo", "-o", "demo", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "demo"
    picture = Image.open(folder / "before-after.png").convert("RGB")
    assert picture.size == (3 * PANEL_HEIGHT, PANEL_HEIGHT + LABEL_HEIGHT)  # mini's 64x64 shown at 256x256
    shown = panels(picture, 3, 64)
    for panel, name in zip(shown, ("sample.png", "sample-recon.png", "sample-edit.png"), strict=True):
        assert np.array_equal(np.asarray(panel), np.asarray(Image.open(folder / name).convert("RGB")))
    [circle] = render(DEMO_SCENE).objects
    assert [colour_under(panel, circle.mask) for panel in shown] == ["red", "red", "blue"]
    labels = [np.asarray(picture.crop((i * PANEL_HEIGHT, PANEL_HEIGHT, (i + 1) * PANEL_HEIGHT, picture.height)))
              for i in range(3)]
    assert all((label < 128).any() for label in labels)  # some text under every panel
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])


def test_the_demo_runs_again_into_the_same_folder(icd_home, tmp_path):
    assert icd("demo", "-o", "demo", "--model", "tiny", cwd=tmp_path).exit_code == 0
    folder = tmp_path / "demo"
    first = (folder / "before-after.png").read_bytes()
    rerun = icd("demo", "-o", "demo", "--model", "tiny", cwd=tmp_path)
    assert rerun.exit_code == 0, rerun.output
    assert sorted(p.name for p in folder.iterdir()) == DEMO_FILES
    assert (folder / "before-after.png").read_bytes() == first


def test_the_demo_keeps_a_folder_that_holds_another_picture(icd_home, tmp_path):
    folder = tmp_path / "demo"
    folder.mkdir()
    Image.new("RGB", (8, 8), "green").save(folder / "sample.png")
    mine = (folder / "sample.png").read_bytes()
    result = icd("demo", "-o", "demo", "--model", "tiny", cwd=tmp_path)
    assert result.exit_code == 1
    assert "sample.png exists (use --overwrite" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["sample.png"]
    assert (folder / "sample.png").read_bytes() == mine


def test_a_large_panel_keeps_its_size_and_a_long_label_is_shortened():
    big, small = Image.new("RGB", (450, 300), "red"), Image.new("RGB", (30, 30), "blue")
    long_label = "edit: " + "a very long prompt " * 10
    row = labelled_row([(big, "input"), (small, long_label)])
    assert row.size == (450 + 300, 300 + LABEL_HEIGHT)  # no panel is shrunk below the largest height
    assert np.asarray(row)[:300, 450:].reshape(-1, 3).tolist() == [[0, 0, 255]] * 300 * 300
    under_small = np.asarray(row.convert("L"))[300:, 450:]
    inked = np.nonzero((under_small < 128).any(axis=0))[0]
    assert inked.min() > 0 and inked.max() < 299  # the label stays inside its own panel
