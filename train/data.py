"""Training data: a folder of images with captions, as Hugging Face `imagefolder` metadata (`metadata.jsonl` or
`metadata.csv` with `file_name` and `text`) or the official CSV (`file_name`, `caption`).

Images are opened with icd.images.load_image (EXIF rotation, alpha over white, 16-bit scaled, size
limits), so a bad file gets the same one-line reason as in `icd edit`; it is reported and another image takes
its place in the batch, so a broken file never stops a run nor changes the batch size. Latents can be cached
once in a safetensors file (posterior means, as at inference) to skip the VAE during training.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from icd.editing import CAPTIONS_NAME
from icd.errors import ICDError, InputError, first_line
from icd.files import atomic_write
from icd.images import load_image, to_model_input

log = logging.getLogger("icd")
CAPTION_FILES = (CAPTIONS_NAME, "metadata.csv")
ENCODE_BATCH = 8  # images through the VAE at once when the latents are cached


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


def _caption_rows(file: Path) -> list[dict]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ICDError(f"{file}: cannot read the captions ({err})") from None
    if file.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d: not JSON, skipped", file.name, number)
        return rows
    return list(csv.DictReader(text.splitlines()))


def read_examples(folder: str | Path, captions: str | Path = "") -> list[Example]:
    """The (image, caption) pairs; rows without a caption and missing files are reported and skipped. File
    names are relative to the image folder; when a file is listed twice its last caption wins."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ICDError(f"data folder not found: {folder}")
    file = Path(captions) if captions else next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), None)
    if file is None or not file.is_file():
        raise ICDError(f"{file or folder}: no captions (give {' or '.join(CAPTION_FILES)}, or data.captions)")
    by_name: dict[str, str] = {}
    for row in _caption_rows(file):
        name = row.get("file_name") if isinstance(row, dict) else None
        caption = (row.get("text", row.get("caption")) if isinstance(row, dict) else None)
        if not isinstance(name, str) or not isinstance(caption, str):
            log.warning("%s: a row without file_name and text/caption, skipped: %.80s", file.name, row)
            continue
        by_name[name] = caption
    examples = []
    for name, caption in by_name.items():
        path = folder / name
        if path.is_file():
            examples.append(Example(path, caption))
        else:
            log.warning("%s: listed in %s but not found, skipped", name, file.name)
    if not examples:
        raise ICDError(f"{file}: no usable images")
    return examples


def square_pixels(path: Path, resolution: int) -> torch.Tensor:
    """The image centre-cropped to a square and resized to resolution², (3, R, R) in [-1, 1]."""
    image = load_image(path)
    width, height = image.rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    cropped = replace(image, rgb=image.rgb.crop((left, top, left + side, top + side)))
    return to_model_input(cropped, (resolution, resolution))[0]


class ImageDataset(Dataset):
    """Images decoded on the fly; a bad one is reported (once per worker) and the next good one served."""

    def __init__(self, examples: list[Example], resolution: int):
        self.examples, self.resolution = examples, resolution
        self._reported: set[Path] = set()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.examples)):
            example = self.examples[(index + offset) % len(self.examples)]
            try:
                return {"pixels": square_pixels(example.path, self.resolution), "caption": example.caption}
            except InputError as err:
                if example.path not in self._reported:
                    self._reported.add(example.path)
                    log.warning("skipping %s", err)
        raise ICDError("no training image could be read")


class LatentDataset(Dataset):
    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"latents": self.latents[index], "caption": self.captions[index]}


def encode_examples(examples: list[Example], resolution: int, encode) -> LatentDataset:
    """VAE latents of every readable example; bad files are reported and left out."""
    latents, captions, pixels = [], [], []
    for i, example in enumerate(examples):
        try:
            pixels.append(square_pixels(example.path, resolution))
            captions.append(example.caption)
        except InputError as err:
            log.warning("skipping %s", err)
        if pixels and (len(pixels) == ENCODE_BATCH or i == len(examples) - 1):
            latents.append(encode(torch.stack(pixels)).cpu())
            pixels = []
    if not captions:
        raise ICDError("no training image could be read")
    return LatentDataset(torch.cat(latents), captions)


def cached_latents(cache: Path, examples: list[Example], resolution: int, vae: str, encode) -> LatentDataset:
    """The latent cache at `cache`, (re)built when it was made from other images, size or VAE (`vae_identity`)."""
    key = json.dumps({"vae": vae, "resolution": resolution, "files": [str(e.path) for e in examples]})
    if cache.is_file():
        try:
            with safe_open(str(cache), "pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("key") == key:
                    return LatentDataset(f.get_tensor("latents"), json.loads(metadata["captions"]))
            log.info("%s: made from other images or settings, rebuilding", cache)
        except Exception as err:  # safetensors raises several types for a damaged file
            log.warning("%s: unreadable latent cache, rebuilding (%s)", cache, first_line(err))
    dataset = encode_examples(examples, resolution, encode)
    atomic_write(cache, lambda temporary: save_file({"latents": dataset.latents.contiguous()}, str(temporary),
                                                    metadata={"key": key, "captions": json.dumps(dataset.captions)}),
                 overwrite=True)
    return dataset


def vae_identity(base: str) -> str:
    """What a latent cache records as the VAE that made it: a hub id, or for a local base folder a digest of its
    VAE files (names, sizes, first megabyte), so the same base carried into another model folder still matches."""
    vae = Path(base) / "vae"
    if not vae.is_dir():
        return base
    digest = hashlib.sha256()
    for path in sorted(p for p in vae.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(vae).as_posix()} {path.stat().st_size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
    return f"vae-{digest.hexdigest()[:16]}"


def build_dataset(data, model, accelerator) -> Dataset:
    """Images from `data.path`, or their cached latents (built once, by the main process) when configured."""
    examples = read_examples(data.path, data.captions)
    if not data.latent_cache:
        return ImageDataset(examples, data.resolution)
    with accelerator.main_process_first():
        return cached_latents(Path(data.latent_cache), examples, data.resolution, vae_identity(model.manifest.base),
                              model.encode_image)


def first_items(dataset: Dataset, count: int) -> dict:
    """A batch of the first `count` items: the fixed evaluation set."""
    from torch.utils.data import default_collate

    return default_collate([dataset[i] for i in range(min(count, len(dataset)))])


def text_conditioning(model, captions: list[str], resolution: int):
    """The captions' conditioning, copied out of inference mode so that autograd may use it."""
    cond = model.encode_text(captions, (resolution, resolution))
    return type(cond)(**{key: None if value is None else value.clone() for key, value in vars(cond).items()})


def batch_inputs(model, batch: dict, resolution: int):
    """(latents, conditioning) of a batch: cached latents or VAE posterior means, and the captions'."""
    z0 = batch["latents"].to(model.device) if "latents" in batch else model.encode_image(batch["pixels"])
    return z0.float().clone(), text_conditioning(model, list(batch["caption"]), resolution)
