"""The editing metrics, named and selectable, in the units the benchmarks report them in.

PIE-Bench's (Ju et al., ICLR 2024): `structure`, the MSE (x10^3) between the cosine self-similarity matrices of
DINO ViT-B/8's last-block keys (every token, heads side by side) of source and edit; `psnr`, `lpips` (x10^3),
`mse` (x10^4) and `ssim` (x10^2) on the unedited part (both images times 1 - mask, means over the whole image;
None when the mask covers everything); `clip_whole` and `clip_edited`, the CLIP score (100 x cosine, 0 at
least) of the edit, and of the edit times the mask, against the target prompt. The iCD authors': `clip_t` and
`clip_i`, raw CLIP ViT-L/14 cosines of the edit with the target prompt and with the source photo; `dinov2`, of
DINOv2's pooled features; `image_reward`. Data sets that know more: `checks` (icd.evaluation.checks) and
`psnr_target` (against the true result).

Every PSNR stops at checks.PSNR_CAP. A metric model (hub id or folder) that cannot be loaded is one line on how
to get it, and the metrics that need no model still run. Images are compared at the source photo's size.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from icd.errors import UsageError, first_line
from icd.images import load_image
from icd.masks import read_mask, resize

from . import DEFAULT_MODELS
from .checks import PSNR_CAP, psnr, run_checks
from .datasets import EvalItem


@dataclass(frozen=True)
class MetricInfo:
    heading: str  # the column of the summary tables, with the unit
    higher_is_better: bool
    model: str | None = None  # the metric model it needs (a key of DEFAULT_MODELS), or a library
    percent: bool = False  # a success rate: shown as a percentage
    digits: int = 2  # decimals in the tables


METRICS = {
    "structure": MetricInfo("Structure x10^3", False, "dino"),
    "psnr": MetricInfo("PSNR", True),
    "lpips": MetricInfo("LPIPS x10^3", False, "lpips"),
    "mse": MetricInfo("MSE x10^4", False),
    "ssim": MetricInfo("SSIM x10^2", True),
    "clip_whole": MetricInfo("CLIP Whole", True, "clip"),
    "clip_edited": MetricInfo("CLIP Edited", True, "clip"),
    "clip_t": MetricInfo("CLIP-T", True, "clip", digits=3),
    "clip_i": MetricInfo("CLIP-I", True, "clip", digits=3),
    "dinov2": MetricInfo("DINOv2", True, "dinov2", digits=3),
    "image_reward": MetricInfo("ImageReward", True, "image_reward"),
    "checks": MetricInfo("checks", True),
    "psnr_target": MetricInfo("PSNR to target", True),
}
UNEDITED = ("psnr", "lpips", "mse", "ssim")
SETS = {"pie": ("structure", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited"),
        "authors": ("clip_t", "clip_i", "dinov2"), "checks": ("checks", "psnr_target")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_SHORT_SIDE, DINO_LONG_SIDE = 224, 480


def has_image_reward() -> bool:
    return importlib.util.find_spec("ImageReward") is not None


def metric_names(spec: str, dataset_kind: str, has_checks: bool) -> list[str]:
    """`--metrics`: set names (pie, authors, checks) and metric names, comma-separated; `auto` is PIE-Bench's
    set on PIE-Bench, the authors' on their CSVs, and both on a folder (with its checks when it has some)."""
    if spec == "auto":
        parts = {"pie-bench": ["pie"], "authors": ["authors"]}.get(dataset_kind, ["pie", "authors"])
        parts += ["checks"] if has_checks else []
    else:
        parts = [part.strip() for part in spec.split(",") if part.strip()]
    names = []
    for part in parts:
        if part in SETS:
            names += [*SETS[part], *(["image_reward"] if part == "authors" and has_image_reward() else [])]
        elif part in METRICS:
            names.append(part)
        else:
            raise UsageError(f"--metrics: unknown '{part}' (sets: {', '.join(SETS)}; metrics: {', '.join(METRICS)})")
    return list(dict.fromkeys(names))


@dataclass
class Sample:
    """What every metric reads: the source photo and the edit as (H, W, 3) uint8 arrays of one size."""

    source: np.ndarray
    edit: np.ndarray
    mask: np.ndarray | None  # (H, W) float32 in [0, 1], 1 where the edit should act
    item: EvalItem


class MetricModelMissing(Exception):
    """A metric model that cannot be loaded here; the message says how to get it."""


def _pretrained(loader, ref: str, **options):
    """A model from its folder or hub id, refused when its files lack weights the model needs: those would be
    random, and the metric a number that means nothing."""
    model, info = loader.from_pretrained(ref, output_loading_info=True, **options)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise MetricModelMissing(f"{ref}: {len(missing)} weight(s) missing from its files (e.g. {missing[0]}): not "
                                 "the model this metric needs")
    return model.eval()


def _as_features(output) -> torch.Tensor:
    """transformers 4 returns CLIP's projected features as a tensor, 5 as the pooled output of a model output
    (also why torchmetrics 1.9's CLIPScore fails on transformers 5, torchmetrics issue 3407)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Clip:
    def __init__(self, ref: str, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        self.model = _pretrained(CLIPModel, ref).to(device)
        self.processor = CLIPProcessor.from_pretrained(ref)
        self.device = device

    def image(self, pixels: np.ndarray) -> torch.Tensor:
        inputs = self.processor(images=[pixels], return_tensors="pt")
        return F.normalize(_as_features(self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.device))), dim=-1)[0]

    def text(self, prompt: str) -> torch.Tensor:
        """Truncated to the text model's length (77 tokens); padding after the end token changes nothing."""
        tokens = self.processor(text=[prompt], padding="max_length", truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings)
        return F.normalize(_as_features(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device))), dim=-1)[0]


class DinoKeys:
    """DINO ViT's last-block keys: resized so the short side is 224 (the long one at most 480), ImageNet-
    normalised, every token's key (heads side by side) taken from the last key projection."""

    def __init__(self, ref: str, device: torch.device):
        from transformers import ViTModel

        self.model = _pretrained(ViTModel, ref, add_pooling_layer=False).to(device)
        projections = [module for name, module in self.model.named_modules()
                       if name.endswith(("k_proj", "attention.key"))]
        if not projections:
            raise MetricModelMissing(f"{ref}: no key projection found in its attention layers")
        self.keys: list[torch.Tensor] = []
        projections[-1].register_forward_hook(lambda module, inputs, output: self.keys.append(output))
        self.device = device

    def self_similarity(self, pixels: np.ndarray) -> torch.Tensor:
        height, width = pixels.shape[:2]
        scale = min(DINO_SHORT_SIDE / min(height, width), DINO_LONG_SIDE / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR), np.float32) / 255
        normalised = (resized - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        self.keys.clear()
        self.model(pixel_values=torch.from_numpy(normalised.transpose(2, 0, 1)[None]).to(self.device),
                   interpolate_pos_encoding=True)
        keys = F.normalize(self.keys[-1][0], dim=-1)
        return keys @ keys.T


class Dinov2:
    def __init__(self, ref: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel

        self.model = _pretrained(AutoModel, ref).to(device)
        self.processor = AutoImageProcessor.from_pretrained(ref)
        self.device = device

    def features(self, pixels: np.ndarray) -> torch.Tensor:
        inputs = self.processor(images=[pixels], return_tensors="pt")
        return F.normalize(self.model(pixel_values=inputs["pixel_values"].to(self.device)).pooler_output, dim=-1)[0]


class ImageRewardScorer:
    def __init__(self, ref: str, device: torch.device):
        import ImageReward

        self.model = ImageReward.load(ref, device=str(device))

    def score(self, prompt: str, pixels: np.ndarray) -> float:
        return float(self.model.score(prompt, Image.fromarray(pixels)))


def _lpips(ref: str, device: torch.device):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="squeeze", normalize=False).eval().to(device)


LOADERS: dict[str, Callable] = {"clip": Clip, "dino": DinoKeys, "dinov2": Dinov2, "image_reward": ImageRewardScorer,
                                "lpips": _lpips}
HOW_TO_GET = {
    "lpips": "LPIPS needs torchvision (install the build that matches your torch, e.g. `pip install torchvision` "
             "from the index your torch came from) and fetches its SqueezeNet weights once",
    "image_reward": "install the `image-reward` package; it fetches ImageReward-v1.0 once",
}


def _load(model: str, ref: str, device: torch.device):
    """A metric model, or MetricModelMissing with one line on how to get it."""
    looks_local = ref.startswith((".", "/", "~")) or Path(ref).exists()
    if looks_local and not Path(ref).expanduser().is_dir():
        raise MetricModelMissing(f"--{model.replace('_', '-')}-model {ref}: no such folder")
    try:
        return LOADERS[model](str(Path(ref).expanduser()) if looks_local else ref, device)
    except ImportError as err:
        raise MetricModelMissing(f"{HOW_TO_GET.get(model, '')} ({err})") from None
    except (OSError, ValueError, RuntimeError) as err:
        how = HOW_TO_GET.get(model) or (f"download it once with network (`hf download {ref}`), or give "
                                        f"--{model.replace('_', '-')}-model FOLDER with a local copy")
        reason = first_line(err)
        raise MetricModelMissing(f"{ref} is not available here ({reason[:160]}): {how}") from None


class Evaluator:
    """The selected metrics with their models loaded once; `unavailable` holds a line for each model that
    could not be loaded, and its metrics are dropped from `names`."""

    def __init__(self, names: list[str], models: dict[str, str] | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        refs = {**DEFAULT_MODELS, **{key: value for key, value in (models or {}).items() if value}}
        self.models, self.unavailable = {}, []
        for model in dict.fromkeys(METRICS[name].model for name in names if METRICS[name].model):
            try:
                self.models[model] = _load(model, refs.get(model, model), self.device)
            except MetricModelMissing as err:
                dropped = [name for name in names if METRICS[name].model == model]
                self.unavailable.append(f"metric{'s' if len(dropped) > 1 else ''} {', '.join(dropped)} not "
                                        f"measured: {err}")
        self.names = [name for name in names if METRICS[name].model in (None, *self.models)]

    def expected(self, item: EvalItem) -> set[str]:
        """The metrics a record of this item gets: a record that lacks one is measured again."""
        names = {name for name in self.names if name not in SETS["checks"]}
        names |= {check.name for check in item.checks} if "checks" in self.names else set()
        return names | ({"psnr_target"} if "psnr_target" in self.names and item.target_image is not None else set())

    @torch.inference_mode()
    def measure(self, sample: Sample) -> dict[str, float | None]:
        if sample.source.shape != sample.edit.shape:
            raise ValueError(f"the edit is {sample.edit.shape[1]}x{sample.edit.shape[0]}, the photo "
                             f"{sample.source.shape[1]}x{sample.source.shape[0]}")
        values: dict[str, float | None] = {}
        if set(UNEDITED) & set(self.names):
            values |= self._unedited(sample)
        if "clip" in self.models:
            values |= self._clip(sample)
        if "dino" in self.models:
            dino = self.models["dino"]
            values["structure"] = 1e3 * F.mse_loss(dino.self_similarity(sample.edit),
                                                   dino.self_similarity(sample.source)).item()
        if "dinov2" in self.models:
            dinov2 = self.models["dinov2"]
            values["dinov2"] = float(dinov2.features(sample.edit) @ dinov2.features(sample.source))
        if "image_reward" in self.models:
            values["image_reward"] = self.models["image_reward"].score(sample.item.target, sample.edit)
        if "checks" in self.names:
            values |= _checks(sample)
        if "psnr_target" in self.names and sample.item.target_image is not None:
            values["psnr_target"] = psnr(sample.edit, _picture(sample.item.target_image, sample.edit.shape))
        return {name: value for name, value in values.items() if name in self.names or name not in METRICS}

    def _unedited(self, sample: Sample) -> dict[str, float | None]:
        keep = np.ones(sample.source.shape[:2], np.float32) if sample.mask is None else 1.0 - sample.mask
        if not keep.any():
            return dict.fromkeys(UNEDITED)
        weight = torch.from_numpy(keep)[None, None].to(self.device)
        source, edit = (_tensor(pixels, self.device) * weight for pixels in (sample.source, sample.edit))
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        values = {"psnr": min(PSNR_CAP, peak_signal_noise_ratio(edit, source, data_range=1.0).item()),
                  "mse": 1e4 * F.mse_loss(edit, source).item(),
                  "ssim": 1e2 * structural_similarity_index_measure(edit, source, data_range=1.0).item()}
        if "lpips" in self.models:
            values["lpips"] = 1e3 * self.models["lpips"](edit * 2 - 1, source * 2 - 1).item()
        return values

    def _clip(self, sample: Sample) -> dict[str, float | None]:
        clip = self.models["clip"]
        edit, text = clip.image(sample.edit), clip.text(sample.item.target)
        values = {"clip_whole": max(0.0, 100 * float(edit @ text)), "clip_t": float(edit @ text),
                  "clip_i": float(edit @ clip.image(sample.source)), "clip_edited": None}
        if sample.mask is not None and sample.mask.any():
            masked = np.rint(sample.edit * sample.mask[..., None]).astype(np.uint8)
            values["clip_edited"] = max(0.0, 100 * float(clip.image(masked) @ text))
        return values


def _tensor(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].to(device).float() / 255


def _picture(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A picture of the data set as (H, W, 3) uint8 at the given array shape."""
    image = load_image(path).rgb
    if image.size != (shape[1], shape[0]):
        image = image.resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _checks(sample: Sample) -> dict[str, float | None]:
    """The item's checks, each region picture read as a boolean mask of the images' size (white = inside)."""
    item, size = sample.item, (sample.edit.shape[1], sample.edit.shape[0])
    return run_checks(item.checks, sample.edit, sample.source, item.palettes,
                      lambda region: resize(read_mask(item.root / region), size) >= 0.5)


def check_infos(items: list[EvalItem]) -> dict[str, MetricInfo]:
    """The headings of the data set's own checks: judges are success rates, PSNRs are dB."""
    kinds = {check.name: check.kind for item in items for check in item.checks}
    infos = {name: MetricInfo(name, True, percent=kind != "psnr") for name, kind in kinds.items()}
    if any(item.target_image is not None for item in items):
        infos["psnr_target"] = METRICS["psnr_target"]
    return infos
