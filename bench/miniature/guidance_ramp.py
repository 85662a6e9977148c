"""Is the authors' two-parameter guidance ramp worth an option? (issue 14)

The official code scales w by gamma = 1 for t/1000 <= tau1, 0 for t/1000 >= tau2 and (tau2 - u)/(tau2 - tau1)
in between; icd's `--tau` is the special case tau1 = tau2. This measures ramps against icd's step at the
same w on `mini`, with the local-edits benchmark's scenes and judges (one-object colour edits, two-object
recolours without a region), p2p and swap. The ramp is put in place of the decoding's guidance schedule for
the experiment only (`ramped`); as officially, swap uses the source prompt above tau1. icd itself has no
ramp unless this shows it helps.

Usage: OMP_NUM_THREADS=1 python bench/miniature/guidance_ramp.py [--scenes 48] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from local_edits import measure, one_object_cases, two_object_cases  # noqa: E402

from icd import pipeline  # noqa: E402
from icd.app.session import open_session  # noqa: E402
from icd.core.schedule import NUM_TRAIN_TIMESTEPS, reverse_jumps  # noqa: E402
from icd.editing import edit_plan, model_defaults  # noqa: E402
from icd.images import image_to_array, pixels_to_image  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    session = open_session("mini", "cpu", "fp32", "torch")
    guidance = model_defaults(session.manifest).guidance
    cases = one_object_cases(args.scenes, "colour") + two_object_cases(args.scenes)
    steps = [jump.t for jump in reverse_jumps(list(session.manifest.reverse_timesteps))]
    scores: dict[tuple, list[dict]] = {}
    with torch.no_grad():
        for case in cases:
            pixels = torch.from_numpy(image_to_array(case.source.image))
            x_T = pipeline.invert(session, pixels, case.source.caption, seed=0)
            for tau1, tau2 in RAMPS:
                with ramped(tau1, tau2):
                    for method in ("p2p", "swap"):
                        plan = edit_plan(session.manifest, case.source.caption, case.target.caption, method=method,
                                         guidance=guidance, tau=tau1)
                        result = pipeline.edit(session, x_T, plan, with_reconstruction=False)
                        scores.setdefault((case.kind, method, tau1, tau2), []).append(
                            measure(case, pixels_to_image(result.edited[0])))
    rows = [{"edit": kind, "method": method, "tau1": tau1, "tau2": tau2,
             "w_per_step": [round(guidance * ramp_weight(t, tau1, tau2), 2) for t in steps],
             **{name: float(np.mean([s[name] for s in group])) for name in group[0]}}
            for (kind, method, tau1, tau2), group in scores.items()]
    print(f"| edit | method | tau1 -> tau2 | w on steps t = {', '.join(map(str, steps))} | success | "
          "PSNR outside the objects (dB) | PSNR other object (dB) |\n| --- | --- | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        other = f"{row['other_psnr']:.2f}" if "other_psnr" in row else ""
        print(f"| {row['edit']} | {row['method']} | {row['tau1']} -> {row['tau2']} | {row['w_per_step']} | "
              f"{row['success']:.0%} | {row['outside_psnr']:.2f} | {other} |")
    if args.json:
        args.json.write_text(json.dumps({"scenes": args.scenes, "guidance": guidance, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
