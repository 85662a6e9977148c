"""Package a trained miniature iCD model as a self-contained fp16 folder (what ships as the `mini` model).

The folder holds icd.json, teacher.pt, the two LoRAs and the base's tokenizer, text encoder, VAE, scheduler
and UNet config (the teacher holds every UNet weight, so the base UNet's weights are left out).

Usage: python bench/miniature/ship.py MODEL_DIR icdcli/assets/mini
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from icdcli.manifest import MANIFEST_NAME, load_manifest


def _half(tensors: dict) -> dict:
    return {k: v.half().contiguous() if v.is_floating_point() else v for k, v in tensors.items()}


# The edit settings `icd edit` uses for this model unless told otherwise: w = 2 preserved the scene best at
# the same success rate as w = 4 and 6 in a sweep over held-out edits (BENCHMARKS.md, miniature world).
EDIT_DEFAULTS = {"method": "p2p", "guidance": 2.0, "tau": 0.8}


def ship(model_dir: Path, target: Path) -> None:
    manifest = load_manifest(model_dir)
    base = Path(manifest.base)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(base / part, staging / "base" / part)
    for part in ("text_encoder", "vae"):
        (staging / "base" / part).mkdir(parents=True)
        shutil.copy(base / part / "config.json", staging / "base" / part)
        [weights] = [p for p in (base / part).glob("*.safetensors")]
        save_file(_half(load_file(weights)), staging / "base" / part / weights.name, metadata={"format": "pt"})
    (staging / "base" / "unet").mkdir()
    shutil.copy(base / "unet" / "config.json", staging / "base" / "unet")
    shutil.copy(base / "model_index.json", staging / "base")
    torch.save(_half(torch.load(manifest.teacher, map_location="cpu", weights_only=True)), staging / "teacher.pt")
    for direction in ("forward", "reverse"):
        lora = getattr(manifest, f"{direction}_lora")
        save_file(_half(load_file(lora)), staging / f"{direction}.safetensors")
    data = json.loads((model_dir / MANIFEST_NAME).read_text())
    data.update(name="mini", base="base", teacher="teacher.pt", forward_lora="forward.safetensors",
                reverse_lora="reverse.safetensors", edit=EDIT_DEFAULTS,
                description="A demonstration model of the miniature world (bench/miniature): 64x64 scenes of "
                            "coloured shapes on four backgrounds. Not for photos.")
    (staging / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


if __name__ == "__main__":
    ship(Path(sys.argv[1]), Path(sys.argv[2]))
