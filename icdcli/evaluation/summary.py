"""The tables of an evaluation: every metric's mean per setting, overall and per editing type, next to the
rows the benchmarks' papers published (facts gathered in the project's reference notes)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from icd.files import atomic_write

from .metrics import METRICS, MetricInfo

# Published rows, in the units of icd's metrics. PIE-Bench: SD1.4/SD1.5 methods as reported by the benchmark's
# and later papers; the authors' Table 3: iCD-XL, 8 steps, on their 420-image PieBench and their COCO set.
PUBLISHED = {
    "pie-bench": [
        ("published: iCD SD1.5 (as measured by later papers)",
         {"structure": 10.21, "psnr": 26.93, "lpips": 63.6, "clip_whole": 22.42, "clip_edited": 19.07}),
        ("published: DDIM + P2P (SD1.4, 50 steps)",
         {"structure": 69.43, "psnr": 17.87, "lpips": 208.8, "clip_whole": 25.01, "clip_edited": 22.44}),
        ("published: Direct Inversion + P2P (SD1.4)",
         {"structure": 11.65, "psnr": 27.22, "lpips": 54.55, "clip_whole": 25.02, "clip_edited": 22.10}),
        ("published: SwiftEdit",
         {"structure": 13.21, "psnr": 23.33, "lpips": 91.0, "clip_whole": 25.16, "clip_edited": 21.25}),
        ("published: TurboEdit",
         {"structure": 16.10, "psnr": 22.43, "lpips": 108.6, "clip_whole": 25.50, "clip_edited": 21.82}),
    ],
    "editing_pie_bench_all.csv": [("published: iCD-XL, 8 steps (paper, Table 3)",
                                   {"clip_t": 0.254, "dinov2": 0.707, "clip_i": 0.858})],
    "editing_coco.csv": [("published: iCD-XL, 8 steps (paper, Table 3)",
                          {"clip_t": 0.267, "dinov2": 0.472, "clip_i": 0.748})],
}
# The settings that tell rows apart, in the order of the table's columns.
SETTING_COLUMNS = ("solver", "method", "guidance", "tau", "strength", "cross_replace", "self_replace", "amplify",
                   "mask_use", "keep_outside")


def published_rows(dataset_kind: str, dataset_name: str) -> list[tuple[str, dict]]:
    return PUBLISHED.get(dataset_kind if dataset_kind == "pie-bench" else dataset_name, [])


def _mean(values: list) -> float | None:
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known else None


def _row(label: str, records: list[dict], metrics: list[str]) -> dict:
    return {"setting": label, "settings": records[0]["settings"], "n": len(records),
            "metrics": {name: _mean([r["metrics"].get(name) for r in records]) for name in metrics},
            "seconds": _mean([r.get("seconds") for r in records]),
            "unet_calls": _mean([r.get("unet_calls") for r in records])}


def summarise(records: list[dict], infos: dict[str, MetricInfo]) -> dict:
    """Means per setting (rows in the order the settings first appear), overall and per editing type."""
    found = {name for record in records for name in record["metrics"]}
    metrics = [name for name in infos if name in found] + sorted(found - set(infos))
    groups: dict[str, list[dict]] = defaultdict(list)
    types: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[record["setting"]].append(record)
        if record.get("type"):
            types[record["type"]][record["setting"]].append(record)
    return {"metrics": metrics,
            "overall": [_row(label, group, metrics) for label, group in groups.items()],
            "by_type": {kind: [_row(label, group, metrics) for label, group in settings.items()]
                        for kind, settings in sorted(types.items())}}


def _value(value, info: MetricInfo | None) -> str:
    if value is None:
        return ""
    if info is not None and info.percent:
        return f"{100 * value:.0f}%"
    return f"{value:.{info.digits if info else 2}f}"


def _varying(rows: list[dict]) -> list[str]:
    """The setting columns whose values differ between rows (solver and method when none do)."""
    columns = [name for name in SETTING_COLUMNS if len({json.dumps(row["settings"].get(name)) for row in rows}) > 1]
    return columns or ["solver", "method"]


def _table(rows: list[dict], metrics: list[str], infos: dict[str, MetricInfo], published: list[tuple[str, dict]],
           first: tuple[str, ...] = ()) -> list[str]:
    columns = _varying(rows)
    headings = [*first, *columns, "n", *(_heading(name, infos) for name in metrics), "s / edit", "UNet calls"]
    lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(first + tuple(columns)) + " ---: |" * (
        len(headings) - len(first) - len(columns))]
    for row in rows:
        cells = [*(row.get(name, "") for name in first), *(_setting(row["settings"].get(name)) for name in columns),
                 str(row["n"]), *(_value(row["metrics"][name], infos.get(name)) for name in metrics),
                 _value(row["seconds"], None), _value(row["unet_calls"], MetricInfo("", False, digits=0))]
        lines.append("| " + " | ".join(cells) + " |")
    for name, values in published:
        shown = [_value(values.get(metric), infos.get(metric)) for metric in metrics]
        if any(shown):
            cells = [*([""] * len(first)), name, *([""] * (len(columns) - 1)), "", *shown, "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _heading(name: str, infos: dict[str, MetricInfo]) -> str:
    info = infos.get(name) or METRICS.get(name)
    return name if info is None else f"{info.heading} {'↑' if info.higher_is_better else '↓'}"


def _setting(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(part) for part in value)
    return str(value)


def summary_markdown(summary: dict, infos: dict[str, MetricInfo], about: dict,
                     published: list[tuple[str, dict]]) -> str:
    metrics = summary["metrics"]
    lines = [f"# icd eval: {about['dataset']}", "",
             f"Model {about['model']} ({about['model_fingerprint']}), seed {about['seed']}; "
             f"{len({r['setting'] for r in summary['overall']})} setting(s). Every row's full settings and edits "
             "folder: summary.json; every item: results.jsonl.", "", "## Overall", "",
             *_table(summary["overall"], metrics, infos, published)]
    if len(summary["by_type"]) > 1:
        rows = [{**row, "type": kind} for kind, kind_rows in summary["by_type"].items() for row in kind_rows]
        lines += ["", "## By editing type", "", *_table(rows, metrics, infos, [], first=("type",))]
    return "\n".join(lines) + "\n"


def write_summary(folder: Path, summary: dict, markdown: str, about: dict) -> None:
    document = {"about": about, **summary}
    for name, text in (("summary.json", json.dumps(document, indent=1) + "\n"), ("summary.md", markdown)):
        atomic_write(folder / name, lambda temporary, text=text: Path(temporary).write_text(text, encoding="utf-8"),
                     overwrite=True)
