"""A shell loop of `icd edit` calls on `mini` scenes, with `icd serve`, without, and as one call; and ten
targets from one inversion against ten separate edits. Per-edit wall and CPU time, side by side in one run.

    python bench/shell_loop.py [--scenes 20] [--targets 10] [--repeats 3] [--cold 20] [--json FILE]

CPU time is the user+system time of the `icd` processes; with a server, the server's own CPU time for the
loop is added (read from /proc) and also shown apart. The machine may be shared and noisy: `--repeats`
runs the one call and the served loop that many times, side by side, and reports each repeat's ratio and
their spread. `--cold N` runs the loop without a server over the first N scenes only (each call is a cold
start of a plain `icd edit`: its times are reported one by one). Every `icd` process runs with
OMP_NUM_THREADS=1 and with Python's bytecode cache on, as an installed package has it (a
PYTHONDONTWRITEBYTECODE in the environment would make each call compile icd's modules again, about 40 ms);
a first untimed call writes the cache and warms the disk.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.miniature.world import COLOURS, DEMO_SCENE, SHAPES, render  # noqa: E402

ICD = [sys.executable, "-m", "icd"]
MODEL = ("-m", "mini", "--device", "cpu")


def scenes(folder: Path, count: int) -> list[tuple[Path, str, str]]:
    """`count` distinct scenes of the miniature world, each with its caption and an edited caption."""
    jobs = []
    combos = itertools.product(SHAPES, [c for c in COLOURS if c != "blue"], range(count))
    for index, (shape, colour, seed) in zip(range(count), combos):
        spec = DEMO_SCENE.edited(shape=shape, colour=colour)
        spec = type(spec)(spec.background, spec.objects, seed=spec.seed - seed)
        path = folder / f"scene{index:02}.png"
        render(spec).image.save(path)
        jobs.append((path, spec.caption, spec.edited(colour="blue").caption))
    return jobs


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(commands: list[list[str]], cwd: Path, env: dict, server_pid: int | None = None) -> dict:
    """Run the commands one after the other: total and per-command wall time, the clients' CPU time and the
    server's."""
    cpu, server_cpu = _children_cpu(), _process_cpu(server_pid) if server_pid else 0.0
    walls = []
    for command in commands:
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
    server = _process_cpu(server_pid) - server_cpu if server_pid else 0.0
    return {"wall_s": sum(walls), "client_cpu_s": _children_cpu() - cpu, "server_cpu_s": server, "calls_s": walls}


def start_server(cwd: Path, env: dict, command: list[str] | None = None) -> subprocess.Popen:
    """`icd serve -m mini` (or `command`), once it says it is serving."""
    server = subprocess.Popen(command or [*ICD, "serve", *MODEL], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(server.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not line or not line[0].startswith("serving "):
        server.kill()
        raise SystemExit(f"the server did not start: {line}")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of the one call and the served loop.")
    parser.add_argument("--cold", type=int, help="Scenes in the loop without a server (default: all).")
    parser.add_argument("--json", type=Path, help="Also write the measurements to this file.")
    args = parser.parse_args()
    cold_count = args.scenes if args.cold is None else min(args.cold, args.scenes)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "ICD_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        (work / "in").mkdir()
        edits = scenes(work / "in", args.scenes)

        def loop(out: str, *flags: str, count: int = args.scenes) -> list[list[str]]:
            return [[*ICD, "edit", str(path), "--src", src, "--tgt", tgt, *MODEL, "-o", f"{out}/{path.name}", "-q",
                     *flags] for path, src, tgt in edits[:count]]

        jobs = work / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"image": str(path), "source": src, "target": tgt}) + "\n"
                                for path, src, tgt in edits))
        one_call = [[*ICD, "edit", "--jobs", str(jobs), *MODEL, "-o", "single", "-q", "--no-server", "--overwrite"]]
        timed(loop("warm-up", "--no-server", count=1), work, env)  # writes the bytecode cache, warms the disk
        rows = {"loop, no server": timed(loop("cold", "--no-server", count=cold_count), work, env)}
        repeats = []
        server = start_server(work, env)
        try:
            for repeat in range(args.repeats):
                single = timed(one_call, work, env)
                warm = timed([[*command, "--overwrite"] for command in loop("warm")], work, env, server.pid)
                repeats.append({"one call (job file)": single, "loop, with icd serve": warm})
            rows.update(repeats[0])
            path, src, _ = edits[0]
            targets = [f"a {colour} {shape} on a sandy background"
                       for shape, colour in itertools.product(SHAPES, COLOURS)][: args.targets]
            many = [[*ICD, "edit", str(path), "--src", src, *itertools.chain(*(("--tgt", t) for t in targets)),
                     *MODEL, "-o", "many", "-q", "--no-server"]]
            apart = [[*ICD, "edit", str(path), "--src", src, "--tgt", t, *MODEL, "-o", f"apart/{i}.png", "-q"]
                     for i, t in enumerate(targets)]
            many_rows = {f"{len(targets)} targets, one call, one inversion": timed(many, work, env),
                         f"{len(targets)} separate edits with icd serve": timed(apart, work, env, server.pid)}
        finally:
            server.terminate()
            server.wait(60)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()}), load average "
               f"{os.getloadavg()[0]:.1f}, python {platform.python_version()}")
    print(f"machine: {machine}; {args.scenes} edits of 64x64 mini scenes, OMP_NUM_THREADS=1")
    print(f"{'':40} {'wall/edit':>10} {'CPU/edit':>10} {'(server)':>10} {'wall total':>11}")
    counts = {"loop, no server": cold_count}
    for table in (rows, many_rows):
        for name, row in table.items():
            count = counts.get(name, args.scenes if table is rows else len(targets))
            cpu = row["client_cpu_s"] + row["server_cpu_s"]
            print(f"{name:40} {row['wall_s'] / count:9.3f}s {cpu / count:9.3f}s {row['server_cpu_s'] / count:9.3f}s "
                  f"{row['wall_s']:10.1f}s")
        print()
    cold = rows["loop, no server"]
    print("cold start of a plain `icd edit` (no server), each call: "
          + ", ".join(f"{wall:.2f}s" for wall in cold["calls_s"]))
    ratios = [_ratios(repeat, cold, cold_count, args.scenes) for repeat in repeats]
    for i, ratio in enumerate(ratios, 1):
        print(f"repeat {i}: served loop / one call = {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU; "
              f"no-server loop / served loop = {ratio['speed-up']:.1f}x")
    walls = sorted(ratio["wall"] for ratio in ratios)
    print(f"served loop / one call, wall: min {walls[0]:.2f}x, median {walls[len(walls) // 2]:.2f}x, "
          f"max {walls[-1]:.2f}x over {len(walls)} repeat(s)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "scenes": args.scenes, "cold_scenes": cold_count,
                                         "rows": {**rows, **many_rows}, "repeats": repeats, "ratios": ratios},
                                        indent=1) + "\n")


def _ratios(repeat: dict, cold: dict, cold_count: int, scenes: int) -> dict:
    """The served loop against the one call (per edit, both over every scene) and against the loop without a
    server (per edit)."""
    warm, single = repeat["loop, with icd serve"], repeat["one call (job file)"]
    warm_cpu = warm["client_cpu_s"] + warm["server_cpu_s"]
    return {"wall": warm["wall_s"] / single["wall_s"], "cpu": warm_cpu / single["client_cpu_s"],
            "speed-up": (cold["wall_s"] / cold_count) / (warm["wall_s"] / scenes)}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
