"""Per-edit time of one `icd edit` call over 10 mini scenes in its own process, against the same call through
`icd serve`, with the machine as it is and with a second CPU-heavy process running; several installs side by
side in one run (e.g. a checkout before a change and after it).

    python bench/cpu_load.py [--python LABEL=PYTHON ...] [--env LABEL:NAME=VALUE ...] [--pictures 10]
                             [--repeats 3] [--json FILE]
    python bench/cpu_load.py --table FILE    # the table again, from a --json file

Each `--python` is an interpreter with icd installed (default: this one, labelled "this"); `--env` sets an
environment variable for one of them (the same interpreter may appear under several labels). A per-edit time is
the `seconds` of an item's --json record (its wall time inside the call: reading, inverting, editing,
writing; for a served call also the trip to the server), the median over the pictures; the call's wall time
includes its start and model load. The served call runs with the server of its own install (one ICD_HOME
each) started once. The second process is a Python busy loop, one core fully taken. No OMP_NUM_THREADS is
set unless `--env` sets it: each install chooses its own threads, which is what is measured. The rounds interleave the installs
(idle: one call, served call, for each install; then the same under load), so that the machine's drift falls
on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shell_loop import _cpu_name, scenes, start_server  # noqa: E402

MODEL = ("-m", "mini", "--device", "cpu")


def edit_call(python: str, jobs: Path, output: Path, env: dict, *flags: str) -> dict:
    """One `icd edit --jobs` call: its wall time and each item's seconds from its --json records."""
    command = [python, "-m", "icd", "edit", "--jobs", str(jobs), *MODEL, "-o", str(output), "--overwrite", "--json",
               *flags]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(records) != len(jobs.read_text().splitlines()) or any(r["status"] != "ok" for r in records):
        raise SystemExit(f"{python}: not every edit succeeded: {done.stdout}{done.stderr}")
    seconds = [record["seconds"] for record in records]
    return {"wall_s": wall, "item_s": seconds, "per_edit_s": statistics.median(seconds)}


@contextmanager
def busy_process(on: bool):
    """A second process keeping one core busy (a pure-Python loop), while the block runs."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if process is not None:
            process.kill()
            process.wait()


def measure(installs: dict[str, str], extra_env: dict[str, dict], work: Path, jobs: Path, repeats: int) -> dict:
    """Every install's one call and served call, idle then loaded, `repeats` rounds each."""
    envs = {}
    for label in installs:
        env = {**os.environ, "ICD_HOME": str(work / f"home-{label}"), "HF_HUB_OFFLINE": "1"}
        for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYTHONDONTWRITEBYTECODE"):
            env.pop(name, None)
        envs[label] = {**env, **extra_env.get(label, {})}
        edit_call(installs[label], jobs, work / "warm-up", env, "--no-server")  # bytecode cache, disk
    servers = {label: start_server(work, envs[label], [python, "-m", "icd", "serve", *MODEL])
               for label, python in installs.items()}
    results: dict = {label: {"idle": [], "loaded": []} for label in installs}
    try:
        for condition in ("idle", "loaded"):
            with busy_process(condition == "loaded"):
                for _ in range(repeats):
                    for label, python in installs.items():
                        load = os.getloadavg()[0]
                        one = edit_call(python, jobs, work / "one", envs[label], "--no-server")
                        served = edit_call(python, jobs, work / "served", envs[label])
                        results[label][condition].append({"one_call": one, "served": served, "load_1min": load})
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(60)
    return results


def summary(rounds: list[dict]) -> dict:
    """Medians over the rounds of the per-edit times and of their ratio (each round's one call over its
    served call), and the slowest single edit of any round."""
    one = [r["one_call"]["per_edit_s"] for r in rounds]
    served = [r["served"]["per_edit_s"] for r in rounds]
    ratios = [a / b for a, b in zip(one, served)]
    return {"one_call_s": statistics.median(one), "served_s": statistics.median(served),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "slowest_s": {kind: max(max(r[kind]["item_s"]) for r in rounds) for kind in ("one_call", "served")},
            "one_call_wall_s": statistics.median(r["one_call"]["wall_s"] for r in rounds),
            "load_1min": (min(r["load_1min"] for r in rounds), max(r["load_1min"] for r in rounds))}


def print_table(data: dict) -> None:
    print(f"machine: {data['machine']}; one `icd edit --jobs` call over {data['pictures']} 64x64 mini scenes, "
          f"medians of {len(next(iter(data['rounds'].values()))['idle'])} rounds")
    print(f"{'install':14} {'condition':9} {'one call/edit':>13} {'served/edit':>11} {'ratio':>6} {'slowest edit':>16} "
          f"{'one call wall':>13} {'load':>8}  ratios")
    for label, conditions in data["rounds"].items():
        for condition, rounds in conditions.items():
            s = summary(rounds)
            print(f"{label:14} {condition:9} {s['one_call_s']:12.3f}s {s['served_s']:10.3f}s {s['ratio']:5.2f}x "
                  f"{s['slowest_s']['one_call']:7.2f}s/{s['slowest_s']['served']:.2f}s {s['one_call_wall_s']:12.1f}s "
                  f"{s['load_1min'][0]:3.1f}-{s['load_1min'][1]:.1f}  " + ", ".join(f"{r:.2f}" for r in s["ratios"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", metavar="LABEL=PYTHON", help="An install to measure "
                        "(repeatable). Default: this interpreter.")
    parser.add_argument("--env", action="append", default=[], metavar="LABEL:NAME=VALUE",
                        help="An environment variable for one install (repeatable).")
    parser.add_argument("--pictures", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="Rounds per condition.")
    parser.add_argument("--json", type=Path, help="Also write every measurement to this file.")
    parser.add_argument("--table", type=Path, help="Print the table of an earlier run's --json file.")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return
    installs = dict(item.split("=", 1) for item in args.python) if args.python else {"this": sys.executable}
    extra_env: dict[str, dict] = {}
    for item in args.env:
        label, setting = item.split(":", 1)
        extra_env.setdefault(label, {}).update([setting.split("=", 1)])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        jobs = work / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"image": str(path), "source": src, "target": tgt}) + "\n"
                                for path, src, tgt in scenes(work / "in", args.pictures)))
        results = measure(installs, extra_env, work, jobs, args.repeats)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()}), affinity "
               f"{len(os.sched_getaffinity(0))}, load average {load_before[0]:.1f} before, "
               f"{os.getloadavg()[0]:.1f} after, python {platform.python_version()}")
    data = {"machine": machine, "pictures": args.pictures, "installs": installs, "env": extra_env, "rounds": results}
    print_table(data)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
