r"""The miniature world's editing sets, written as `icd eval` folders, and the README's picture of a masked edit.

Each set is a folder of held-out scenes (seeds from 10^6, never trained on) with a `metadata.jsonl`: the scene
(`images/`), its caption and the edited caption, the edit's region (`masks/`: the changed object's old and new
masks grown by 2 pixels; the background outside the object for a background swap), the blend words (the changed
attribute in both captions), the re-rendered true result (`targets/`) and the renderer's judges as checks
(icd.evaluation.checks; regions in `regions/`):

- `editing`: 48 one-object scenes, colour, shape and background swaps in turn. Checks: `success` (the new colour
  under the object's new mask; the new shape in the new colour's pixels; the new background outside the
  object) and `preservation` (PSNR where the edit should change nothing: outside the old and new masks, inside
  them for a background swap); `psnr_target` against the true result.
- `two-objects`: 48 two-object scenes, one object (alternating) recoloured to a colour no object has. Checks:
  `success`, `other_kept` (the other object's colour), `psnr_other` (inside the other object), `psnr_outside`
  (outside both objects).
- `one-object`: the editing set's 48 scenes, each with a colour and a shape edit. Checks: `success`,
  `psnr_outside`.
- `reconstruction`: the 48 two-object and 48 one-object scenes with the source caption as the target, for an
  unguided decoding (`--method none --guidance 0 --tau 1`). Checks: `objects_kept` (every object keeps its
  colour), `psnr_objects` (mean PSNR inside the objects).
- `ovals`: 48 one-object scenes recoloured inside an oval mask around the object, background inside it as a person
  paints one. Checks: `success`, `psnr_outside`; `seam` measures the texture across the mask's edge (seam.py).

Usage:
  python bench/miniature/edit_sets.py write OUTDIR [--scenes 48]
  python bench/miniature/edit_sets.py strengths EVAL/summary.json    # a --strength sweep's table, compact
  python bench/miniature/edit_sets.py seam OUTDIR/ovals EVAL          # the seam of a masked evaluation of a set
  python bench/miniature/edit_sets.py example --output bench/results/mask_example.png
The `icd eval` commands and their tables: BENCHMARKS.md ("The miniature world").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from evaluate import EDIT_KINDS, edit_task, held_out_specs  # noqa: E402
from seam import SEAM_EDGES, oval, profile, seam_bands, seam_step  # noqa: E402
from world import BACKGROUNDS, COLOURS, Scene, Spec, grown, random_spec, recoloured, render  # noqa: E402
from icd.app.demo import labelled_row  # noqa: E402

MASK_GROWTH = 2  # pixels; the latent grid is 8x8 for 64x64 scenes, so one latent cell is 8 pixels
OVAL_MARGIN = 4  # pixels of background inside the ovals set's masks, around the ellipse through the object's box
PROFILE_EDGES = [-8, -6, -4, -2, 0, 2, 4, 6, 8]  # the bands of `seam`'s profile (signed distance, inside > 0)
PALETTES = {"colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "backgrounds": {name: list(texture[0]) for name, texture in BACKGROUNDS.items()}}


def _picture(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)


class SetWriter:
    """One set's folder: the pictures as they are named, then metadata.jsonl."""

    def __init__(self, folder: Path):
        self.folder, self.rows = folder, []
        for part in ("images", "masks", "regions", "targets"):
            (folder / part).mkdir(parents=True, exist_ok=True)

    def save(self, part: str, name: str, picture: Image.Image) -> str:
        relative = f"{part}/{name}.png"
        picture.save(self.folder / relative)
        return relative

    def region(self, item: str, name: str, mask: np.ndarray) -> str:
        return self.save("regions", f"{item}-{name}", _picture(mask))

    def row(self, item: str, source: Scene, target: Scene, kind: str, mask: np.ndarray | None,
            words: tuple[str, str] | None, checks: list[dict]) -> None:
        row = {"id": item, "file_name": self.save("images", str(source.spec.seed), source.image),
               "source": source.caption, "target": target.caption, "type": kind}
        if mask is not None:
            row["mask"] = self.save("masks", item, _picture(mask))
            row["mask_words"] = f"{words[0]}:{words[1]}"
            row["target_image"] = self.save("targets", item, target.image)
        self.rows.append(json.dumps({**row, "palettes": PALETTES, "checks": checks}))

    def close(self) -> None:
        (self.folder / "metadata.jsonl").write_text("\n".join(self.rows) + "\n")


def colour_check(name: str, region: str, palette: str, expect: str) -> dict:
    return {"name": name, "kind": "colour", "region": region, "palette": palette, "expect": expect}


def psnr_check(name: str, region: str) -> dict:
    return {"name": name, "kind": "psnr", "region": region}


def success_check(writer: SetWriter, item: str, kind: str, target: Scene, index: int = 0) -> dict:
    """The judge of an edit of object `index`: its colour, its shape, or the background around it."""
    thing = target.objects[index]
    if kind == "shape":
        return {"name": "success", "kind": "shape", "colour": thing.colour, "expect": thing.shape}
    if kind == "background":
        return colour_check("success", writer.region(item, "around", ~thing.mask), "backgrounds", target.background)
    return colour_check("success", writer.region(item, "object", thing.mask), "colours", thing.colour)


def _changed(source: Scene, target: Scene, index: int) -> np.ndarray:
    return source.objects[index].mask | target.objects[index].mask


def _words(source: Spec, target: Spec, kind: str, index: int = 0) -> tuple[str, str]:
    if kind == "background":
        return source.background, target.background
    attribute = "shape" if kind == "shape" else "colour"
    return getattr(source.objects[index], attribute), getattr(target.objects[index], attribute)


def write_editing(folder: Path, scenes: int) -> None:
    writer = SetWriter(folder)
    for i, spec in enumerate(held_out_specs(scenes, objects=1)):
        kind, target_spec = edit_task(spec, i)
        source, target, item = render(spec), render(target_spec), str(spec.seed)
        changed = _changed(source, target, 0)
        kept = changed if kind == "background" else ~changed
        mask = ~changed if kind == "background" else grown(changed, MASK_GROWTH)
        writer.row(item, source, target, kind, mask, _words(spec, target_spec, kind),
                   [success_check(writer, item, kind, target), psnr_check("preservation",
                                                                          writer.region(item, "kept", kept))])
    writer.close()


def _outside_objects(source: Scene, target: Scene) -> np.ndarray:
    return ~np.any([thing.mask for scene in (source, target) for thing in scene.objects], axis=0)


def write_two_objects(folder: Path, scenes: int) -> None:
    writer = SetWriter(folder)
    for i, spec in enumerate(held_out_specs(scenes, objects=2)):
        index, item = i % 2, str(spec.seed)
        target_spec = recoloured(spec, index)
        source, target = render(spec), render(target_spec)
        other = source.objects[1 - index]
        other_region = writer.region(item, "other", other.mask)
        checks = [success_check(writer, item, "colour", target, index),
                  colour_check("other_kept", other_region, "colours", other.colour),
                  psnr_check("psnr_other", other_region),
                  psnr_check("psnr_outside", writer.region(item, "outside", _outside_objects(source, target)))]
        writer.row(item, source, target, "two objects", grown(_changed(source, target, index), MASK_GROWTH),
                   _words(spec, target_spec, "colour", index), checks)
    writer.close()


def write_one_object(folder: Path, scenes: int) -> None:
    writer = SetWriter(folder)
    for kind in ("colour", "shape"):
        for spec in held_out_specs(scenes, objects=1):
            _, target_spec = edit_task(spec, EDIT_KINDS.index(kind))
            source, target, item = render(spec), render(target_spec), f"{spec.seed}-{kind}"
            checks = [success_check(writer, item, kind, target),
                      psnr_check("psnr_outside", writer.region(item, "outside", _outside_objects(source, target)))]
            writer.row(item, source, target, kind, grown(_changed(source, target, 0), MASK_GROWTH),
                       _words(spec, target_spec, kind), checks)
    writer.close()


def write_reconstruction(folder: Path, scenes: int) -> None:
    writer = SetWriter(folder)
    for objects, kind in ((2, "two objects"), (1, "one object")):
        for spec in held_out_specs(scenes, objects=objects):
            scene, item = render(spec), str(spec.seed)
            checks = []
            for number, thing in enumerate(scene.objects):
                region = writer.region(item, f"object{number}", thing.mask)
                checks += [colour_check("objects_kept", region, "colours", thing.colour),
                           psnr_check("psnr_objects", region)]
            writer.row(item, scene, scene, kind, None, None, checks)
    writer.close()


def write_ovals(folder: Path, scenes: int) -> None:
    """One-object scenes recoloured inside an oval mask around the object (OVAL_MARGIN pixels of background
    inside it): where `seam` looks for a step in texture at the mask's edge."""
    writer = SetWriter(folder)
    for spec in held_out_specs(scenes, objects=1):
        _, target_spec = edit_task(spec, EDIT_KINDS.index("colour"))
        source, target, item = render(spec), render(target_spec), str(spec.seed)
        mask = oval(source.objects[0].box, OVAL_MARGIN, source.image.width)
        checks = [success_check(writer, item, "colour", target),
                  psnr_check("psnr_outside", writer.region(item, "outside", _outside_objects(source, target)))]
        writer.row(item, source, target, "colour", mask, _words(spec, target_spec, "colour"), checks)
    writer.close()


SETS = {"editing": write_editing, "two-objects": write_two_objects, "one-object": write_one_object,
        "reconstruction": write_reconstruction, "ovals": write_ovals}


def write_sets(folder: Path, scenes: int, names=tuple(SETS)) -> None:
    for name in names:
        SETS[name](folder / name, scenes)


def example(output: Path, seed: int, index: int) -> None:
    """The README's picture: a held-out two-object scene with one object recoloured by `icd edit --mask` on
    mini (the mask: the renderer's, grown as in the sets), shown as input | mask | edit."""
    spec = random_spec(seed)
    target_spec = recoloured(spec, index)
    source, target = render(spec), render(target_spec)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        source.image.save(work / "scene.png")
        mask = _picture(grown(_changed(source, target, index), MASK_GROWTH))
        mask.save(work / "mask.png")
        subprocess.run([sys.executable, "-m", "icd", "edit", "scene.png", "--model", "mini", "--src",
                        source.caption, "--tgt", target.caption, "--mask", "mask.png", "-o", "edit.png",
                        "--quiet"], cwd=work, check=True)
        edited = Image.open(work / "edit.png").convert("RGB")
    words = _words(spec, target_spec, "colour", index)
    picture = labelled_row([(source.image, "input"), (mask, "--mask"), (edited, f"edit: {words[0]} -> {words[1]}")])
    picture.save(output, optimize=True)
    print(f"{output}: {source.caption} -> {target.caption}")


def region(settings: dict) -> str:
    """The old tables' name of what confined an edit: none, blend (the words), mask, mask+keep."""
    use = settings["mask_use"]
    return {"words": "blend", "mask": "mask+keep" if settings["keep_outside"] else "mask"}.get(use, use)


def strength_table(summary: dict) -> str:
    """A two-object run's --strength sweep from its summary.json, compact: a row per solver, method and region,
    a column per strength, each cell success / PSNR inside the other object / PSNR outside both objects."""
    cells: dict[tuple, dict] = {}
    for row in summary["overall"]:
        settings, metrics = row["settings"], row["metrics"]
        if settings["strength"] is not None:
            cells.setdefault((settings["solver"], settings["method"], region(settings)), {})[settings["strength"]] = \
                f"{100 * metrics['success']:.0f}% / {metrics['psnr_other']:.1f} / {metrics['psnr_outside']:.1f}"
    strengths = sorted({strength for row in cells.values() for strength in row})
    lines = ["| solver | method | region | " + " | ".join(f"s={value:g}" for value in strengths) + " |",
             "| --- | --- | --- |" + " ---: |" * len(strengths)]
    for (solver, method, where), row in cells.items():
        lines.append(f"| {solver} | {method} | {where} | " + " | ".join(row.get(v, "") for v in strengths) + " |")
    return "\n".join(lines)


def seam_table(dataset: Path, evaluation: Path) -> str:
    """The seam of every masked setting of an `icd eval` run on a set with masks and a `psnr_outside` check
    (ovals, two-objects, one-object): texture energy relative to the photo's in bands across the mask's edge
    (pooled over the scenes; the objects, outside that check's region, left out), the step between the bands
    either side (`seam.seam_step`), and how far the pixels outside the mask moved from the photo's (mean
    |difference|)."""
    rows = {row["id"]: row for row in map(json.loads, (dataset / "metadata.jsonl").read_text().splitlines())}
    pooled: dict[str, dict] = {}
    for record in map(json.loads, (evaluation / "results.jsonl").read_text().splitlines()):
        if record["settings"]["mask_use"] != "mask":
            continue
        row = rows[record["id"]]
        photo = Image.open(dataset / row["file_name"]).convert("RGB")
        edited = Image.open(evaluation / record["edit"]).convert("RGB")
        mask = np.asarray(Image.open(dataset / row["mask"])) > 127
        outside = next(check["region"] for check in row["checks"] if check["name"] == "psnr_outside")
        objects = np.asarray(Image.open(dataset / outside)) <= 127
        setting = pooled.setdefault(record["setting"], {"profile": 0.0, "step": 0.0, "moved": [], "n": 0})
        setting["profile"] = setting["profile"] + seam_bands(edited, photo, mask, objects, PROFILE_EDGES)
        setting["step"] = setting["step"] + seam_bands(edited, photo, mask, objects, SEAM_EDGES)
        difference = np.abs(np.asarray(edited, np.float64) - np.asarray(photo, np.float64))
        setting["moved"].append(difference[~mask].mean())
        setting["n"] += 1
    bands = [f"{low:g}..{high:g}" for low, high in zip(PROFILE_EDGES, PROFILE_EDGES[1:])]
    lines = ["| setting | n | seam step | " + " | ".join(bands) + " | outside the mask: mean abs. change |",
             "| --- | ---: | ---: |" + " ---: |" * len(bands) + " ---: |"]
    for label, setting in sorted(pooled.items()):
        cells = " | ".join(f"{value:.2f}" for value in profile(setting["profile"]))
        lines.append(f"| {label} | {setting['n']} | {seam_step(setting['step']):.2f} | {cells} | "
                     f"{np.mean(setting['moved']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write the sets as icd eval folders")
    write.add_argument("output", type=Path)
    write.add_argument("--scenes", type=int, default=48, help="scenes per set (and per kind of one-object edit)")
    write.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    picture = commands.add_parser("example", help="the README's picture of a --mask edit on mini")
    picture.add_argument("--seed", type=int, default=1000014, help="a held-out two-object scene")
    picture.add_argument("--object", type=int, default=0, help="the object to recolour (0 or 1)")
    picture.add_argument("--output", type=Path, required=True)
    sweep = commands.add_parser("strengths", help="the compact --strength table of a two-objects evaluation")
    sweep.add_argument("summary", type=Path, help="its summary.json")
    seams = commands.add_parser("seam", help="texture across the mask's edge in a masked evaluation of a set")
    seams.add_argument("dataset", type=Path, help="the set's folder (ovals, two-objects or one-object)")
    seams.add_argument("evaluation", type=Path, help="the icd eval output folder")
    args = parser.parse_args()
    if args.command == "write":
        write_sets(args.output, args.scenes, args.sets)
        print("\n".join(str(args.output / name) for name in args.sets))
    elif args.command == "strengths":
        print(strength_table(json.loads(args.summary.read_text())))
    elif args.command == "seam":
        print(seam_table(args.dataset, args.evaluation))
    else:
        example(args.output, args.seed, args.object)


if __name__ == "__main__":
    main()
