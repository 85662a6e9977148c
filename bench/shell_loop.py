"""A shell loop of `icd edit` calls on `mini` scenes, with `icd serve`, without, and as one call; and ten
targets from one inversion against ten separate edits. Per-edit wall and CPU time, side by side in one run.

    python bench/shell_loop.py [--scenes 20] [--targets 10]

CPU time is the user+system time of the `icd` processes; with a server, the server's own CPU time for the
loop is added (read from /proc) and also shown apart.
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
    """Run the commands one after the other: total wall time, the clients' CPU time and the server's."""
    cpu, server_cpu = _children_cpu(), _process_cpu(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    for command in commands:
        subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    server = _process_cpu(server_pid) - server_cpu if server_pid else 0.0
    return {"wall_s": wall, "client_cpu_s": _children_cpu() - cpu, "server_cpu_s": server}


def start_server(cwd: Path, env: dict) -> subprocess.Popen:
    server = subprocess.Popen([*ICD, "serve", *MODEL], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "ICD_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
        (work / "in").mkdir()
        edits = scenes(work / "in", args.scenes)

        def loop(out: str, *flags: str) -> list[list[str]]:
            return [[*ICD, "edit", str(path), "--src", src, "--tgt", tgt, *MODEL, "-o", f"{out}/{path.name}", "-q",
                     *flags] for path, src, tgt in edits]

        jobs = work / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"image": str(path), "source": src, "target": tgt}) + "\n"
                                for path, src, tgt in edits))
        rows = {"loop, no server": timed(loop("cold", "--no-server"), work, env)}
        rows["one call (job file)"] = timed([[*ICD, "edit", "--jobs", str(jobs), *MODEL, "-o", "single", "-q",
                                              "--no-server"]], work, env)
        server = start_server(work, env)
        try:
            rows["loop, with icd serve"] = timed(loop("warm"), work, env, server.pid)
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
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()}), python "
          f"{platform.python_version()}; {args.scenes} edits of 64x64 mini scenes")
    print(f"{'':40} {'wall/edit':>10} {'CPU/edit':>10} {'(server)':>10} {'wall total':>11}")
    for table, count in ((rows, args.scenes), (many_rows, len(targets))):
        for name, row in table.items():
            print(f"{name:40} {row['wall_s'] / count:9.3f}s {(row['client_cpu_s'] + row['server_cpu_s']) / count:9.3f}s "
                  f"{row['server_cpu_s'] / count:9.3f}s {row['wall_s']:10.1f}s")
        print()
    cold, warm, single = (rows[k]["wall_s"] for k in ("loop, no server", "loop, with icd serve",
                                                       "one call (job file)"))
    print(f"with a server the loop is {cold / warm:.1f}x faster than without, and {warm / single:.2f}x the one call")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
