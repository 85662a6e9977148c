"""How many CPU threads torch and ONNX Runtime use: the CPUs this process may run on, as many as the model's
work can keep busy. torch's default ignores a cgroup's CPU quota (2 CPUs on a 64-core host would run 64 threads,
throttled mid-step) and how small the operations are (`mini`'s take microseconds: a second thread only adds a
wake-up to each; BENCHMARKS.md, "CPU threads under load"). Their waiting between calls is set in
`icd/__init__.py`. Torch-free until `use_cpu_threads`."""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager, suppress
from pathlib import Path

log = logging.getLogger("icd")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# One thread per this much UNet work (latent positions x first-level channels squared, at the model's own
# resolution): on mini, a second sleeping thread gave 1.09x at 4.2M (512 px) and 0.77x at 1M (256 px)
# (bench/threads_by_size.py).
WORK_PER_THREAD = 2**21
_given: int | None = None  # --threads, for later sessions of this process that ask for none


def _cgroup_folders(root: Path, proc_cgroup: Path) -> list[Path]:
    """The CPU controller's folders of this process's cgroup and of each of its ancestors (v2: the unified
    hierarchy; v1: the `cpu` one). A quota anywhere on the path applies."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2, mounted at the root or, next to v1 ("hybrid"), at unified/
            mount = root if (root / "cgroup.controllers").is_file() else root / "unified"
        elif "cpu" in controllers.split(","):
            mount = next((root / name for name in (controllers, "cpu", "cpu,cpuacct") if (root / name).is_dir()), None)
        else:
            continue
        if mount is None:
            continue
        parts = Path(path).relative_to("/").parts
        folders += [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return folders


def _quota(folder: Path) -> float | None:
    """The CPUs' worth of time a cgroup folder allows per period, or None where it sets no quota."""
    with suppress(OSError, ValueError):
        if (folder / "cpu.max").is_file():  # v2: "QUOTA PERIOD" or "max PERIOD"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 means none
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroup path, in CPUs (1.5 = one and a half); None if none."""
    quotas = [quota for folder in _cgroup_folders(root, proc_cgroup) if (quota := _quota(folder)) is not None]
    return min(quotas, default=None)


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup quota rounded down (a thread
    more than the quota pays would be stopped mid-step, with the others waiting for it), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(root, proc_cgroup)
    return max(1, min(cpus, math.floor(quota) if quota is not None else cpus))


def _omp_num_threads() -> int | None:
    """OMP_NUM_THREADS when it names a positive count (its first, for a nested list such as "4,2")."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def useful_threads(unet_config: dict) -> int:
    """The threads a UNet's work keeps busy at its own resolution: `mini` one, SD1.5 or SDXL more than any CPU has."""
    side = unet_config["sample_size"]
    height, width = (side, side) if isinstance(side, int) else side
    return max(1, height * width * unet_config["block_out_channels"][0] ** 2 // WORK_PER_THREAD)


def cpu_threads(requested: int | None = None, useful: int | None = None) -> int:
    """`requested` (--threads), else OMP_NUM_THREADS, else `available_cpus()` capped at the `useful` count."""
    return requested or _omp_num_threads() or min(available_cpus(), useful or math.inf)


def use_cpu_threads(requested: int | None = None, useful: int | None = None) -> int:
    """Set torch's intra-op threads (ONNX Runtime's sessions take the same) to `cpu_threads(requested, useful)`
    and its inter-op pool to one (icd runs no inter-op work); returns the count. A count requested once stays
    for this process's later sessions that request none, so that a second one does not undo --threads."""
    global _given
    import torch

    _given = requested or _given
    threads = cpu_threads(_given, useful)
    torch.set_num_threads(threads)
    with suppress(RuntimeError):  # only possible before any inter-op work: then it was set already, or never used
        torch.set_num_interop_threads(1)
    log.debug("CPU threads: %d", threads)
    return threads


@contextmanager
def every_cpu_thread():
    """torch on all the threads the process may use (or those requested) for the block, then back: for work
    far bigger than the model's, such as `icd eval`'s metric networks beside `mini`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(_given))
    try:
        yield
    finally:
        torch.set_num_threads(before)
