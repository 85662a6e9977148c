"""Edits confined to a region: --mask on every method, --mask-words (LocalBlend, in the official order),
--save-mask, --keep-outside, --strength, and the SDXL prompt swap's pooled embedding."""

from __future__ import annotations

from pathlib import Path

import json
import os
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from bench.miniature.seam import SEAM_EDGES, mask_image, oval, seam_bands, seam_step
from bench.miniature.world import Placed, Spec, colour_under, random_spec, render
from icd import pipeline
from icd.app.requests import Edit, decode_request
from icd.app.serve.scheduler import answer
from icd.app.serve.client import RemoteRunner
from icd.app.runner import LocalRunner
from icd.app.session import open_session
from icd.app.serve.wire import receive, send
from icd.editing import (STRENGTH_KNOBS, EditPlan, Given, P2PConfig, edit_plan, model_defaults, recorded, resolve_edit,
                         strength_knobs)
from icd.errors import ICDError
from icd.images import as_array, image_to_array, read_metadata
from icd.masks import model_mask, read_mask, selects_everything
from icd.models.hub import resolve_model
from icd.models.offline import character_tokenizer
from icd.p2p import PromptToPrompt, Steering
from tests.fixtures.cli import icd

# Two objects far apart: the mask covers the circle (grown by 2 pixels), the square lies outside it.
SCENE = Spec("sandy", (Placed("circle", "red", 0.3, 0.32, 0.2), Placed("square", "blue", 0.72, 0.7, 0.16)), seed=5)
TARGET = SCENE.edited(0, colour="green")
MINI = ("-m", "mini", "--device", "cpu", "--no-server")


def grown(mask: np.ndarray, pixels: int = 2) -> np.ndarray:
    padded = np.pad(mask, pixels)
    out = np.zeros_like(mask)
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            out |= padded[pixels + dy: pixels + dy + mask.shape[0], pixels + dx: pixels + dx + mask.shape[1]]
    return out


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    scene = render(SCENE, 64)
    scene.image.save(folder / "scene.png")
    circle = grown(scene.objects[0].mask)
    Image.fromarray(circle.astype(np.uint8) * 255).save(folder / "circle.png")
    Image.new("L", (64, 64), 0).save(folder / "black.png")
    Image.new("L", (64, 64), 255).save(folder / "white.png")
    return folder, scene, circle


@pytest.fixture(scope="module")
def mini():
    return open_session("mini", device="cpu", dtype="fp32", backend="torch")


def edit_args(photo: Path, *more) -> tuple:
    return ("edit", photo, "--src", SCENE.caption, "--tgt", TARGET.caption, *MINI, *more)


# --- the mask on every method -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["p2p", "swap", "none"])
def test_hard_mask_keeps_the_source_trajectory_outside(mini, scene_files, method, monkeypatch):
    """Outside a hard mask the decoded latents are exactly the source row's (tolerance 0); the pixels there
    then differ from the reconstruction only through the VAE decoder's reach (its mid-block attention sees
    the whole latent): at most a few levels on average, far below the edit inside."""
    _, scene, circle = scene_files
    x_T = pipeline.invert(mini, torch.from_numpy(image_to_array(scene.image)), SCENE.caption, 0)
    decoded = []
    decode = mini.model.decode_latents
    monkeypatch.setattr(mini.model, "decode_latents", lambda latents: decoded.append(latents) or decode(latents))
    cells = torch.zeros(1, 1, 8, 8)
    cells[..., :4, :4] = 1.0  # a hard mask on whole latent cells: the top-left quarter
    mask = torch.nn.functional.interpolate(cells, size=(64, 64))
    result = pipeline.edit(mini, x_T, edit_plan(mini.manifest, SCENE.caption, TARGET.caption, method=method), mask=mask)

    source, edited = decoded[0][0], decoded[0][1]
    outside = ~cells[0, 0].bool()
    assert torch.equal(edited[:, outside], source[:, outside])
    assert (edited[:, ~outside] - source[:, ~outside]).abs().mean() > 0.05
    assert torch.equal(result.mask, cells)
    levels = (result.edited[0] - result.reconstruction[0]).abs() * 127.5
    far = torch.ones(64, 64, dtype=torch.bool)
    far[:40, :40] = False  # 8 pixels or more from the mask
    assert levels[:, far].mean() < 12 < levels[:, :32, :32].mean()


def test_latent_mask_areas_and_shapes():
    half = torch.zeros(1, 1, 64, 64)
    half[..., :, :36] = 1.0  # 36 of 64 columns: the fifth latent column is half covered
    grid = pipeline.latent_mask(half, (8, 8))
    assert grid.shape == (1, 1, 8, 8)
    assert torch.equal(grid[0, 0, 0], torch.tensor([1, 1, 1, 1, 0.5, 0, 0, 0]))
    small = pipeline.latent_mask(torch.ones(1, 1, 3, 5), (8, 8))  # coarser than the grid: upsampled
    assert torch.equal(small, torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"a mask is \(1, 1, H, W\), got \(64, 64\)"):
        pipeline.latent_mask(torch.ones(64, 64), (8, 8))


def test_read_mask_brightness_grey_and_transparency(tmp_path):
    """A mask's brightness in [0, 1]; colour counts by its luminance, transparent pixels as black."""
    rgba = Image.new("RGBA", (4, 2), (255, 255, 255, 255))
    rgba.putpixel((1, 0), (255, 255, 255, 0))
    rgba.putpixel((2, 0), (128, 128, 128, 255))
    rgba.save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.shape == (2, 4) and mask.dtype == np.float32
    assert (mask[0, 0], mask[0, 1], mask[0, 2]) == (1.0, 0.0, np.float32(128 / 255))
    assert not selects_everything(mask) and selects_everything(np.ones((2, 2), np.float32))
    small = model_mask(mask, (8, 4))
    assert small.shape == (1, 1, 4, 8) and small.max() <= 1.0


def test_mask_file_confines_the_edit_and_keeps_the_photo_outside(icd_home, scene_files, tmp_path):
    """--mask with --keep-outside (the default): every pixel the mask leaves black is the photo's (tolerance
    0), the circle inside it changes colour, the square outside keeps its colour; --save-mask writes the
    latent-grid map at the image's size and refuses to replace it afterwards."""
    folder, scene, circle = scene_files
    result = icd(*edit_args(folder / "scene.png", "--mask", folder / "circle.png", "--save-mask", "used.png",
                            "-o", "edit.png"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    edited = np.asarray(Image.open(tmp_path / "edit.png"))
    photo = np.asarray(scene.image)
    assert np.array_equal(edited[~circle], photo[~circle])
    # the circle inside the mask changes colour (mini paints it blue rather than green: its own limit, the
    # same without a mask), the square outside keeps its own
    assert colour_under(Image.open(tmp_path / "edit.png"), scene.objects[0].mask) != "red"
    assert colour_under(Image.open(tmp_path / "edit.png"), scene.objects[1].mask) == "blue"
    meta = read_metadata(tmp_path / "edit.png")
    assert (meta["mask"], meta["keep_outside"]) == (os.path.relpath(folder / "circle.png", tmp_path), True)

    with Image.open(tmp_path / "used.png") as used:
        assert (used.format, used.size, used.mode) == ("PNG", (64, 64), "L")
        used_mask = np.asarray(used)
    assert used_mask[0, 63] == 0 and used_mask[20, 19] == 255  # a far corner kept, the circle's centre edited
    before = (tmp_path / "used.png").read_bytes()
    again = icd(*edit_args(folder / "scene.png", "--mask", folder / "circle.png", "--save-mask", "used.png",
                           "-o", "again.png"), cwd=tmp_path)
    assert again.exit_code == 1
    assert f"icd: error: {folder / 'scene.png'}: used.png exists (use --overwrite to replace it)" \
        in again.stderr
    assert (tmp_path / "used.png").read_bytes() == before and not (tmp_path / "again.png").exists()


def test_save_mask_goes_into_an_existing_folder(icd_home, scene_files, tmp_path):
    """--save-mask names a folder (existing or not) for several results, and an existing folder for one: the
    maps are NAME-edit...-mask.png in it; a second run into the same folder refuses to replace them."""
    folder, _, _ = scene_files
    (tmp_path / "masks").mkdir()
    one = icd(*edit_args(folder / "scene.png", "--mask", folder / "circle.png", "--save-mask", "masks",
                         "-o", "edit.png"), cwd=tmp_path)
    assert one.exit_code == 0, one.output
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["edit-mask.png"]
    args = edit_args(folder / "scene.png", "--mask", folder / "circle.png", "--tgt", "a green circle",
                     "--save-mask", "masks", "-o", "outs")
    two = icd(*args, cwd=tmp_path)
    assert two.exit_code == 0, two.output
    written = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert len(written) == 3 and all(name.endswith("-mask.png") for name in written)
    again = icd(*args, cwd=tmp_path)
    assert again.exit_code == 1 and "exists (use --overwrite" in again.stderr


def test_a_masked_edit_leaves_no_seam(icd_home, tmp_path):
    """An oval mask around an object on sand (background inside it, as a person paints one): the photo's grain
    runs on across the mask's edge. `bench.miniature.seam`: the texture energy just inside the edge over that
    just outside, each relative to the photo's, |log2| under 0.5; the decoder's smooth texture meeting the
    photo's grain gave 2.9 on this scene (an eighth of the grain inside)."""
    spec = random_spec(1000001)  # a held-out scene of the ovals set: a green square on sand
    scene = render(spec)
    mask = oval(scene.objects[0].box, 4, 64)
    scene.image.save(tmp_path / "scene.png")
    mask_image(mask).save(tmp_path / "oval.png")
    result = icd("edit", "scene.png", "--src", spec.caption, "--tgt", spec.edited(colour="yellow").caption,
                 "--mask", "oval.png", *MINI, "-o", "edit.png", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    edited = Image.open(tmp_path / "edit.png")
    assert seam_step(seam_bands(edited, scene.image, mask, scene.objects[0].mask, SEAM_EDGES)) < 0.5
    assert np.array_equal(np.asarray(edited)[~mask], np.asarray(scene.image)[~mask])  # outside: the photo's


def test_no_keep_outside_leaves_the_decoded_pixels(icd_home, scene_files, tmp_path):
    folder, scene, circle = scene_files
    result = icd(*edit_args(folder / "scene.png", "--mask", folder / "circle.png", "--no-keep-outside",
                            "-o", "edit.png"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    edited = np.asarray(Image.open(tmp_path / "edit.png")).astype(int)
    photo = np.asarray(scene.image).astype(int)
    assert not np.array_equal(edited[~circle], photo[~circle])
    assert read_metadata(tmp_path / "edit.png")["keep_outside"] is False


@pytest.mark.parametrize("mask, exit_code, line", [
    ("black.png", 2, "icd: error: --mask: black.png: the mask selects nothing (it is all black): paint white "
                     "where the edit may act"),
    ("missing.png", 2, "icd: error: --mask: missing.png: no such file"),
])
def test_a_mask_that_cannot_act_stops_before_the_model(icd_home, scene_files, tmp_path, mask, exit_code, line):
    folder, _, _ = scene_files
    result = icd(*edit_args(folder / "scene.png", "--mask", folder / mask, "-o", "edit.png"), cwd=tmp_path)
    assert result.exit_code == exit_code
    assert line in result.stderr and "backend" not in result.stderr  # no model was opened
    assert list(tmp_path.iterdir()) == []


def test_an_all_white_mask_is_said(icd_home, scene_files, tmp_path):
    folder, _, _ = scene_files
    result = icd(*edit_args(folder / "scene.png", "--mask", folder / "white.png", "-o", "edit.png"), cwd=tmp_path)
    assert result.exit_code == 0
    assert f"icd: warning: --mask {folder / 'white.png'} selects the whole image (it is all white): the edit is " \
           "not confined" in result.stderr


def test_job_file_rows_take_masks_and_strengths(icd_home, scene_files, tmp_path):
    """A job file's mask (relative to the file) and strength columns; a row whose mask selects nothing fails
    alone, naming its row and the file, before the model loads."""
    folder, scene, circle = scene_files
    for name in ("scene.png", "circle.png", "black.png"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    rows = [{"image": "scene.png", "source": SCENE.caption, "target": TARGET.caption, "mask": "circle.png",
             "strength": 0.75, "output": "good.png", "save_mask": "used.png"},
            {"image": "scene.png", "source": SCENE.caption, "target": TARGET.caption, "mask": "black.png",
             "output": "bad.png"}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = icd("edit", "--jobs", jobs, *MINI, cwd=tmp_path)
    assert result.exit_code == 1
    assert f"icd: error: {jobs} row 2: black.png: the mask selects nothing (it is all black)" in result.stderr
    assert not (tmp_path / "bad.png").exists()
    meta = read_metadata(tmp_path / "good.png")
    assert (meta["strength"], meta["guidance_w"], meta["tau"], meta["cross_replace"], meta["mix"],
            meta["keep_outside"]) == (0.75, 1.5, 0.95, 0.25, 0.75, True)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "good.png"))[~circle], np.asarray(scene.image)[~circle])
    used = np.asarray(Image.open(tmp_path / "used.png"))  # the row's save_mask: the map its edit used
    assert used.shape == (64, 64) and used[0, 63] == 0 and used[20, 19] == 255


@pytest.mark.parametrize("row, message", [
    ({"save_mask": "m.png"}, "row 1: save_mask needs mask or mask_words: nothing else confines an edit"),
    ({"mask_words": "red:green", "save_mask": "out.png", "output": "out.png"},
     "row 1: save_mask out.png is the edit's own output: choose another file"),
    ({"mask_words": "red:green", "save_mask": "second.png"},
     "row 2: second.png is also written by jobs.jsonl row 1: give each result its own name"),
])
def test_job_file_save_mask_is_checked_before_the_model_loads(icd_home, tmp_path, row, message):
    rows = [{"image": "scene.png", "source": SCENE.caption, "target": TARGET.caption, **row},
            {"image": "scene.png", "source": SCENE.caption, "target": TARGET.caption, "output": "second.png"}]
    (tmp_path / "scene.png").write_bytes(b"")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = icd("edit", "--jobs", jobs, *MINI, cwd=tmp_path)
    assert result.exit_code == 2
    assert f"icd: error: jobs.jsonl {message}" in result.stderr.replace(str(tmp_path) + "/", "")


@pytest.mark.parametrize("args, line", [
    (("--keep-outside",), "icd: error: --keep-outside applies with --mask"),
    (("--save-mask", "m.png"), "icd: error: --save-mask needs --mask or --mask-words: nothing else confines an edit"),
    (("--method", "swap", "--mask-words", "red:green"),
     "icd: error: --mask-words/--blend apply to --method p2p, not swap"),
    (("--strength", "1.5"), "Invalid value for '--strength': 1.5 is not in the range 0..1"),
    (("--mask-words", "red:green", "--save-mask", "edit.png"),
     "icd: error: --save-mask edit.png is the edit's own output: choose another file"),
    (("--mask-words", "red:green", "--tgt", "a cat", "--save-mask", "m.png", "-o", "out"),
     "icd: error: --save-mask m.png names one file, but there are 2 results: give a folder"),
])
def test_option_mistakes_are_usage_errors(icd_home, scene_files, tmp_path, args, line):
    folder, _, _ = scene_files
    result = icd(*edit_args(folder / "scene.png", "-o", "edit.png", *args), cwd=tmp_path)  # a later -o wins
    assert result.exit_code == 2 and line in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- mask words: a blend that selects nothing or everything is reported --------------------------------

def test_mask_words_on_mini_say_they_select_everything(icd_home, scene_files, tmp_path):
    """On mini the words' attention is a 4x4 grid, nearly flat: the blend covers the whole image, and says so
    once for the item; the old --blend spelling still works."""
    folder, _, _ = scene_files
    result = icd(*edit_args(folder / "scene.png", "--blend", "red:green", "--save-mask", "blend.png",
                            "-o", "edit.png"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    note = ("icd: warning: scene.png: --mask-words red:green selects the whole image at every step (the words' "
            "attention on a 4x4 grid is above 0.3 everywhere): the edit is not confined; --mask FILE confines it")
    assert result.stderr.count(note) == 1
    assert np.asarray(Image.open(tmp_path / "blend.png")).min() == 255
    assert read_metadata(tmp_path / "edit.png")["blend"] == "red:green"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return character_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_blend_that_selects_nothing_is_reported(tokenizer):
    config = P2PConfig(blend=(("cat",), ("dog",)), blend_threshold=0.3)
    controller = PromptToPrompt(tokenizer, "a cat", "a dog", 2, config, latent_size=(8, 8))
    controller.start(torch.device("cpu"))
    maps = torch.zeros(2, 16)  # no attention on the blend words anywhere (4x4 level)
    x = torch.randn(2, 4, 8, 8)
    for step in range(2):
        controller.observe(maps)
        blended = controller.after_step(step, x)
    assert torch.equal(blended[1], x[0])  # the target is the source everywhere
    assert controller.blend_notes(controller.outcome()) == ["--mask-words cat:dog selects nothing (the words' attention on a 4x4 grid "
                                                            "stays under the threshold 0.3): the result is the "
                                                            "reconstruction"]
    assert torch.equal(controller.blend_mask, torch.zeros(1, 1, 8, 8))


def test_blend_on_a_coarse_grid_is_not_dilated(tokenizer):
    """One attended cell of a 4x4 grid selects that cell only (a 3x3 max-pool would take 9 of 16)."""
    controller = PromptToPrompt(tokenizer, "a cat", "a dog", 1, P2PConfig(blend=(("cat",), ("dog",))),
                                latent_size=(8, 8))
    controller.start(torch.device("cpu"))
    maps = torch.zeros(2, 16)
    maps[:, 5] = 1.0  # cell (1, 1)
    controller.observe(maps)
    controller.after_step(0, torch.randn(2, 4, 8, 8))
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 2:4, 2:4] = 1.0
    assert torch.equal(controller.blend_mask, expected)
    assert controller.blend_notes(controller.outcome()) == []


def test_blend_maps_are_recorded_after_the_edit_as_officially():
    """Hand-made attention: the source attends token 1, the target token 2; the edit maps source token 1 to
    target token 2 and amplifies it x3. The blend maps on target token 2 are the edited ones (3x the source's
    token-1 map), not the target's own: the official attention store keeps references the edit overwrites."""
    length = 4
    source = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4], [0.4, 0.2, 0.2, 0.2], [0.25] * 4])
    target = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    q = torch.stack([source, target]).log()[:, None]  # (2 rows, 1 head, tokens, length)
    k = torch.eye(length).expand(2, 1, length, length)  # scores = q, so softmax(scores) = the maps above
    weights = torch.eye(length)
    weights[1, 1], weights[1, 2], weights[2, 2] = 0.0, 1.0, 0.0  # source token 1 -> target token 2
    equalizer = torch.tensor([1.0, 1.0, 3.0, 1.0])
    blend_columns = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # source word 1, target word 2
    steering = Steering(torch.tensor([True]), torch.zeros(6, dtype=torch.bool), weights,
                        torch.zeros(length, dtype=torch.bool), equalizer, blend_columns)
    steering.cross_attention(q, k, torch.eye(length).expand(2, 1, length, length), 1.0, None, records=True)
    recorded = steering.blend_maps()
    torch.testing.assert_close(recorded[0], source[:, 1])
    torch.testing.assert_close(recorded[1], 3.0 * source[:, 1])
    assert not torch.allclose(recorded[1], target[:, 2])  # what the unedited order would have kept


# --- strength ---------------------------------------------------------------------------------------

def test_strength_mapping():
    """Every knob moves linearly from the reconstruction's end (w 0, every attention map from the source, none
    of the edit kept) to the strongest edit of the model's defaults (its w on every step, no map from the
    source); a knob given as well keeps its own value."""
    manifest = resolve_model("mini")  # its own edit defaults: w 2, tau 0.8
    defaults = model_defaults(manifest)

    def knobs(strength, **given):
        plan = resolve_edit(manifest, Given({"target": "x", "strength": strength, **given}))
        return plan.guidance, plan.tau, plan.p2p.cross_replace, plan.p2p.self_replace, plan.mix

    assert knobs(0.0) == (0.0, defaults.tau, 1.0, 1.0, 0.0)
    assert knobs(1.0) == (defaults.guidance, 1.0, 0.0, 0.0, 1.0)
    assert knobs(0.25) == (0.5, 0.85, 0.75, 0.75, 0.25)
    assert knobs(0.75) == (1.5, 0.95, 0.25, 0.25, 0.75)
    assert knobs(1.0, guidance=7.0, self_replace=0.5, tau=None) == (7.0, 1.0, 0.0, 0.5, 1.0)
    with pytest.raises(ICDError, match="strength must be between 0 and 1, got 1.2"):
        strength_knobs(manifest, 1.2)
    # monotone: each knob only ever moves towards the target (guidance, tau, mix up; the windows down)
    steps = [strength_knobs(manifest, i / 20) for i in range(21)]
    for name, sign in zip(STRENGTH_KNOBS, (1, 1, -1, -1, 1)):
        moves = [sign * (later[name] - earlier[name]) for earlier, later in zip(steps, steps[1:])]
        assert all(move > 0 for move in moves), name
    unset = resolve_edit(manifest, Given({"target": "x"}))  # no strength: the defaults, the whole edit
    assert (unset.guidance, unset.tau, unset.mix, unset.strength) == (defaults.guidance, defaults.tau, 1.0, None)


def test_strength_overrides_the_knobs_of_earlier_sources_only():
    """A --from record's knobs give way to a --strength given later; knobs given with or after it win."""
    manifest = resolve_model("mini")
    record = Given({"target": "x", "guidance": 1.5, "tau": 0.5, "cross_replace": 0.2, "mix": 0.4, "strength": 0.3})
    plan = resolve_edit(manifest, record)  # the record's own knobs win over its own strength
    assert (plan.guidance, plan.tau, plan.p2p.cross_replace, plan.mix, plan.strength) == (1.5, 0.5, 0.2, 0.4, 0.3)
    plan = resolve_edit(manifest, record, Given({"strength": 1.0, "tau": 0.9}))
    assert (plan.guidance, plan.tau, plan.p2p.cross_replace, plan.mix, plan.strength) == (2.0, 0.9, 0.0, 1.0, 1.0)


def test_the_mix_travels_in_records_and_plans():
    """A result records the mix; --from reads it back (a record from before the mix existed was made with the
    whole edit), refusing one out of range; `icd serve` carries it in the plan."""
    manifest = resolve_model("mini")
    plan = edit_plan(manifest, "a", "b", strength=0.3)
    assert plan.record()["mix"] == plan.mix == 0.3
    assert resolve_edit(manifest, recorded(plan.record(), Path("."))) == plan
    assert EditPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    older = {key: value for key, value in plan.record().items() if key != "mix"}
    assert resolve_edit(manifest, recorded(older, Path("."))).mix == 1.0
    with pytest.raises(ValueError, match="its recorded mix 1.5 is outside 0..1"):
        recorded({**plan.record(), "mix": 1.5}, Path("."))


def test_strength_zero_is_the_reconstruction_on_every_method(icd_home, scene_files, tmp_path):
    """--strength 0 decodes what `icd reconstruct` decodes from the same inversion (within one level of 255:
    the edit decodes two rows at once), whatever the method; a little strength already moves it."""
    folder, _, _ = scene_files
    latent = "scene.latent.safetensors"
    assert icd("invert", folder / "scene.png", "--prompt", SCENE.caption, *MINI, "-o", latent,
               cwd=tmp_path).exit_code == 0
    assert icd("reconstruct", latent, *MINI, "-o", "recon.png", cwd=tmp_path).exit_code == 0
    recon = np.asarray(Image.open(tmp_path / "recon.png")).astype(int)
    for method in ("p2p", "swap", "none"):
        for strength in ("0", "0.25"):
            output = f"{method}-{strength}.png"
            result = icd("edit", latent, "--tgt", TARGET.caption, "--method", method, "--strength", strength, *MINI,
                         "-o", output, cwd=tmp_path)
            assert result.exit_code == 0, result.output
            levels = np.abs(np.asarray(Image.open(tmp_path / output)).astype(int) - recon)
            assert levels.max() <= 1 if strength == "0" else levels.mean() > 3, (method, strength, levels.mean())


def test_strength_on_the_command_line_and_explicit_options_win(icd_home, scene_files, tmp_path):
    folder, _, _ = scene_files
    first = icd(*edit_args(folder / "scene.png", "--strength", "1", "--guidance", "3", "-o", "strong.png"),
                cwd=tmp_path)
    assert first.exit_code == 0, first.output
    meta = read_metadata(tmp_path / "strong.png")
    assert (meta["strength"], meta["guidance_w"], meta["tau"], meta["cross_replace"], meta["self_replace"],
            meta["mix"]) == (1.0, 3.0, 1.0, 0.0, 0.0, 1.0)
    # a rerun with another strength: the recorded knobs give way to it, an option given here still wins
    rerun = icd("edit", "--from", tmp_path / "strong.png", "--strength", "0.3", "--self-replace", "0.5", *MINI,
                "-o", "weak.png", cwd=tmp_path)
    assert rerun.exit_code == 0, rerun.output
    meta = read_metadata(tmp_path / "weak.png")
    assert (meta["strength"], meta["guidance_w"], meta["tau"], meta["cross_replace"], meta["self_replace"],
            meta["mix"]) == (0.3, 0.6, 0.86, 0.7, 0.5, 0.3)
    again = icd("edit", "--from", tmp_path / "weak.png", *MINI, "-o", "again.png", cwd=tmp_path)  # the mix read back
    assert again.exit_code == 0, again.output
    assert read_metadata(tmp_path / "again.png")["mix"] == 0.3
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "weak.png").tobytes()


# --- SDXL prompt swap -------------------------------------------------------------------------------

def test_sdxl_swap_keeps_the_target_pooled_embedding(icd_home, monkeypatch):
    """On the unguided steps the swap feeds the source's tokens with the target's pooled embedding (as the
    official SDXL code); the guided steps are the target's alone."""
    session = open_session("tiny-sdxl", device="cpu", dtype="fp32", backend="torch")
    seen = []
    denoiser = session.denoiser("reverse")
    monkeypatch.setattr(session, "denoiser", lambda direction: (
        lambda x, t, cond, w: seen.append((t, cond)) or denoiser(x, t, cond, w)))
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    size = session.model.image_size(x_T)
    source, target = (session.model.encode_text([prompt], size) for prompt in ("a red cat", "a blue dog"))
    plan = edit_plan(session.manifest, "a red cat", "a blue dog", method="swap", guidance=3.0, tau=0.7)
    pipeline.edit(session, x_T, plan)
    assert [t for t, _ in seen] == sorted(session.manifest.reverse_timesteps, reverse=True)
    assert any(t / 1000 > 0.7 for t, _ in seen) and any(t / 1000 <= 0.7 for t, _ in seen)
    for t, cond in seen:
        expected = source if t / 1000 > 0.7 else target
        assert torch.equal(cond.embeds, expected.embeds)
        assert torch.equal(cond.pooled, target.pooled) and torch.equal(cond.time_ids, target.time_ids)
    assert not torch.equal(source.pooled, target.pooled)


# --- icd serve --------------------------------------------------------------------------------------

def test_masks_go_through_icd_serve(icd_home, tmp_path):
    """The client sends the mask's array and gets the map and the reconstruction back: a served masked edit
    equals the in-process one bit for bit (the server's answer runs on the far end of a socket pair, as in
    `icd serve`)."""
    runner = LocalRunner(open_session("tiny", device="cpu", dtype="fp32", backend="torch"))
    near, far = socket.socketpair()

    def serve_one():
        send(far, *answer(runner, decode_request(*receive(far))))

    worker = threading.Thread(target=serve_one, daemon=True)
    worker.start()
    facts = {"backend": runner.backend, "dtype": runner.dtype, "size_multiple": runner.size_multiple}
    remote = RemoteRunner(near, facts, runner.manifest, tmp_path / "x.sock")
    x_T = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 64, 64), np.float32)
    mask[..., 8:40, 8:40] = 1.0
    plan = edit_plan(runner.manifest, "a red cat", "a blue cat", method="none", guidance=3.0, tau=0.8)
    served = remote.run(Edit(x_T, plan, mask, with_reconstruction=True))
    worker.join(60)
    here = runner.run(Edit(x_T, plan, mask, with_reconstruction=True))
    assert np.array_equal(served.pixels, as_array(here.pixels)) and served.notes == here.notes == []
    assert np.array_equal(served.mask, as_array(here.mask)) and served.mask.shape == (1, 1, 8, 8)
    assert np.array_equal(served.reconstruction, as_array(here.reconstruction))
    assert served.reconstruction.shape == (1, 3, 64, 64)
    assert not np.array_equal(served.pixels, as_array(runner.run(Edit(x_T, plan)).pixels))  # the mask acted
    near.close()
    far.close()
