"""icd eval's metrics against values worked out by hand on small arrays, the checks' judges, and the metrics
that need a model, with tiny random transformers models saved to folders (offline)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icd.errors import UsageError
from icd.evaluation.checks import PSNR_CAP, Check, run_checks, shape_of
from icd.evaluation.datasets import EvalItem
from icd.evaluation.metrics import Evaluator, Sample, metric_names

MINI_TOKENIZER = Path(__file__).parents[1] / "icdcli" / "assets" / "mini" / "base" / "tokenizer"
PLAIN = ["psnr", "mse", "ssim"]


def item(**fields) -> EvalItem:
    return EvalItem("x", Path("x.png"), "x.png", "a red circle", "a blue circle", **fields)


def flat(value: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def measure(names, source, edit, mask=None, models=None, **fields):
    return Evaluator(names, models).measure(Sample(source, edit, mask, item(**fields)))


def test_identical_images_are_perfect():
    assert measure(PLAIN, flat(90), flat(90)) == {"psnr": PSNR_CAP, "mse": 0.0, "ssim": pytest.approx(100.0, abs=0.01)}  # float32 rounding


def test_a_known_shift():
    """Flat images 100 and 125 of 255: MSE (25/255)^2; SSIM of flat images is the luminance term alone."""
    a, b = 100 / 255, 125 / 255
    mse = (b - a) ** 2
    values = measure(PLAIN, flat(100), flat(125))
    assert values["mse"] == pytest.approx(1e4 * mse, rel=1e-5)  # 96.12
    assert values["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)  # 20.17 dB
    assert values["ssim"] == pytest.approx(100 * (2 * a * b + 0.01**2) / (a**2 + b**2 + 0.01**2), rel=1e-4)


def test_the_unedited_part_under_a_mask():
    """PIE-Bench zeroes the masked pixels and keeps the mean over the whole image: half masked, half the MSE."""
    mask = np.zeros((32, 32), np.float32)
    mask[:, 16:] = 1.0
    edit = flat(100)
    edit[:, 16:] = 0  # what happens under the mask does not count
    edit[:, :16] = 125
    mse = (25 / 255) ** 2 / 2
    values = measure(PLAIN, flat(100), edit, mask)
    assert values["mse"] == pytest.approx(1e4 * mse, rel=1e-5)
    assert values["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)


def test_a_mask_covering_everything_or_nothing():
    everything, nothing = np.ones((32, 32), np.float32), np.zeros((32, 32), np.float32)
    assert measure(PLAIN, flat(100), flat(125), everything) == {"psnr": None, "mse": None, "ssim": None}
    assert measure(PLAIN, flat(100), flat(125), nothing) == measure(PLAIN, flat(100), flat(125))


def test_images_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="the edit is 16x16, the photo 32x32"):
        measure(PLAIN, flat(100), flat(100, 16))


def test_metric_selection():
    assert metric_names("pie", "folder", False) == ["structure", "psnr", "lpips", "mse", "ssim", "clip_whole",
                                                    "clip_edited"]
    assert metric_names("auto", "authors", True)[:3] == ["clip_t", "clip_i", "dinov2"]
    assert metric_names("auto", "folder", True)[-2:] == ["checks", "psnr_target"]
    assert metric_names("psnr, ssim,psnr", "pie-bench", False) == ["psnr", "ssim"]
    with pytest.raises(UsageError, match="--metrics: unknown 'clip' \\(sets: pie, authors, checks"):
        metric_names("clip", "pie-bench", False)


def test_a_missing_metric_model_is_one_line_and_the_others_run(tmp_path):
    evaluator = Evaluator(["clip_t", "clip_i", "psnr", "dinov2"],
                          {"clip": "nobody/no-such-clip", "dinov2": str(tmp_path / "nothing")})
    assert evaluator.names == ["psnr"]
    clip, dinov2 = evaluator.unavailable
    assert clip.startswith("metrics clip_t, clip_i not measured: nobody/no-such-clip is not available here")
    assert "`hf download nobody/no-such-clip`" in clip and "--clip-model FOLDER" in clip
    assert dinov2 == f"metric dinov2 not measured: --dinov2-model {tmp_path / 'nothing'}: no such folder"
    assert evaluator.measure(Sample(flat(9), flat(9), None, item())) == {"psnr": PSNR_CAP}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_lpips_without_torchvision_says_how_to_get_it():
    evaluator = Evaluator(["psnr", "lpips"])
    assert evaluator.names == ["psnr"]
    assert evaluator.unavailable[0].startswith("metric lpips not measured: LPIPS needs torchvision")


# --- the checks' judges ----------------------------------------------------------------------------

PALETTES = {"colours": {"red": (220, 30, 30), "blue": (30, 60, 230)}, "backgrounds": {"sandy": (215, 180, 130)}}


def scene(shape: str) -> np.ndarray:
    """A sandy 32x32 picture with one blue shape of 16 pixels across."""
    image = np.tile(np.asarray(PALETTES["backgrounds"]["sandy"], np.uint8), (32, 32, 1))
    rows, cols = np.mgrid[:32, :32]
    inside = {"square": (abs(rows - 16) < 8) & (abs(cols - 16) < 8),
              "circle": (rows - 16) ** 2 + (cols - 16) ** 2 < 64,
              "triangle": (rows >= 8) & (rows < 24) & (abs(cols - 16) <= (rows - 8) / 2)}[shape]
    image[inside] = PALETTES["colours"]["blue"]
    return image


def judge(checks: list[dict], edit: np.ndarray, source: np.ndarray, regions: dict[str, np.ndarray]):
    return run_checks([Check(**check) for check in checks], edit, source, PALETTES, regions.__getitem__)


def test_colour_and_shape_judges():
    centre, corner = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    centre[12:20, 12:20], corner[:4, :4] = True, True
    square = scene("square")
    values = judge([{"name": "blue", "kind": "colour", "region": "c", "palette": "colours", "expect": "blue"},
                    {"name": "red", "kind": "colour", "region": "c", "palette": "colours", "expect": "red"},
                    {"name": "sand", "kind": "colour", "region": "k", "palette": "backgrounds", "expect": "sandy"},
                    {"name": "square", "kind": "shape", "colour": "blue", "expect": "square"},
                    {"name": "circle", "kind": "shape", "colour": "blue", "expect": "circle"}],
                   square, square, {"c": centre, "k": corner})
    assert values == {"blue": 1.0, "red": 0.0, "sand": 1.0, "square": 1.0, "circle": 0.0}
    assert [shape_of(np.all(scene(shape) == PALETTES["colours"]["blue"], axis=-1)) for shape in
            ("square", "circle", "triangle")] == ["square", "circle", "triangle"]


def test_psnr_checks_in_a_region_and_checks_of_one_name_combined():
    region, empty = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    region[:8] = True
    edit = flat(100)
    edit[:8] = 110  # 10 levels off inside the region, identical outside
    values = judge([{"name": "inside", "kind": "psnr", "region": "r"}, {"name": "outside", "kind": "psnr"},
                    {"name": "none", "kind": "psnr", "region": "e"},
                    {"name": "mean", "kind": "psnr", "region": "r"}, {"name": "mean", "kind": "psnr", "region": "o"},
                    {"name": "all", "kind": "colour", "region": "r", "palette": "colours", "expect": "red"},
                    {"name": "all", "kind": "colour", "region": "r", "palette": "colours", "expect": "blue"}],
                   edit, flat(100), {"r": region, "e": empty, "o": ~region})
    inside = 10 * math.log10(255**2 / 10**2)  # 28.13 dB
    assert values["inside"] == pytest.approx(inside)
    assert values["outside"] == pytest.approx(10 * math.log10(255**2 / (10**2 / 4)))  # a quarter of the pixels
    assert values["none"] is None
    assert values["mean"] == pytest.approx((inside + PSNR_CAP) / 2)
    assert values["all"] == 0.0  # one of the two failed


def test_a_check_says_what_it_lacks():
    with pytest.raises(ValueError, match="a colour check needs palette, expect"):
        Check(name="x", kind="colour", region="r.png")
    with pytest.raises(ValueError, match="a shape check expects one of circle, square, triangle"):
        Check(name="x", kind="shape", colour="blue", expect="hexagon")


# --- metrics with a model: tiny random ones, saved to folders --------------------------------------------

@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer, Dinov2Config, Dinov2Model, ViTConfig, ViTModel)

    root = tmp_path_factory.mktemp("metric-models")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(MINI_TOKENIZER)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "projection_dim": 16,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    CLIPModel(CLIPConfig(text_config=text, vision_config={**small, "image_size": 32, "patch_size": 8,
                                                          "projection_dim": 16}, projection_dim=16)).save_pretrained(root / "clip")
    crop = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    CLIPProcessor(image_processor=CLIPImageProcessor(**crop), tokenizer=tokenizer).save_pretrained(root / "clip")
    ViTModel(ViTConfig(**small, image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    Dinov2Model(Dinov2Config(**small, image_size=32, patch_size=8)).save_pretrained(root / "dinov2")
    BitImageProcessor(**crop).save_pretrained(root / "dinov2")
    return {name: str(root / name) for name in ("clip", "dino", "dinov2")}


def photo(seed: int, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_clip_metrics(metric_models):
    from transformers import CLIPModel, CLIPProcessor

    names = ["clip_whole", "clip_edited", "clip_t", "clip_i"]
    source, edit = photo(1), photo(2)
    values = measure(names, source, edit, models=metric_models)
    model, processor = CLIPModel.from_pretrained(metric_models["clip"]), CLIPProcessor.from_pretrained(metric_models["clip"])
    with torch.no_grad():
        image = model.get_image_features(**processor(images=[edit], return_tensors="pt")).pooler_output
        tokens = processor(text=["a blue circle"], return_tensors="pt")
        words = model.get_text_features(**tokens).pooler_output
    cosine = F.cosine_similarity(image, words).item()
    assert values["clip_t"] == pytest.approx(cosine, abs=1e-5)
    assert values["clip_whole"] == pytest.approx(max(0.0, 100 * cosine), abs=1e-3)
    assert values["clip_edited"] is None  # no mask: no edited part
    assert measure(names, edit, edit, models=metric_models)["clip_i"] == pytest.approx(1.0, abs=1e-5)
    everywhere = measure(names, source, edit, np.ones((224, 224), np.float32), metric_models)
    assert everywhere["clip_edited"] == pytest.approx(values["clip_whole"], abs=1e-3)


def test_structure_distance_from_the_last_blocks_keys(metric_models):
    """The keys of every token taken from the last block, independently: its input, layer norm, key projection."""
    from transformers import ViTModel

    source, edit = photo(3), photo(4)
    model = ViTModel.from_pretrained(metric_models["dino"], add_pooling_layer=False).eval()

    def similarity(pixels: np.ndarray) -> torch.Tensor:
        mean, std = np.asarray([0.485, 0.456, 0.406]), np.asarray([0.229, 0.224, 0.225])
        values = torch.from_numpy(((pixels / 255 - mean) / std).transpose(2, 0, 1)[None]).float()
        with torch.no_grad():
            hidden = model(pixel_values=values, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
            last = model.layers[-1] if hasattr(model, "layers") else model.encoder.layer[-1]
            projection = last.attention.k_proj if hasattr(last.attention, "k_proj") else last.attention.attention.key
            keys = F.normalize(projection(last.layernorm_before(hidden[-2]))[0], dim=-1)
        assert keys.shape[0] == (224 // 8) ** 2 + 1  # every patch and the class token
        return keys @ keys.T

    expected = 1e3 * F.mse_loss(similarity(edit), similarity(source)).item()
    assert measure(["structure"], source, edit, models=metric_models)["structure"] == pytest.approx(expected, rel=1e-4)
    assert measure(["structure"], source, source, models=metric_models)["structure"] == 0.0


def test_dinov2_cosine(metric_models):
    from transformers import AutoImageProcessor, AutoModel

    source, edit = photo(5, 48), photo(6, 48)
    model, processor = AutoModel.from_pretrained(metric_models["dinov2"]), AutoImageProcessor.from_pretrained(
        metric_models["dinov2"])
    with torch.no_grad():
        pooled = [model(**processor(images=[x], return_tensors="pt")).pooler_output for x in (edit, source)]
    expected = F.cosine_similarity(*pooled).item()
    assert measure(["dinov2"], source, edit, models=metric_models)["dinov2"] == pytest.approx(expected, abs=1e-5)
    assert measure(["dinov2"], source, source, models=metric_models)["dinov2"] == pytest.approx(1.0, abs=1e-5)


def test_a_metric_model_missing_weights_is_refused(metric_models, tmp_path):
    """Weights missing from a model's files would be random: the metric is not measured, and says why."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "dinov2"
    shutil.copytree(metric_models["dinov2"], broken)
    weights = load_file(broken / "model.safetensors")
    dropped = sorted(name for name in weights if name.endswith("layernorm.weight"))[-1]
    save_file({name: value for name, value in weights.items() if name != dropped}, broken / "model.safetensors",
              metadata={"format": "pt"})
    evaluator = Evaluator(["dinov2", "mse"], {"dinov2": str(broken)})
    assert evaluator.names == ["mse"]
    assert evaluator.unavailable == [f"metric dinov2 not measured: {broken}: 1 weight(s) missing from its files "
                                     f"(e.g. {dropped}): not the model this metric needs"]
