"""The JSON of bench/gpu/measure.py as the Markdown that BENCHMARKS.md holds: the machine, one timing table
(stage, dtype, mode, ms, floor ms, ratio to floor, target, met?, the largest difference of a captured or
compiled result from the eager one, marked when a result is not finite), the launch counts, the VAE's
pixels against fp32, the test runs, and every stage that did not finish.

Usage: python bench/gpu/table.py gpu.json > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ("eager", "captured", "compile", "compile+captured", "process")


def _number(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _met(row: dict) -> str:
    if row.get("met") is None:
        return ""
    if row["met"]:
        return "yes"
    return f"no (+{row['ms'] - row['target_ms']:.0f} ms)"


def machine_line(data: dict) -> str:
    env = data.get("env", {})
    device = env.get("gpu") or env.get("device", "?")
    return (f"{data.get('mode', '?')} run on {device} (driver/clock/power: {env.get('nvidia_smi', '-')}); torch "
            f"{env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, diffusers {env.get('diffusers', '?')}, "
            f"transformers {env.get('transformers', '?')}, Python {env.get('python', '?')}; median of "
            f"{data.get('repeats')} after {data.get('warmup')} warm-up; floor = FLOPs / {data.get('peak_tflops')} "
            f"TFLOP/s; wall {data.get('wall_s')} s of a {data.get('deadline_s')} s deadline"
            + (f", stopped at the {data['stopped']}" if data.get("stopped") else ""))


def _difference(row: dict) -> str:
    """The check of a row's output: its largest |difference| from eager, and NOT FINITE when it is not."""
    text = "" if row.get("max_abs_diff_vs_eager") is None else f"{row['max_abs_diff_vs_eager']:.2g}"
    return text + (" NOT FINITE" if row.get("finite") is False else "")


def timing_table(rows: list[dict]) -> list[str]:
    """One line per timed row, grouped by model and computation (in the order first measured)."""
    order: dict[tuple, int] = {}
    for row in rows:
        order.setdefault((row["model"], row["name"]), len(order))
    rows = sorted(rows, key=lambda row: (order[row["model"], row["name"]], row["dtype"],
                                         MODES.index(row["mode"]) if row["mode"] in MODES else len(MODES)))
    lines = ["| stage | dtype | mode | ms | floor ms | ratio to floor | target | met? | max diff vs eager |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row in rows:
        where = f" (on {row['device']})" if ":" in row.get("device", "") else ""
        stage = f"{row['model']} {row['size']}x{row['size']}: {row['label']}{where}"
        target = "" if row.get("target_ms") is None else f"{row['target_ms']:.0f} ms"
        lines.append(f"| {stage} | {row['dtype']} | {row['mode']} | {_number(row['ms'])} | "
                     f"{_number(row.get('floor_ms'), 2)} | {_number(row.get('ratio'))} | {target} | {_met(row)} | "
                     f"{_difference(row)} |")
    return lines


def render(data: dict) -> str:
    rows = data.get("rows", [])
    lines = [machine_line(data), ""]
    lines += timing_table([row for row in rows if row.get("ms") is not None])
    counts = [row for row in rows if row.get("count") is not None]
    if counts:
        lines += ["", "| per call | dtype | count |", "| --- | --- | ---: |"]
        lines += [f"| {row['model']} {row['size']}x{row['size']}: {row['label']} | {row['dtype']} | {row['count']} |"
                  for row in counts]
    if data.get("vae_precision"):
        lines += ["", "VAE decode against an fp32 copy (levels of 255): " + "; ".join(
            f"{key} {value['vae_dtype']}: max {value['max_levels']}, mean {value['mean_levels']}"
            for key, value in data["vae_precision"].items())]
    if "load_s" in data:
        lines += ["", "Session load (s): " + ", ".join(f"{key} {value}" for key, value in data["load_s"].items())]
    profile = data.get("profile")
    if profile:
        of = profile["of"]
        lines += ["", f"Profiled (worst against its target): {of['model']} {of['name']} {of['dtype']} eager, "
                      f"{of['ms']:.1f} ms against {of['target_ms']:.0f} ms; top ops in the JSON's profile.table."]
    missing = {name: why for name, why in data.get("imports", {}).items() if why.startswith("not importable")}
    lines += [""] + [f"- import {name}: {why}" for name, why in missing.items()]
    for name, stage in data.get("stages", {}).items():
        if "summary" in stage:
            lines.append(f"- {name}: `{stage.get('command', '')}`: {stage['summary']}")
        if stage.get("status") != "ok":
            why = stage.get("error") or stage.get("reason") or ""
            lines.append(f"- {name}: {stage.get('status')}{': ' + why if why else ''}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python bench/gpu/table.py gpu.json", file=sys.stderr)
        return 2
    sys.stdout.write(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
