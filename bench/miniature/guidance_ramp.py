"""Is the authors' two-parameter guidance ramp worth an option? (issue 14)

The official code scales w by gamma = 1 for t/1000 <= tau1, 0 for t/1000 >= tau2 and (tau2 - u)/(tau2 - tau1)
in between; icd's `--tau` is the special case tau1 = tau2. This measures ramps against icd's step at the
same w on `mini`, with `icd eval` on edit_sets.py's sets and judges (one-object colour edits, two-object
recolours without a region), p2p and swap. The ramp is put in place of the decoding's guidance schedule for
the experiment only (`ramped`), and `icd eval` runs in this process so that its edits decode with it; as
officially, swap uses the source prompt above tau1. icd itself has no ramp unless this shows it helps.

Usage: OMP_NUM_THREADS=1 python bench/miniature/guidance_ramp.py --output RUN [--scenes 48] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from edit_sets import write_sets  # noqa: E402

from icd import pipeline  # noqa: E402
from icd.app.cli import main as icd_main  # noqa: E402
from icd.core.schedule import NUM_TRAIN_TIMESTEPS, reverse_jumps  # noqa: E402
from icd.editing import model_defaults  # noqa: E402
from icd.models.hub import resolve_model  # noqa: E402

RAMPS = ((0.8, 0.8), (0.5, 0.5), (1.0, 1.0), (0.6, 1.0), (0.7, 0.9), (0.5, 0.9))  # (tau1, tau2); equal = a step


def ramp_weight(t: int, tau1: float, tau2: float) -> float:
    """The official gamma: 1 at low noise, 0 at high noise, linear in between."""
    u = t / NUM_TRAIN_TIMESTEPS
    if u <= tau1:
        return 1.0
    return 0.0 if u >= tau2 else (tau2 - u) / (tau2 - tau1)


@contextmanager
def ramped(tau1: float, tau2: float):
    """The pipeline's guidance schedule replaced by the ramp while the block runs."""
    original = pipeline.guidance_schedule

    def schedule(reverse_timesteps, guidance, tau):
        return [(jump, guidance * ramp_weight(jump.t, tau1, tau2)) for jump in reverse_jumps(list(reverse_timesteps))]

    pipeline.guidance_schedule = schedule
    try:
        yield
    finally:
        pipeline.guidance_schedule = original


def evaluate_ramp(sets: Path, output: Path, guidance: float, tau1: float, tau2: float) -> list[dict]:
    """`icd eval` of p2p and swap under the ramp: one-object colour edits and two-object recolours."""
    rows = []
    with ramped(tau1, tau2):
        for name, kind, types in (("one-object", "colour", ["--types", "colour"]), ("two-objects", "two objects", [])):
            folder = output / f"{name}-ramp{tau1:g}-{tau2:g}"
            try:
                icd_main(["eval", str(sets / name), "-m", "mini", "-o", str(folder), "--sweep", "method=p2p,swap",
                          "--guidance", f"{guidance:g}", "--tau", f"{tau1:g}", "--metrics", "checks", "--device",
                          "cpu", "--no-server", "-q", *types], standalone_mode=False)
            except SystemExit as done:
                if done.code:
                    raise
            for row in json.loads((folder / "summary.json").read_text())["overall"]:
                rows.append({"edit": kind, "method": row["settings"]["method"], "tau1": tau1, "tau2": tau2,
                             **{name: value for name, value in row["metrics"].items() if value is not None}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="a folder for the sets and the evaluations")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = resolve_model("mini")
    guidance = model_defaults(manifest).guidance
    sets = args.output / "sets"
    if not (sets / "two-objects" / "metadata.jsonl").is_file():
        write_sets(sets, args.scenes, ["one-object", "two-objects"])
    steps = [jump.t for jump in reverse_jumps(list(manifest.reverse_timesteps))]
    rows = [row for tau1, tau2 in RAMPS for row in evaluate_ramp(sets, args.output, guidance, tau1, tau2)]
    for row in rows:
        row["w_per_step"] = [round(guidance * ramp_weight(t, row["tau1"], row["tau2"]), 2) for t in steps]
    print(f"| edit | method | tau1 -> tau2 | w on steps t = {', '.join(map(str, steps))} | success | "
          "PSNR outside the objects (dB) | PSNR other object (dB) |\n| --- | --- | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        other = f"{row['psnr_other']:.2f}" if "psnr_other" in row else ""
        print(f"| {row['edit']} | {row['method']} | {row['tau1']} -> {row['tau2']} | {row['w_per_step']} | "
              f"{row['success']:.0%} | {row['psnr_outside']:.2f} | {other} |")
    if args.json:
        args.json.write_text(json.dumps({"scenes": args.scenes, "guidance": guidance, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
