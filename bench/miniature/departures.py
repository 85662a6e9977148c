"""Issue 15: the authors' training recipe against our two departures from it (train/losses.py, D1 and D2),
measured on the miniature world.

Stage 2 of the miniature recipe (`icd train icd --config bench/miniature/icd.toml`, 600 iterations, the
4-step timesteps) once per variant and training seed, all from the shipped `mini`'s teacher (its teacher.pt
is fp16; training on the CPU upcasts it to fp32) and the same rendered training scenes (0..3999). Each
trained model is then measured like BENCHMARKS.md's tables: reconstruction PSNR of 48 held-out scenes,
unguided and guided (w, tau; bench/miniature/evaluate.py's functions), and p2p edit success and preservation
on 48 held-out one-object scenes (colour, shape and background swaps: `icd eval` on edit_sets.py's `editing`
set); plus the decode, jump and
reconstruction gaps against the teacher that the training logs at its last step (train/evaluate.py).

Runs already trained (a `done` file) or measured (`measured.json`) are kept, so more seeds can be added later.
Two trainings run at a time, one thread each (a 2-core machine).

Usage: python bench/miniature/departures.py --output /tmp/departures [--seeds 453645634 1]
       [--variants official ours] [--json bench/results/departures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import evaluate
from edit_sets import write_sets
from recipe import IMAGES, train, wait
from world import render, write_imagefolder

MINI = Path(__file__).resolve().parents[2] / "icdcli" / "assets" / "mini"
# name: (icd.teacher_final_step, icd.reverse_preservation_target)
VARIANTS = {
    "official": ("schedule", "start"),
    "D1 only": ("boundary", "start"),
    "D2 only": ("schedule", "clean"),
    "ours (D1 + D2)": ("boundary", "clean"),
}
GAPS = ("decode_gap", "jump_gap", "reconstruction")


def run_folder(output: Path, variant: str, seed: int) -> Path:
    slug = variant.split(" (")[0].lower().replace(" ", "-")
    return output / f"{slug}-seed{seed}"


def train_runs(output: Path, runs: list[tuple[str, int]], jobs: int) -> None:
    """Train the runs `jobs` at a time; the first waits alone until it has written the shared latent cache."""
    data, cache = output / "data", output / "latents.safetensors"
    if not (data / "metadata.jsonl").is_file():
        write_imagefolder(data, range(IMAGES), 64)
    pending = list(runs)
    while pending:
        batch, pending = pending[:jobs], pending[jobs:]
        processes, logs = {}, {}
        for variant, seed in batch:
            folder = run_folder(output, variant, seed)
            final_step, target = VARIANTS[variant]
            settings = [f"model.path={MINI}", f"data.path={data}", f"data.latent_cache={cache}",
                        f"train.seed={seed}", f"icd.teacher_final_step={final_step}",
                        f"icd.reverse_preservation_target={target}"]
            process = train("icd", folder, settings, 1)
            if process:
                processes[folder.name], logs[folder.name] = process, folder.with_suffix(".log")
                while not cache.is_file() and process.poll() is None:
                    time.sleep(2)
        wait(processes, logs)
        for name in processes:
            (output / name / "done").touch()


def logged_gaps(folder: Path) -> dict[str, float]:
    """The training's last evaluation (train/evaluate.py) from its metrics log."""
    lines = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    last = [line for line in lines if "eval/decode_gap" in line][-1]
    return {name: last[f"eval/{name}"] for name in GAPS} | {"step": last["step"]}


def edit_scores(folder: Path, sets: Path, guidance: float, tau: float) -> dict:
    """p2p edit success and preservation per kind of edit, by `icd eval` on the editing set (one thread)."""
    out = folder / "eval-editing"
    subprocess.run([sys.executable, "-m", "icd", "eval", str(sets / "editing"), "-m", str(folder), "-o", str(out),
                    "--method", "p2p", "--guidance", f"{guidance:g}", "--tau", f"{tau:g}", "--metrics", "checks",
                    "--device", "cpu", "--no-server", "-q"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    by_type = json.loads((out / "summary.json").read_text())["by_type"]
    return {f"{name}_{kind}": rows[0]["metrics"][metric] for kind, rows in by_type.items()
            for name, metric in (("success", "success"), ("preservation", "preservation"))}


def measure(folder: Path, sets: Path, scenes: int, guidance: float, tau: float) -> dict:
    """Reconstruction PSNR (unguided; guided with dynamic guidance), p2p editing and the training's gaps."""
    cached = folder / "measured.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    model = {folder.name: evaluate.load(str(folder))}
    with torch.no_grad():
        inversion = evaluate.inversion(model, [render(spec) for spec in evaluate.held_out_specs(scenes)], guidance,
                                       tau)
    by_decoding = {row["decoding"]: row["psnr"] for row in inversion}
    result = {"psnr_unguided": by_decoding["unguided"],
              "psnr_guided": by_decoding[f"w={guidance:g}, tau={tau:g}"],
              **edit_scores(folder, sets, guidance, tau), **logged_gaps(folder)}
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


COLUMNS = ("psnr_unguided", "psnr_guided", "success_colour", "success_shape", "success_background",
           "preservation_colour", "preservation_shape", "preservation_background", *GAPS)


def summary_table(results: dict[str, dict[int, dict]]) -> str:
    """One row per run, then per variant the mean over seeds and, with two or more, the spread (max - min)."""
    header = "| variant | seed | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
    fmt = lambda key, v: f"{v:.4f}" if key in GAPS else f"{v:.2f}"  # noqa: E731
    for variant, by_seed in results.items():
        for seed, values in by_seed.items():
            lines.append(f"| {variant} | {seed} | " + " | ".join(fmt(k, values[k]) for k in COLUMNS) + " |")
        if len(by_seed) > 1:
            columns = {k: [values[k] for values in by_seed.values()] for k in COLUMNS}
            lines.append(f"| {variant} | mean | " + " | ".join(fmt(k, statistics.mean(v)) for k, v in columns.items())
                         + " |")
            lines.append(f"| {variant} | spread | " + " | ".join(fmt(k, max(v) - min(v)) for k, v in columns.items())
                         + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[453645634])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the measurements")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    train_runs(output, runs, args.jobs)
    torch.set_num_threads(args.threads)
    sets = output / "sets"
    if not (sets / "editing" / "metadata.jsonl").is_file():
        write_sets(sets, args.scenes, ["editing"])
    results: dict[str, dict[int, dict]] = {variant: {} for variant in args.variants}
    for variant, seed in runs:
        results[variant][seed] = measure(run_folder(output, variant, seed), sets, args.scenes, args.guidance,
                                         args.tau)
    print(summary_table(results))
    if args.json:
        settings = {variant: dict(zip(("teacher_final_step", "reverse_preservation_target"), VARIANTS[variant]))
                    for variant in args.variants}
        args.json.write_text(json.dumps({"settings": settings, "guidance": args.guidance, "tau": args.tau,
                                         "scenes": args.scenes, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
