"""Prompt-to-Prompt and the prompt swap on every CPU backend, side by side: a photo edit (invert + decode)
with eager torch, torch.compile (inductor) and ONNX Runtime; medians, the ratio to the first backend, the
largest pixel difference from it (levels of 255, an edit of one random x_T); and the ATen ops of one
reverse UNet call with and without Prompt-to-Prompt (counted by a TorchDispatchMode).

Models: `mini` (shipped), the random-weight `tiny` test model and random-weight SD1.5 at 128x128 (`sd15`:
built once into $ICD_HOME, ~3.4 GB in fp32; its ONNX export takes minutes and inductor's CPU build of it
far longer, so name the backends). Usage:
    python bench/p2p_backends.py [--repeats N] [--models mini tiny sd15] [--backends torch onnx]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test models (fixtures/)

import torch  # noqa: E402
from fixtures.tiny import build_tiny_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from icd import pipeline
from icd.editing import edit_plan  # noqa: E402
from icd.app.session import open_session  # noqa: E402
from timing import median_ms  # noqa: E402  (bench/ is the script's folder)

PROMPTS = {"mini": ("a red circle on a sandy background", "a blue circle on a sandy background"),
           "tiny": ("a red cat", "a blue cat"), "sd15": ("a photo of a cat", "a photo of a dog")}
SIZES = {"mini": 64, "tiny": 64, "sd15": 128}
BACKENDS = {"torch": ("torch", False), "torch+compile": ("torch", True), "onnx": ("onnx", False)}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def ops_per_call(session, source: str, target: str, size: int) -> tuple[int, int]:
    """ATen ops of one reverse UNet call: plain (1 row) and Prompt-to-Prompt (2 rows), eager torch."""
    model = session.model
    cond = model.encode_text([source, target], (size, size))
    x = torch.randn(2, *model.latent_shape(size, size)[1:])
    host = session.attention_host()
    controller = host.controller(model.tokenizers[0], source, target, 4, latent_size=tuple(x.shape[-2:]))
    counts = []
    with torch.inference_mode():
        with OpCounter() as plain:
            session.denoiser("reverse")(x[:1], 999, cond.rows(slice(0, 1)), torch.zeros(1))
        counts.append(sum(plain.ops.values()))
        with host.attached(controller), OpCounter() as steered:
            host.denoiser(x, 999, cond, torch.zeros(2))
        counts.append(sum(steered.ops.values()))
    return counts[0], counts[1]


def model_latent(name: str, size: int) -> tuple[int, ...]:
    return open_session(name, "cpu", "fp32", "torch").model.latent_shape(size, size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=list(PROMPTS), default=["mini", "tiny"])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS),
                        help="the first is the one the others are compared with")
    args = parser.parse_args()
    home = Path(os.environ.setdefault("ICD_HOME", tempfile.mkdtemp(prefix="icd-bench-")))
    if "tiny" in args.models and not (home / "models" / "tiny").is_dir():
        build_tiny_model(home / "models" / "tiny", kind="sd15")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats}")
    print(f"{'model':8} {'method':6} {'backend':14} {'edit ms':>9} {'vs ' + args.backends[0]:>9} {'max levels':>12}")
    for kind in args.models:
        if kind == "sd15":
            from icd.models.offline import build_random_model

            name = str(build_random_model("sd15"))
        else:
            name = kind
        source, target = PROMPTS[kind]
        size = SIZES[kind]
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        x_T = torch.randn(model_latent(name, size), generator=torch.Generator().manual_seed(5))
        for method in ("p2p", "swap"):
            first = reference = None
            for label in args.backends:
                backend, compile = BACKENDS[label]
                session = open_session(name, "cpu", "fp32", backend, compile=compile)

                def photo_edit():
                    x_T = pipeline.invert(session, pixels, source, seed=0)
                    plan = edit_plan(session.manifest, source, target, method=method)
                    pipeline.edit(session, x_T, plan, with_reconstruction=False)

                ms = median_ms(photo_edit, args.repeats, warmup=2)  # compiles during the warm-up
                first = first or ms
                # The pixels, from one x_T (a random model's inversion is too ill-conditioned to compare)
                plan = edit_plan(session.manifest, source, target, method=method)
                edited = pipeline.edit(session, x_T, plan, with_reconstruction=False).edited
                reference = edited if reference is None else reference
                levels = (edited - reference).abs().max().item() * 127.5
                print(f"{kind:8} {method:6} {label:14} {ms:9.1f} {first / ms:8.2f}x {levels:12.2f}", flush=True)
        plain, steered = ops_per_call(open_session(name, "cpu", "fp32", "torch"), source, target, size)
        print(f"{kind:8} ATen ops per reverse UNet call: plain {plain}, prompt-to-prompt {steered} "
              f"({steered / plain:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
