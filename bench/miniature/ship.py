"""Package a trained miniature iCD model as a self-contained fp16 folder (what ships as the `mini` model).

The folder holds icd.json, teacher.pt, the two LoRAs, the demo scene `icd demo` edits (demo.png, prompts in
icd.json) and the base's tokenizer, text encoder, VAE, scheduler and UNet config (the teacher holds every UNet
weight, so the base UNet's weights are left out).

Usage: python bench/miniature/ship.py MODEL_DIR icdcli/assets/mini
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from world import DEMO_SCENE, DEMO_TARGET, render

from icd.models.manifest import MANIFEST_NAME, load_manifest, write_model


def _half(tensors: dict) -> dict:
    return {k: v.half().contiguous() if v.is_floating_point() else v for k, v in tensors.items()}


# The edit settings `icd edit` uses for this model unless told otherwise: w = 2 preserved the scene best at
# the same success rate as w = 4 and 6 in a sweep over held-out edits (BENCHMARKS.md, miniature world).
EDIT_DEFAULTS = {"method": "p2p", "guidance": 2.0, "tau": 0.8}


def _base(source: Path, target: Path) -> None:
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(source / part, target / part)
    for part in ("text_encoder", "vae"):
        (target / part).mkdir(parents=True)
        shutil.copy(source / part / "config.json", target / part)
        [weights] = [p for p in (source / part).glob("*.safetensors")]
        save_file(_half(load_file(weights)), target / part / weights.name, metadata={"format": "pt"})
    (target / "unet").mkdir()
    shutil.copy(source / "unet" / "config.json", target / "unet")
    shutil.copy(source / "model_index.json", target)


def ship(model_dir: Path, target: Path) -> None:
    manifest = load_manifest(model_dir)
    files = {
        "base": lambda path: _base(Path(manifest.base), path),
        "teacher.pt": lambda path: torch.save(_half(torch.load(manifest.teacher, map_location="cpu",
                                                                weights_only=True)), path),
        "forward.safetensors": lambda path: save_file(_half(load_file(manifest.forward_lora)), path),
        "reverse.safetensors": lambda path: save_file(_half(load_file(manifest.reverse_lora)), path),
        "demo.png": lambda path: render(DEMO_SCENE, manifest.resolution).image.save(path, format="PNG"),
    }
    data = json.loads((model_dir / MANIFEST_NAME).read_text())
    data.update(name="mini", base="base", teacher="teacher.pt", forward_lora="forward.safetensors",
                reverse_lora="reverse.safetensors", edit=EDIT_DEFAULTS,
                demo={"image": "demo.png", "source": DEMO_SCENE.caption, "target": DEMO_TARGET.caption},
                description="A demonstration model of the miniature world (bench/miniature): 64x64 scenes of "
                            "coloured shapes on four backgrounds. Not for photos.")
    shutil.rmtree(target, ignore_errors=True)
    write_model(target, data, files)


if __name__ == "__main__":
    ship(Path(sys.argv[1]), Path(sys.argv[2]))
