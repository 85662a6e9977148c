"""Prove `icd train` works at small scale on the CPU: the three measurements of the training issue, before and
after a short run, with and without the preservation losses, under the official and the summed schedule.

Setup (fixed seeds): the built-in tiny SD1.5-shaped model; a set of synthetic captioned shapes; its base UNet
pretrained briefly as a denoiser of those images (train.synthetic.pretrain_tiny_base explains why); stage 1
(guidance distillation) on it; then each stage-2 variant from the same teacher. Prints markdown tables.

Usage: python bench/train_tiny.py [--steps 300] [--threads 1]
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
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # the test models (fixtures/) and bench.miniature

import torch  # noqa: E402

from bench.miniature.world import write_imagefolder  # noqa: E402
from fixtures.tiny import build_tiny_model  # noqa: E402
from icd_train.config import GuidanceConfig, ICDConfig, load_config  # noqa: E402
from icd_train.guidance import train_guidance  # noqa: E402
from icd_train.icd import train_icd  # noqa: E402
from fixtures.synthetic import pretrain_tiny_base  # noqa: E402

RUNS = {
    "official, preservation 1.5": (),
    "official, no preservation": ("icd.forward_preservation=0", "icd.reverse_preservation=0"),
    "summed, preservation 1.5": ("icd.schedule=summed",),
    "summed, no preservation": ("icd.schedule=summed", "icd.forward_preservation=0", "icd.reverse_preservation=0"),
}


def settings(args, data: Path, model: Path) -> tuple[str, ...]:
    return (f"model.path={model}", f"data.path={data}", f"data.resolution={args.resolution}", "data.workers=0",
            f"train.batch_size={args.batch}", "train.eval_samples=8", "train.eval_every=0",
            "train.gradient_checkpointing=false", "train.log_every=50", "train.checkpoint_every=100000")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="stage-2 iterations per variant")
    parser.add_argument("--guidance-steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), fp32; {args.images} images at {args.resolution}px, batch {args.batch}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_tiny_model(root / "tiny").parent
        data = write_imagefolder(root / "data", range(args.images), args.resolution).parent
        started = time.perf_counter()
        pretrained = pretrain_tiny_base(model, data, args.resolution, args.pretrain_steps)
        print(f"\nbase pretraining: {args.pretrain_steps} steps in {time.perf_counter() - started:.0f} s, denoising "
              f"loss {pretrained['denoising_loss_first']:.3f} -> {pretrained['denoising_loss_last']:.3f}")
        stage1 = train_guidance(load_config(GuidanceConfig, overrides=(
            *settings(args, data, model), f"train.max_steps={args.guidance_steps}", "train.lr=3e-4")), root / "teacher")
        print(f"stage 1 (guidance distillation): {args.guidance_steps} steps at {stage1['iterations_per_second']:.2f} "
              f"it/s, gap to the CFG target {stage1['eval_before']['guidance_gap']:.4f} -> "
              f"{stage1['eval_after']['guidance_gap']:.4f}\n")
        print(f"stage 2: {args.steps} iterations per variant, LoRA rank 8 (alpha 8), lr 1e-3, paper w set, Huber "
              f"c = 0.001; evaluated on 8 images (w = 0) every {args.eval_every} iterations\n")
        print("| variant | decode gap | jump gap | reconstruction | it/s | UNet calls / it | UNet passes / it "
              "| updates per student / it |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        teacher_reconstruction = None
        for name, overrides in RUNS.items():
            config = load_config(ICDConfig, overrides=(*settings(args, data, root / "teacher"), "lora.rank=8",
                                                       "lora.alpha=8", "train.lr=1e-3", f"train.eval_every={args.eval_every}",
                                                       f"train.max_steps={args.steps}", *overrides))
            summary = train_icd(config, root / name.replace(",", "").replace(" ", "-"))
            evals = [summary["eval_before"], *(summary[f"eval_{step}"] for step in range(args.eval_every, args.steps,
                                                                                        args.eval_every)),
                     summary["eval_after"]]
            teacher_reconstruction = evals[0]["teacher_reconstruction"]
            trajectory = {key: " -> ".join(f"{e[key]:.3f}" for e in evals) for key in ("decode_gap", "reconstruction")}
            updates = 1 if config.icd.schedule == "summed" or not config.icd.reverse_preservation else 2
            print(f"| {name} | {trajectory['decode_gap']} | {evals[0]['jump_gap']:.4f} -> {evals[-1]['jump_gap']:.4f} "
                  f"| {trajectory['reconstruction']} | {summary['iterations_per_second']:.2f} "
                  f"| {summary['train']['unet_calls']:.0f} | {summary['train']['unet_passes']:.0f} | {updates} |")
        print(f"\nreference: the teacher's own 50+50-step DDIM inversion, reconstruction {teacher_reconstruction:.4f}")


if __name__ == "__main__":
    main()
