"""The miniature world: deterministic scenes, captions, masks and judges, edits, the word-level tokenizer,
the imagefolder writer, and a smoke run of the base model's pretraining (bench/miniature/pretrain.py)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.miniature.world import (BACKGROUNDS, COLOURS, DEMO_SCENE, DEMO_TARGET, SHAPES, background_of, colour_under,
                                   follows, random_scene, random_spec, render, shape_of, vocabulary, world_tokenizer,
                                   write_imagefolder)
from icd.models.loading import Model
from icd.models.manifest import parse_manifest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench" / "miniature"))
import pretrain  # noqa: E402

SEEDS = range(40)


def dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return np.any([padded[i:i + mask.shape[0], j:j + mask.shape[1]] for i in range(3) for j in range(3)], axis=0)


def changed(a, b) -> np.ndarray:
    return np.any(np.asarray(a) != np.asarray(b), axis=-1)


def test_same_seed_same_scene_bytes():
    first, second = random_scene(11), random_scene(11)
    assert first.image.tobytes() == second.image.tobytes()
    assert all((a.mask == b.mask).all() for a, b in zip(first.objects, second.objects))
    assert random_scene(12).image.tobytes() != first.image.tobytes()


def test_captions_follow_the_template_and_vocabulary():
    assert random_scene(0).caption == "a red square and a black circle on a sandy background"
    for seed in SEEDS:
        scene = random_scene(seed)
        things = " and ".join(f"a {t.colour} {t.shape}" for t in scene.objects)
        assert scene.caption == f"{things} on a {scene.background} background"
        assert 1 <= len(scene.objects) <= 2 and len({t.colour for t in scene.objects}) == len(scene.objects)
        assert set(scene.caption.split()) <= set(vocabulary())
        assert scene.image.size == (64, 64)


def test_judges_read_back_what_was_drawn():
    for seed in SEEDS:
        scene = random_scene(seed)
        masks = [t.mask for t in scene.objects]
        assert background_of(scene.image, masks) == background_of(scene.image) == scene.background
        for thing in scene.objects:
            assert thing.mask.sum() > 40
            assert colour_under(scene.image, thing.mask) == thing.colour
            left, top, right, bottom = thing.box
            assert not thing.mask[:top].any() and not thing.mask[bottom:].any() and not thing.mask[:, right:].any()
        if len(scene.objects) == 1:
            assert shape_of(scene.objects[0].mask) == scene.objects[0].shape
        assert all(follows(scene.image, scene.spec).values())


def test_colour_swap_changes_only_the_object():
    for seed in SEEDS:
        spec = random_spec(seed)
        before = render(spec)
        new = next(c for c in COLOURS if c not in {o.colour for o in spec.objects})
        after = render(spec.edited(0, colour=new))
        mask = before.objects[0].mask
        assert after.objects[0].colour == new and colour_under(after.image, mask) == new
        diff = changed(before.image, after.image)
        assert diff[mask].all()  # every pixel of the object changed ...
        # ... and nothing beyond its anti-aliased edge (two pixels where a front object's edge crosses it)
        assert not diff[~dilate(dilate(mask))].any()
        for old, kept in zip(before.objects[1:], after.objects[1:]):
            assert colour_under(after.image, kept.mask) == old.colour


def test_shape_and_background_swaps():
    spec = random_spec(1)  # a white square on a snowy background
    assert [o.shape for o in spec.objects] == ["square"]
    for shape in SHAPES:
        assert shape_of(render(spec.edited(0, shape=shape)).objects[0].mask) == shape
    before = render(spec)
    mask = before.objects[0].mask
    for background in BACKGROUNDS:
        after = render(spec.edited(background=background))
        assert background_of(after.image, [mask]) == background and after.caption.endswith(f"{background} background")
        inner = ~dilate(~mask)
        assert not changed(before.image, after.image)[inner].any()


def test_world_tokenizer_has_one_token_per_word(tmp_path):
    tokenizer = world_tokenizer(tmp_path)
    for word in vocabulary():
        assert tokenizer.tokenize(word) == [word + "</w>"]
    caption = random_scene(7).caption
    ids = tokenizer(caption).input_ids
    assert len(ids) == len(caption.split()) + 2 and ids[0] == 0 and ids[-1] == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert len(tokenizer(caption, padding="max_length", max_length=77).input_ids) == tokenizer.model_max_length == 77
    assert tokenizer.tokenize("dog") == ["d", "o", "g</w>"]  # other words are spelled out, not unknown


def test_imagefolder_writer(tmp_path):
    from icd_train.data import read_examples

    metadata = write_imagefolder(tmp_path, [3, 5], size=32)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert rows == [{"file_name": "0000003.png", "text": random_scene(3).caption, "seed": 3},
                    {"file_name": "0000005.png", "text": random_scene(5).caption, "seed": 5}]
    from PIL import Image

    assert Image.open(tmp_path / "0000005.png").tobytes() == random_scene(5, size=32).image.tobytes()
    assert [e.caption for e in read_examples(tmp_path)] == [row["text"] for row in rows]


def test_the_shipped_mini_model_demos_a_scene_of_its_world():
    from PIL import Image

    from icd.models.hub import resolve_model

    manifest = resolve_model("mini")
    image, source, target = manifest.demo
    assert (source, target) == (DEMO_SCENE.caption, DEMO_TARGET.caption) == (
        "a red circle on a sandy background", "a blue circle on a sandy background")
    with Image.open(image) as shipped:
        assert shipped.convert("RGB").tobytes() == render(DEMO_SCENE, manifest.resolution).image.tobytes()
    assert DEMO_SCENE.seed >= 4000  # not one of the training scenes (seeds 0-3999)


def test_pretraining_smoke_run_loads_in_diffusers_and_icd(tmp_path):
    from diffusers import StableDiffusionPipeline

    summary = pretrain.pretrain(tmp_path, steps_vae=2, steps_unet=2, images=4, size=64, device="cpu")
    assert math.isfinite(summary["vae_loss"]) and math.isfinite(summary["unet_loss"])
    assert json.loads((tmp_path / "pretrain.json").read_text())["steps_unet"] == 2

    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert pipeline.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert pipeline.scheduler.config.steps_offset == 1 and pipeline.unet.config.sample_size == 8
    assert pipeline.tokenizer.tokenize("a triangle on a grassy background")[1:3] == ["triangle</w>", "on</w>"]
    image = pipeline("a red circle on a sandy background", num_inference_steps=2, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    manifest = parse_manifest({"kind": "sd15", "base": str(tmp_path), "forward_timesteps": [19, 259, 519, 779],
                               "reverse_timesteps": [259, 519, 779, 999], "resolution": 64}, tmp_path, "test")
    model = Model.load(manifest, torch.device("cpu"), torch.float32)
    assert model.size_multiple == 16
    assert model.encode_text(["a red circle on a sandy background"], (64, 64)).embeds.shape == (1, 77, 64)
    assert model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 8, 8)
