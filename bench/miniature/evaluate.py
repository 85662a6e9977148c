"""Measure trained miniature iCD models the way the paper measures SD1.5, on held-out scenes.

- inversion (paper Table 2): encode a scene under its caption, decode it back; PSNR and SSIM against the
  scene, for the teacher's DDIM-50 inversion and for each iCD model, with unguided decoding (w = 0) and with
  guided decoding (w = --guidance) with and without dynamic guidance (tau = 1 vs --tau);
- generation: how often images follow their captions (the world's judges), the teacher's 50 DDIM steps
  against the reverse student's few, same noise, same guidance;
- editing: colour, shape and background swaps of one-object scenes: success (the judges find the target
  attribute), preservation (PSNR of what the edit should leave alone: outside the object's old and new masks,
  or inside them for a background swap), PSNR to the re-rendered target scene, and seconds per edit
  (inversion included), for p2p, swap and none, on iCD and on the teacher's DDIM-50 inversion.

Everything runs through icd's own pipeline (what `icd edit` runs), on the CPU, fp32.

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

from icd import pipeline
from icd.editing import edit_plan  # noqa: E402
from world import (BACKGROUNDS, COLOURS, SHAPES, Scene, Spec, background_of, colour_masks,  # noqa: E402
                              colour_under, follows, random_spec, render, shape_of)
from icd.app.session import Session, open_session, teacher_session  # noqa: E402
from icd.images import image_to_array, pixels_to_image  # noqa: E402

HELD_OUT = 10**6  # scene seeds from here on are never trained on (the recipe trains on 0..images-1)
EDIT_KINDS = ("colour", "shape", "background")


def psnr(a: Image.Image, b: Image.Image, mask: np.ndarray | None = None) -> float:
    diff = np.asarray(a, np.float32) - np.asarray(b, np.float32)
    mse = float(np.mean((diff if mask is None else diff[mask]) ** 2))
    return 10 * np.log10(255**2 / max(mse, 1e-10))


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


def edit_success(kind: str, image: Image.Image, target: Scene) -> bool:
    thing = target.objects[0]
    if kind == "colour":
        return colour_under(image, thing.mask) == thing.colour
    if kind == "shape":
        mask = colour_masks(image).get(thing.colour)
        return mask is not None and shape_of(mask) == thing.shape
    return background_of(image, [thing.mask]) == target.background


def editing(models: dict[str, Session], specs: list[Spec], methods: tuple[str, ...], guidance: float,
            tau: float) -> list[dict]:
    rows = []
    for name, model in models.items():
        for method in methods:
            results = {kind: [] for kind in EDIT_KINDS}
            started = time.perf_counter()
            for i, spec in enumerate(specs):
                kind, target_spec = edit_task(spec, i)
                source, target = render(spec), render(target_spec)
                x_T = pipeline.invert(model, torch.from_numpy(image_to_array(source.image)), source.caption, seed=0)
                plan = edit_plan(model.manifest, source.caption, target.caption, method=method, guidance=guidance,
                                 tau=tau)
                edited = pixels_to_image(pipeline.edit(model, x_T, plan, with_reconstruction=False).edited[0])
                changed = source.objects[0].mask | target.objects[0].mask
                keep = changed if kind == "background" else ~changed
                results[kind].append((edit_success(kind, edited, target), psnr(edited, source.image, keep),
                                      psnr(edited, target.image)))
            seconds = (time.perf_counter() - started) / len(specs)
            for kind, values in results.items():
                success, kept, to_target = zip(*values)
                rows.append({"model": name, "method": method, "edit": kind, "success": float(np.mean(success)),
                             "preservation_psnr": float(np.mean(kept)), "target_psnr": float(np.mean(to_target)),
                             "seconds_per_edit": seconds})
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--guidance", type=float, default=4.0, help="w for guided decoding, generation, editing")
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--methods", nargs="+", default=["p2p", "swap", "none"])
    parser.add_argument("--parts", nargs="+", default=["inversion", "generation", "editing"])
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
        if "editing" in args.parts:
            results["editing"] = editing(everything, held_out_specs(args.scenes, objects=1), tuple(args.methods),
                                         args.guidance, args.tau)
    for part, rows in results.items():
        print(f"\n## {part}\n\n{table(rows)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
