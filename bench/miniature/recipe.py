"""The miniature world's whole recipe, as a user would run it: pretrain a base model, `icd train guidance`,
`icd train icd` (the shipped 4-step model and the variants the paper compares), then evaluate.

Stages whose output folder already holds a finished model are skipped, so an interrupted recipe continues.
Two stage-2 variants train at a time, one thread each (a 2-core machine); on a GPU set --jobs 1.

Usage: python bench/miniature/recipe.py --output /tmp/mini [--base DIR] [--variants icd-4 icd-4-nopres ...]
       [--ship icdcli/assets/mini]  (the `icd` package's folder)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES = 4000  # scenes 0..3999 train; evaluation uses seeds from 10**6 on
VARIANTS = {  # name: (forward timesteps, reverse timesteps, extra settings)
    "icd-4": ("19,259,519,779", "259,519,779,999", ()),
    "icd-4-nopres": ("19,259,519,779", "259,519,779,999", ("icd.forward_preservation=0", "icd.reverse_preservation=0")),
    "icd-3": ("19,339,659", "339,659,999", ()),
    "icd-2": ("19,499", "499,999", ()),
}


def run(command: list[str], log: Path, threads: int) -> subprocess.Popen:
    """Start a stage with its output in a log file; the command is printed as a user would type it."""
    print("$", " ".join(command).replace(f"{sys.executable} -m icd", "icd"), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait(processes: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    for name, process in processes.items():
        if process.wait() != 0:
            sys.exit(f"{name} failed; see {logs[name]}:\n" + logs[name].read_text()[-2000:])


def train(stage: str, output: Path, settings: list[str], threads: int) -> subprocess.Popen | None:
    if (output / "done").is_file():
        print(f"{output}: already trained")
        return None
    config = HERE / ("guidance.toml" if stage == "guidance" else "icd.toml")
    command = [sys.executable, "-m", "icd", "train", stage, "--config", str(config), "-o", str(output),
               *(part for s in settings for part in ("--set", s))]
    if (output / "checkpoints").is_dir():
        command.append("--resume")
    return run(command, output.with_suffix(".log"), threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--base", type=Path, help="a pretrained base (pretrain.py's output) instead of pretraining")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="stage-2 variants trained at once")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each stage, shared by the variants "
                        "trained at once (1 leaves a core to another job: two jobs' threads on one core crawl)")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="extra setting for both stages")
    parser.add_argument("--ship", type=Path, help="also package the icd-4 model (fp16) into this folder")
    args = parser.parse_args()
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, timings = time.perf_counter(), {}

    base = args.base.resolve() if args.base else out / "base"
    if not (base / "model_index.json").is_file():
        wait({"pretrain": run([sys.executable, str(HERE / "pretrain.py"), "--output", str(base), "--threads",
                               str(args.threads)], out / "pretrain.log", args.threads)}, {"pretrain": out / "pretrain.log"})
    timings["pretrain_s"] = time.perf_counter() - started

    data = out / "data"
    if not (data / "metadata.jsonl").is_file():
        from world import write_imagefolder  # the script's own folder

        write_imagefolder(data, range(IMAGES), 64)
    common = [f"data.path={data}", f"data.latent_cache={out / 'latents.safetensors'}", *args.settings]

    teacher = out / "teacher"
    process = train("guidance", teacher, [f"model.path={base}", *common], args.threads)
    if process:
        wait({"guidance": process}, {"guidance": teacher.with_suffix(".log")})
        (teacher / "done").touch()
    timings["guidance_s"] = time.perf_counter() - started - sum(timings.values())

    pending = list(args.variants)
    while pending:
        batch, pending = pending[:args.jobs], pending[args.jobs:]
        processes, logs = {}, {}
        for name in batch:
            forward, reverse, extra = VARIANTS[name]
            settings = [f"model.path={teacher}", *common, f"icd.forward_timesteps={forward}",
                        f"icd.reverse_timesteps={reverse}", *extra]
            process = train("icd", out / name, settings, max(1, args.threads // len(batch)))
            if process:
                processes[name], logs[name] = process, (out / name).with_suffix(".log")
        wait(processes, logs)
        for name in processes:
            (out / name / "done").touch()
    timings["icd_s"] = time.perf_counter() - started - sum(timings.values())
    timings["total_s"] = time.perf_counter() - started
    (out / "recipe.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n")
    print(json.dumps(timings, indent=2))
    if args.ship:
        from ship import ship

        ship(out / "icd-4", args.ship)
        print(f"packaged {out / 'icd-4'} into {args.ship}")


if __name__ == "__main__":
    main()
