"""Check that a pretrained miniature base is a working text-to-image model of its world.

Prints the VAE's reconstruction PSNR on held-out scenes and how often the judges of world.py find
a caption followed: by the real scenes (the judges' own accuracy), by their VAE reconstructions, and by
images the base generates for the same captions with 50-step DDIM at classifier-free guidance scales
1 (unguided), 3 and 7. Chance is 25% for the background, 17% for a single object's colour.

Usage: python bench/miniature/sample.py --model /tmp/mini-base [--scenes 192 --scales 1 3 7]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from world import follows, random_spec

from icd.images import pixels_to_image
from pretrain import to_unit, world_pixels

HELD_OUT = 10**6  # scene seeds from here on are never trained on (pretrain.py uses 0..images-1)


def rates(images: list[Image.Image], specs) -> dict[str, float]:
    """Fractions of scenes whose background, colours, shape (one-object scenes only) and all of these pass."""
    checks = [follows(image, spec) for image, spec in zip(images, specs)]
    shapes = [c["shape"] for c in checks if "shape" in c]
    return {"background": np.mean([c["background"] for c in checks]), "colours": np.mean([c["colours"] for c in checks]),
            "shape": np.mean(shapes) if shapes else float("nan"), "all": np.mean([all(c.values()) for c in checks])}


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    return [pixels_to_image(row) for row in pixels]


def grid(images: list[Image.Image], columns: int = 8) -> Image.Image:
    side = images[0].width
    sheet = Image.new("RGB", (side * columns, side * math.ceil(len(images) / columns)))
    for i, image in enumerate(images):
        sheet.paste(image, (side * (i % columns), side * (i // columns)))
    return sheet


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor) -> tuple[list[Image.Image], float]:
    """Decoded posterior means and their mean PSNR (dB) against the originals."""
    x = to_unit(pixels, vae.device)
    out = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((out - x) ** 2).mean(dim=(1, 2, 3))
    return to_images(out), (10 * torch.log10(4 / mse)).mean().item()


def generate(pipeline, captions: list[str], scale: float, steps: int, size: int, seed: int) -> list[Image.Image]:
    """DDIM with classical two-pass guidance (none at scale 1), the same starting noise at every scale."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(captions, num_inference_steps=steps, guidance_scale=scale, height=size, width=size,
                    generator=generator).images


def main() -> None:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the folder pretrain.py wrote")
    parser.add_argument("--scenes", type=int, default=192)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 7.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (1 is fastest on a CPU other jobs share)")
    parser.add_argument("--save", type=Path, help="a folder for image sheets: real scenes and each scale's samples")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipeline = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    seeds = range(HELD_OUT, HELD_OUT + args.scenes)
    specs = [random_spec(seed) for seed in seeds]
    pixels, captions = world_pixels(seeds, size)
    reconstructions, psnr = reconstruct(pipeline.vae, pixels)
    sheets = {"real": [Image.fromarray(row) for row in pixels.permute(0, 2, 3, 1).numpy()], "vae": reconstructions}
    rows = {"real held-out scenes": rates(sheets["real"], specs),
            f"VAE reconstructions ({psnr:.1f} dB PSNR)": rates(reconstructions, specs)}
    for scale in args.scales:
        start = time.perf_counter()
        sheets[f"cfg{scale:g}"] = generate(pipeline, captions, scale, args.steps, size, args.seed)
        rows[f"generated, CFG {scale:g} ({time.perf_counter() - start:.0f} s)"] = rates(sheets[f"cfg{scale:g}"], specs)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for name, images in sheets.items():
            grid(images).save(args.save / f"{name}.png")
        (args.save / "captions.txt").write_text("".join(caption + "\n" for caption in captions))
    print(f"# {args.scenes} held-out captions, {size}x{size}, {args.steps}-step DDIM, {args.model}")
    print("| images | background | colours | shape (1 object) | all |\n| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * value:.0f}%" for value in row.values()) + " |")


if __name__ == "__main__":
    main()
