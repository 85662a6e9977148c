r"""Local edits on the miniature world (issue 14): does an edit change what was asked and nothing else?

- Two objects, recolour one of them (the other object alternates between scenes), with a region:
  `mask` (the object's mask from the renderer, grown by 2 pixels, given to `pipeline.edit(mask=...)`),
  `mask+keep` (the same edit with the input's pixels outside the mask, as `icd edit --mask` does by default),
  `blend` (Prompt-to-Prompt's LocalBlend on the words source colour : target colour; p2p only) or `none`,
  per method. Success: the object has the new colour under its mask. Preservation: PSNR to the input outside
  both objects, and inside the other object (plus whether its colour stayed).
- One object: colour and shape edits (48 scenes each), success and preservation as evaluate.py's editing part.
- Reconstruction before any edit (unguided, what p2p's source row decodes): PSNR, PSNR inside the objects and
  whether every object keeps its colour; the ceiling of what an edit can preserve.
- A sweep of `--strength` (`icd.editing.strength_settings`) on the two-object scenes, every (method, region).

The teacher's DDIM-50 (`--teacher`) runs the same edits from its own 50-step inversion. Everything goes through
icd's pipeline on the CPU in fp32; each scene is inverted once per model and all its edits start from there.

Usage (1 thread per process; run the first two side by side, then the third; then the report):
  python bench/miniature/local_edits.py run --json bench/results/local_edits_icd.json
  python bench/miniature/local_edits.py run --teacher --edits two-objects --strengths 0.5 \
      --json bench/results/local_edits_ddim.json
  python bench/miniature/local_edits.py run --teacher --edits two-objects --strengths 0 1 \
      --json bench/results/local_edits_ddim_sweep.json
  python bench/miniature/local_edits.py report bench/results/local_edits_*.json --plot bench/results/local_edits.png
  python bench/miniature/local_edits.py example --output bench/results/mask_example.png
DDIM-50 costs 5-10x iCD per edit, so it runs the two-object scenes only, at three strengths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from evaluate import EDIT_KINDS, edit_success, edit_task, held_out_specs, psnr, table  # noqa: E402
from world import Scene, Spec, colour_under, grown, random_spec, recoloured, render  # noqa: E402
from icd import pipeline  # noqa: E402
from icd.app.demo import labelled_row  # noqa: E402
from icd.app.session import Session, open_session, teacher_session  # noqa: E402
from icd.editing import DEFAULT_STRENGTH, edit_plan  # noqa: E402
from icd.images import LoadedImage, image_to_array, pixels_to_image  # noqa: E402
from icd.masks import keep_outside  # noqa: E402

METHODS = ("p2p", "swap", "none")
REGIONS = ("none", "blend", "mask", "mask+keep")  # blend: p2p only; mask+keep: the mask edit, composited
MASK_GROWTH = 2  # pixels; the latent grid is 8x8 for 64x64 scenes, so one latent cell is 8 pixels
PSNR_CAP = 60.0  # dB; identical pixels (kept outside a mask) have an infinite PSNR, which no mean survives
TWO_OBJECTS = "recolour 1 of 2"


@dataclass(frozen=True)
class Case:
    """One edit to measure: the scene, the scene as the edit should leave it, the object that changes."""

    kind: str  # TWO_OBJECTS, "colour" or "shape"
    source: Scene
    target: Scene
    index: int
    words: tuple[str, str]  # the blend words: the changed attribute in the source and in the target

    def region(self) -> np.ndarray:
        """The changed object's old and new masks, grown: where the edit may act, (h, w) float32 in {0, 1}."""
        changed = self.source.objects[self.index].mask | self.target.objects[self.index].mask
        return grown(changed, MASK_GROWTH).astype(np.float32)


def recolour_case(spec: Spec, index: int) -> Case:
    target = recoloured(spec, index)
    words = (spec.objects[index].colour, target.objects[index].colour)
    return Case(TWO_OBJECTS, render(spec), render(target), index, words)


def two_object_cases(count: int) -> list[Case]:
    return [recolour_case(spec, i % 2) for i, spec in enumerate(held_out_specs(count, objects=2))]


def one_object_cases(count: int, kind: str) -> list[Case]:
    attribute = "colour" if kind == "colour" else "shape"
    cases = []
    for spec in held_out_specs(count, objects=1):
        _, target = edit_task(spec, EDIT_KINDS.index(kind))
        cases.append(Case(kind, render(spec), render(target), 0,
                          (getattr(spec.objects[0], attribute), getattr(target.objects[0], attribute))))
    return cases


def edited_images(model: Session, x_T: torch.Tensor, case: Case, method: str, strength: float) -> dict:
    """{region: (edited image, seconds)} for every region the method takes (mask+keep composites the mask's
    edit with the input, as `icd edit --mask` does, at FEATHER_PX like the CLI at this working size)."""
    def timed(make):
        started = time.perf_counter()
        image = make()
        return image, time.perf_counter() - started

    plan = edit_plan(model.manifest, case.source.caption, case.target.caption, method=method, strength=strength)

    def edit(plan=plan, mask=None) -> Image.Image:
        return pixels_to_image(pipeline.edit(model, x_T, plan, mask=mask, with_reconstruction=False).edited[0])

    region = case.region()
    photo = LoadedImage(case.source.image, None, Path("scene.png"), case.source.image.size, "RGB")
    images = {"none": timed(edit), "mask": timed(lambda: edit(mask=torch.from_numpy(region)[None, None]))}
    composite, seconds = timed(lambda: keep_outside(images["mask"][0], photo, region, photo.original_size[0]))
    images["mask+keep"] = (composite, images["mask"][1] + seconds)
    if method == "p2p":
        blend = replace(plan.p2p, blend=((case.words[0],), (case.words[1],)))
        images["blend"] = timed(lambda: edit(replace(plan, p2p=blend)))
    return images


def measure(case: Case, image: Image.Image) -> dict:
    """Success and preservation of one edited image."""
    if case.kind == "shape":
        success = edit_success("shape", image, case.target)
    else:
        thing = case.target.objects[case.index]
        success = colour_under(image, thing.mask) == thing.colour
    objects = np.any([o.mask for scene in (case.source, case.target) for o in scene.objects], axis=0)
    preserved = lambda mask: min(PSNR_CAP, psnr(image, case.source.image, mask))  # noqa: E731
    scores = {"success": success, "outside_psnr": preserved(~objects)}
    if len(case.source.objects) == 2:
        other = case.source.objects[1 - case.index]
        scores |= {"other_psnr": preserved(other.mask),
                   "other_kept": colour_under(image, other.mask) == other.colour}
    return scores


def reconstruction_scores(image: Image.Image, scene: Scene) -> dict:
    return {"psnr": psnr(image, scene.image),
            "object_psnr": float(np.mean([psnr(image, scene.image, o.mask) for o in scene.objects])),
            "objects_kept": all(colour_under(image, o.mask) == o.colour for o in scene.objects)}


def mean_rows(records: list[tuple[tuple, dict]], keys: tuple[str, ...]) -> list[dict]:
    """Records grouped by their key tuple (in first-seen order), each score averaged."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for key, scores in records:
        groups[key].append(scores)
    return [dict(zip(keys, key)) | {name: float(np.mean([s[name] for s in group])) for name in group[0]}
            | {"n": len(group)} for key, group in groups.items()]


def run(model: Session, name: str, cases: list[Case], strengths: list[float]) -> dict:

    edits, recons = [], []
    for n, case in enumerate(cases):
        x_T = pipeline.invert(model, torch.from_numpy(image_to_array(case.source.image)), case.source.caption, seed=0)
        recon = pixels_to_image(pipeline.reconstruct(model, x_T, case.source.caption)[0])
        recons.append(((name, case.kind), reconstruction_scores(recon, case.source)))
        # One-object edits run at the default settings only; the sweep is for the two-object scenes.
        for strength in [s for s in strengths if case.kind == TWO_OBJECTS or s == DEFAULT_STRENGTH]:
            for method in METHODS:
                images = edited_images(model, x_T, case, method, strength)
                for region in (r for r in REGIONS if r in images):
                    image, seconds = images[region]
                    edits.append(((name, case.kind, method, region, strength),
                                  measure(case, image) | {"seconds_per_edit": seconds}))
        print(f"{name}: {n + 1}/{len(cases)} scenes", flush=True)
    return {"reconstruction": mean_rows(recons, ("model", "edit")),
            "edits": mean_rows(edits, ("model", "edit", "method", "region", "strength"))}


def run_main(args) -> None:
    if DEFAULT_STRENGTH not in args.strengths and args.edits != ["two-objects"]:
        raise SystemExit(f"--strengths: one-object edits run at the default strength {DEFAULT_STRENGTH}: include it")
    torch.set_num_threads(args.threads)
    model = open_session(args.model, "cpu", "fp32", "torch")
    name = f"iCD {args.model}"
    if args.teacher:
        model, name = teacher_session(model, 50), "DDIM-50 (teacher)"
    cases = [case for kind in args.edits for case in
             (two_object_cases(args.scenes) if kind == "two-objects" else one_object_cases(args.scenes, kind))]
    started = time.perf_counter()
    with torch.no_grad():
        results = run(model, name, cases, args.strengths)
    results["about"] = {"model": name, "scenes": args.scenes, "threads": args.threads,
                        "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"}
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(report([results]))


def report(results: list[dict]) -> str:
    """Markdown: the reconstructions, the edits at the default settings, the sweep (several runs of one model,
    e.g. at other strengths, share their reconstruction rows)."""
    recons = list({(row["model"], row["edit"]): row for r in results for row in r["reconstruction"]}.values())
    edits = [row for r in results for row in r["edits"]]
    keep = lambda row, *names: {k: v for k, v in row.items() if k not in names}  # noqa: E731
    parts = ["; ".join(f"{r['about']['model']}: {r['about']['seconds']} s" for r in results),
             "### Reconstruction (unguided)", table(recons)]
    for kind in (TWO_OBJECTS, "colour", "shape"):
        rows = [keep(row, "edit", "strength") for row in edits
                if row["edit"] == kind and row["strength"] == DEFAULT_STRENGTH]
        if rows:
            parts += [f"### {kind}, default settings", table(rows)]
    rows = sorted((keep(row, "edit") for row in edits if row["edit"] == TWO_OBJECTS),
                  key=lambda row: (row["model"], row["method"], REGIONS.index(row["region"]), row["strength"]))
    if rows:
        parts += [f"### {TWO_OBJECTS}, sweep of --strength", table(rows)]
    return "\n\n".join(parts)


def plot(results: list[dict], path: Path) -> None:
    """Success against preservation along the strength sweep, a column per region: inside the other object
    (top) and outside both objects (bottom); a colour per method, a line style and marker per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for r in results for row in r["edits"] if row["edit"] == TWO_OBJECTS]
    shown = [region for region in REGIONS if any(row["region"] == region for row in rows)]
    figure, axes = plt.subplots(2, len(shown), figsize=(3.6 * len(shown), 7), sharey=True, squeeze=False)
    colours = {"p2p": "tab:blue", "swap": "tab:orange", "none": "tab:green"}
    styles = ["-o", "--s", ":^"]
    measures = (("other_psnr", "PSNR inside the other object (dB)"), ("outside_psnr", "PSNR outside both objects (dB)"))
    for line, (key, label) in zip(axes, measures):
        for ax, region in zip(line, shown):
            models = sorted(dict.fromkeys(row["model"] for row in rows), key=lambda name: name.startswith("DDIM"))
            for style, model in zip(styles, models):  # iCD solid, the teacher dashed
                for method in METHODS:
                    series = sorted((row for row in rows if row["model"] == model and row["method"] == method
                                     and row["region"] == region), key=lambda row: row["strength"])
                    if not series:
                        continue
                    ax.plot([row[key] for row in series], [100 * row["success"] for row in series], style,
                            color=colours[method], label=f"{model}, {method}", markersize=4)
                    default = [row for row in series if row["strength"] == DEFAULT_STRENGTH]
                    ax.plot([row[key] for row in default], [100 * row["success"] for row in default], "*",
                            color=colours[method], markersize=12, markeredgecolor="black")
            ax.set_title(f"region: {region}", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.axhline(80, color="grey", linewidth=0.8)
            if key == "other_psnr":
                ax.axvline(25, color="grey", linewidth=0.8)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        line[0].set_ylabel("success: the object has the new colour (%)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="best")
    figure.suptitle(f"Two objects, recolour one ({rows[0]['n']} held-out scenes): --strength from 0 to 1 along each "
                    f"line, star = {DEFAULT_STRENGTH} (the model's defaults); PSNR capped at {PSNR_CAP:g} dB "
                    "(identical pixels)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def example(output: Path, seed: int, index: int) -> None:
    """The README's picture: a held-out two-object scene with one object recoloured by `icd edit --mask` on
    mini (the mask: the renderer's, grown as in the benchmark), shown as input | mask | edit."""
    case = recolour_case(random_spec(seed), index)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        case.source.image.save(work / "scene.png")
        mask = Image.fromarray(np.rint(case.region() * 255).astype(np.uint8))
        mask.save(work / "mask.png")
        subprocess.run([sys.executable, "-m", "icd", "edit", "scene.png", "--model", "mini", "--src",
                        case.source.caption, "--tgt", case.target.caption, "--mask", "mask.png", "-o", "edit.png",
                        "--quiet"], cwd=work, check=True)
        edited = Image.open(work / "edit.png").convert("RGB")
    picture = labelled_row([(case.source.image, "input"), (mask, "--mask"),
                            (edited, f"edit: {case.words[0]} -> {case.words[1]}")])
    picture.save(output, optimize=True)
    print(f"{output}: {case.source.caption} -> {case.target.caption}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure_it = commands.add_parser("run", help="measure one model, write its JSON")
    measure_it.add_argument("--model", default="mini")
    measure_it.add_argument("--teacher", action="store_true", help="the model's teacher, DDIM-50, instead")
    measure_it.add_argument("--scenes", type=int, default=48, help="scenes per kind of edit")
    measure_it.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    measure_it.add_argument("--edits", nargs="+", choices=("two-objects", "colour", "shape"),
                            default=["two-objects", "colour", "shape"])
    measure_it.add_argument("--threads", type=int, default=1)
    measure_it.add_argument("--json", type=Path, required=True)
    show = commands.add_parser("report", help="tables (markdown) and the plot from the JSON files")
    show.add_argument("json", nargs="+", type=Path)
    show.add_argument("--plot", type=Path)
    picture = commands.add_parser("example", help="the README's picture of a --mask edit on mini")
    picture.add_argument("--seed", type=int, default=1000014, help="a held-out two-object scene")
    picture.add_argument("--object", type=int, default=0, help="the object to recolour (0 or 1)")
    picture.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "run":
        run_main(args)
        return
    if args.command == "example":
        example(args.output, args.seed, args.object)
        return
    results = [json.loads(path.read_text()) for path in args.json]
    print(report(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
