"""Measure trained miniature iCD models the way the paper measures SD1.5, on held-out scenes.

- inversion (paper Table 2): encode a scene under its caption, decode it back; PSNR and SSIM against the
  scene, for the teacher's DDIM-50 inversion and for each iCD model, with unguided decoding (w = 0) and with
  guided decoding (w = --guidance) with and without dynamic guidance (tau = 1 vs --tau);
- generation: how often images follow their captions (the world's judges), the teacher's 50 DDIM steps
  against the reverse student's few, same noise, same guidance.

Editing is measured by `icd eval` on the sets `edit_sets.py` writes (BENCHMARKS.md has the commands); this
module also draws those sets' edits (`edit_task`). Everything runs through icd's own pipeline, on the CPU, fp32.

Usage: python bench/miniature/evaluate.py --model NAME=DIR [--model NAME=DIR ...] [--scenes 48] [--json out.json]
The first model also provides the teacher (all models share it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from icd import pipeline  # noqa: E402
from world import BACKGROUNDS, COLOURS, SHAPES, Scene, Spec, follows, random_spec, render  # noqa: E402
from icd.app.session import Session, open_session, teacher_session  # noqa: E402
from icd.evaluation.checks import psnr  # noqa: E402
from icd.images import image_to_array, pixels_to_image  # noqa: E402

HELD_OUT = 10**6  # scene seeds from here on are never trained on (the recipe trains on 0..images-1)
EDIT_KINDS = ("colour", "shape", "background")


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean SSIM over the RGB channels, 7x7 Gaussian window (sigma 1.5), the usual constants."""
    x, y = (torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)[:, None] for im in (a, b))
    g = torch.exp(-((torch.arange(7) - 3.0) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None]) / g.sum() ** 2
    blur = lambda z: F.conv2d(z, window[None, None])  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean().item()


def held_out_specs(count: int, objects: int | None = None) -> list[Spec]:
    specs, seed = [], HELD_OUT
    while len(specs) < count:
        spec = random_spec(seed)
        if objects is None or len(spec.objects) == objects:
            specs.append(spec)
        seed += 1
    return specs


def load(folder: str) -> Session:
    return open_session(folder, "cpu", "fp32", "torch")


def inversion(models: dict[str, Session], scenes: list[Scene], guidance: float, tau: float) -> list[dict]:
    rows = []
    for name, model in models.items():
        for label, w, t in (("unguided", 0.0, 1.0), (f"w={guidance:g}", guidance, 1.0),
                            (f"w={guidance:g}, tau={tau:g}", guidance, tau)):
            started, scores = time.perf_counter(), []
            for scene in scenes:
                x_T = pipeline.invert(model, torch.from_numpy(image_to_array(scene.image)), scene.caption, seed=0)
                out = pixels_to_image(pipeline.reconstruct(model, x_T, scene.caption, w, t)[0])
                scores.append((psnr(out, scene.image), ssim(out, scene.image)))
            psnrs, ssims = zip(*scores)
            rows.append({"model": name, "decoding": label, "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
                         "seconds_per_image": (time.perf_counter() - started) / len(scenes)})
    return rows


def generation(models: dict[str, Session], specs: list[Spec], guidance: float, tau: float) -> list[dict]:
    rows = []
    for name, model in models.items():
        t = 1.0 if "DDIM" in model.manifest.name else tau
        checks, started = [], time.perf_counter()
        size = model.manifest.resolution
        for i, spec in enumerate(specs):
            image = pixels_to_image(pipeline.generate(model, spec.caption, seed=i, width=size, height=size,
                                                      guidance=guidance, tau=t)[0])
            checks.append(follows(image, spec))
        rate = lambda key: float(np.mean([c[key] for c in checks if key in c]))  # noqa: E731
        rows.append({"model": name, "guidance": guidance, "tau": t, "background": rate("background"),
                     "colours": rate("colours"), "shape": rate("shape"),
                     "all": float(np.mean([all(c.values()) for c in checks])),
                     "seconds_per_image": (time.perf_counter() - started) / len(specs)})
    return rows


def edit_task(spec: Spec, index: int) -> tuple[str, Spec]:
    """The index-th scene's edit: kinds in turn, the new value drawn from the scene's seed."""
    kind, rng = EDIT_KINDS[index % len(EDIT_KINDS)], np.random.default_rng(spec.seed)
    thing = spec.objects[0]
    if kind == "colour":
        return kind, spec.edited(colour=str(rng.choice([c for c in COLOURS if c != thing.colour])))
    if kind == "shape":
        return kind, spec.edited(shape=str(rng.choice([s for s in SHAPES if s != thing.shape])))
    return kind, spec.edited(background=str(rng.choice([b for b in BACKGROUNDS if b != spec.background])))


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--guidance", type=float, default=4.0, help="w for guided decoding and generation")
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--parts", nargs="+", default=["inversion", "generation"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: load(folder) for name, folder in (item.split("=", 1) for item in args.model)}
    first = next(iter(models.values()))
    everything = {"DDIM-50 (teacher)": teacher_session(first, 50), **models}
    results = {}
    with torch.no_grad():
        if "inversion" in args.parts:
            scenes = [render(spec) for spec in held_out_specs(args.scenes)]
            results["inversion"] = inversion(everything, scenes, args.guidance, args.tau)
        if "generation" in args.parts:
            results["generation"] = generation(everything, held_out_specs(args.scenes), args.guidance, args.tau)
    for part, rows in results.items():
        print(f"\n## {part}\n\n{table(rows)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
