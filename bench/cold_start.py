"""Where a cold `icd edit` spends its time: a fresh process walks the steps the command takes (Python's own
start, the CLI's imports, torch, transformers, diffusers, opening the model, the UNets with their LoRAs fused,
the first photo edit, a second one, writing the PNG) and times each; the parent repeats it and prints the
medians next to the wall time of a real `icd edit` process on the same photo.

Usage: OMP_NUM_THREADS=1 python bench/cold_start.py [--model mini] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("python start", "import icd CLI (click, pydantic, numpy, PIL)", "import torch", "import transformers",
         "import diffusers", "the model classes (diffusers' and transformers' lazy modules)",
         "open the model (text encoder, VAE: weights read)", "UNets (teacher read, LoRAs fused)",
         "first photo edit (invert + edit)", "second photo edit", "write the PNG")


def child(model: str, photo: Path, source: str, target: str, launched: float) -> dict[str, float]:
    """The steps of one cold edit in this process, in seconds; run as a fresh process by `main`."""
    marks = [time.time() - launched]
    clock = time.perf_counter()

    def mark() -> None:
        nonlocal clock
        now = time.perf_counter()
        marks.append(now - clock)
        clock = now

    for modules in (["icd.app.cli", "icd.images"], ["torch"], ["transformers"], ["diffusers"]):
        for module in modules:  # what every command imports first, then the libraries the model needs
            importlib.import_module(module)
        mark()
    for module, names in (("diffusers", ("AutoencoderKL", "UNet2DConditionModel")),
                          ("transformers", ("CLIPTextModel", "CLIPTokenizer"))):
        for name in names:  # each class pulls in its library's lazily imported modules
            getattr(importlib.import_module(module), name)
    mark()
    import torch

    from icd.images import from_model_output, load_image, save_image, to_model_input
    from icd import pipeline
    from icd.app.session import open_session
    from icd.editing import edit_plan

    session = open_session(model, "cpu", "fp32")
    mark()
    session.engine.unets(session.model, "forward", "reverse")
    mark()
    photo_in = load_image(photo)
    pixels = to_model_input(photo_in, photo_in.original_size)
    result = None
    for _ in range(2):
        x_T = pipeline.invert(session, pixels, source, 0)
        result = pipeline.edit(session, x_T, edit_plan(session.manifest, source, target), with_reconstruction=False)
        mark()
    with tempfile.TemporaryDirectory() as folder:
        save_image(from_model_output(result.edited[0], photo_in), Path(folder) / "out.png", metadata={})
    mark()
    assert torch.isfinite(result.edited).all()
    return dict(zip(STEPS, marks, strict=True))


def _fresh(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:4])} ... failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, metavar=("PHOTO", "SOURCE", "TARGET", "LAUNCHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        photo, source, target, launched = args.child
        print(json.dumps(child(args.model, Path(photo), source, target, float(launched))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent / "miniature"))
    from world import DEMO_SCENE, DEMO_TARGET, render

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "scene.png"
        render(DEMO_SCENE).image.save(photo)
        edit = [sys.executable, "-m", "icd", "edit", str(photo), "-m", args.model, "--device", "cpu", "--no-server",
                "--src", DEMO_SCENE.caption, "--tgt", DEMO_TARGET.caption, "-q", "--overwrite",
                "-o", str(Path(folder) / "out.png")]
        _fresh(edit, env)  # bytecode caches written, files in the page cache: every timed run starts alike
        runs, walls = [], []
        for _ in range(args.repeats):
            child_args = [sys.executable, __file__, "--model", args.model, "--child", str(photo), DEMO_SCENE.caption,
                          DEMO_TARGET.caption, repr(time.time())]
            _, done = _fresh(child_args, env)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            walls.append(_fresh(edit, env)[0])
    medians = {step: statistics.median(run[step] for run in runs) for step in STEPS}
    print(f"| step ({args.model}, CPU, median of {args.repeats}) | s | share |\n| --- | ---: | ---: |")
    total = sum(medians.values())
    for step, seconds in medians.items():
        print(f"| {step} | {seconds:.3f} | {seconds / total:.0%} |")
    print(f"| sum of the steps | {total:.3f} | |")
    print(f"| `icd edit` process, wall (median of {args.repeats}) | {statistics.median(walls):.3f} | |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "runs": runs, "edit_wall_s": walls,
                                         "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
