"""What a half-precision VAE costs in pixels: latents decoded by a VAE in bf16 (or fp16) next to the same VAE
in fp32, in levels of 255 (issue 21: SDXL's VAE runs in bf16 under bf16, in fp32 under fp16 unless an
fp16-safe VAE is named).

This script runs on the CPU: the tiny test models' VAE (tests/fixtures/tiny.py: `tiny` and `tiny-sdxl` share
it) and the real SD1.5/SDXL VAE architecture (icd.models.offline.CONFIGS: both bases share it) with random
weights, decoding latents drawn N(0, 1) in the scaled latent space, as a model's own latents are; and `mini`'s
trained VAE decoding its demo picture's latents. Random weights say nothing about SDXL's fp16 overflow, which
lives in its trained weights; the GPU run (bench/gpu) measures its sessions' VAEs on CUDA with `vae_levels`.
Usage (BENCHMARKS.md has the figures):
    python bench/vae_precision.py [--size 128] [--dtypes bf16 fp16] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from icd.models.loading import DTYPES

ROOT = Path(__file__).resolve().parents[1]


def decoded(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (fp32) as `icd.models.loading.Model.decode_latents` makes them."""
    scaled = (latents / vae.config.scaling_factor).to(latents.device, vae.dtype)
    return vae.decode(scaled, return_dict=False)[0].float().clamp(-1, 1)


@torch.inference_mode()
def vae_levels(vae, latents: torch.Tensor) -> dict:
    """`latents` decoded by `vae` in its dtype and by an fp32 copy: the largest and the mean |difference| in
    levels of 255, the share of pixels more than one level off, and whether every pixel came out finite."""
    ours, reference = decoded(vae, latents), decoded(copy.deepcopy(vae).float(), latents)
    levels = (ours - reference).abs() * 127.5
    return {"vae_dtype": str(vae.dtype).removeprefix("torch."), "max_levels": round(levels.max().item(), 3),
            "mean_levels": round(levels.mean().item(), 4), "over_1_level": round((levels > 1).float().mean().item(), 5),
            "finite": bool(torch.isfinite(ours).all()), "fp32_pixel_std": round(reference.std().item(), 4)}


def random_latents(vae, side: int) -> torch.Tensor:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return torch.randn(1, vae.config.latent_channels, side // factor, side // factor,
                       generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def cases(size: int) -> dict:
    """name -> (an fp32 VAE, the latents it decodes)."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.tiny import build_tiny_model
    from icd.models.hub import builtin_dir
    from icd.models.offline import CONFIGS

    with tempfile.TemporaryDirectory() as folder:
        tiny = AutoencoderKL.from_pretrained(build_tiny_model(Path(folder) / "tiny").parent / "base" / "vae")
    mini = AutoencoderKL.from_pretrained(builtin_dir("mini") / "base" / "vae").eval()
    photo = Image.open(builtin_dir("mini") / "demo.png").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    torch.manual_seed(0)
    real = AutoencoderKL(**CONFIGS["sdxl"]["vae"])
    return {"tiny, random weights, 128x128": (tiny, random_latents(tiny, 128)),
            "mini, trained, its demo picture at 64x64": (
                mini, mini.encode(pixels).latent_dist.mean * mini.config.scaling_factor),
            f"SD1.5/SDXL architecture, random weights, {size}x{size}": (real, random_latents(real, size))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="pixels of the real architecture's decode")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for name, (vae, latents) in cases(args.size).items():
        vae = vae.eval()
        for dtype in args.dtypes:
            started = time.perf_counter()
            row = {"vae": name, **vae_levels(copy.deepcopy(vae).to(DTYPES[dtype]), latents)}
            rows.append({**row, "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
