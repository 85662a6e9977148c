"""Time the core pipeline on the built-in tiny models (CPU): load, invert, edit per method, reconstruct, generate.

These are not photo-editing speeds (the tiny UNets are ~2M parameters); they measure the Python overhead of
the loops and catch regressions. Usage: python bench/tiny_cpu.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test models (fixtures/)

import torch  # noqa: E402
from fixtures.tiny import build_tiny_model  # noqa: E402

from icd import pipeline
from icd.editing import edit_plan  # noqa: E402
from icd.models.official import EDIT_METHODS  # noqa: E402
from icd.app.session import open_session  # noqa: E402
from timing import median_ms  # noqa: E402  (bench/ is the script's folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, fp32, 128x128 image (latent 16x16), median of {args.repeats}")
    print("| model | stage | ms |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("sd15", "sdxl"):
            path = str(build_tiny_model(os.path.join(folder, kind), kind=kind))
            start = time.perf_counter()
            model = open_session(path, "cpu", "fp32", "torch", directions=("forward", "reverse"))
            print(f"| tiny-{kind} | load (text encoders, VAE, teacher + 2 LoRA fusions) | "
                  f"{(time.perf_counter() - start) * 1000:.0f} |")
            pixels = torch.rand(1, 3, 128, 128) * 2 - 1
            x_T = pipeline.invert(model, pixels, "a red cat", seed=0)
            stages = {
                "invert (VAE encode + 4 forward steps)": lambda: pipeline.invert(model, pixels, "a red cat", 0),
                "reconstruct (4 reverse steps + VAE decode)": lambda: pipeline.reconstruct(model, x_T, "a red cat"),
                "generate (4 steps + VAE decode)": lambda: pipeline.generate(model, "a red cat", 0, 128, 128),
            }
            for method in EDIT_METHODS:
                stages[f"edit {method} from x_T (4 steps + decode)"] = (
                    lambda m=method: pipeline.edit(model, x_T, edit_plan(model.manifest, "a red cat", "a blue cat",
                                                                         method=m)))
            for name, fn in stages.items():
                print(f"| tiny-{kind} | {name} | {median_ms(fn, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
