"""The CPU threads a process runs with: chosen from its affinity and cgroup quota (the files faked here),
given by OMP_NUM_THREADS or --threads, and OpenMP's threads told to sleep rather than spin between calls."""

import os
import subprocess
import sys

import pytest

from icd.models import threads

PROC_V2 = "0::/user.slice/job\n"
PROC_V1 = "12:memory:/job\n4:cpu,cpuacct:/job\n3:cpuset:/\n"


def fake_cgroups(root, proc, files: dict[str, str]):
    """A cgroup mount under `root` with these files (path -> text), and /proc/self/cgroup saying `proc`."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "proc-cgroup").write_text(proc)
    return root, root / "proc-cgroup"


@pytest.mark.parametrize("proc, files, quota, cpus", [
    # v2: the process's own folder has no quota, its parent 3 CPUs; the root's "max" is none
    (PROC_V2, {"cgroup.controllers": "cpu", "cpu.max": "max 100000\n", "user.slice/cpu.max": "300000 100000\n",
               "user.slice/job/cpu.max": "max 100000\n"}, 3.0, 3),
    # v2: 1.5 CPUs' worth rounds down
    (PROC_V2, {"cgroup.controllers": "cpu", "user.slice/job/cpu.max": "150000 100000\n"}, 1.5, 1),
    # v2 next to v1 (hybrid): the unified hierarchy is mounted at unified/
    (PROC_V2, {"unified/user.slice/job/cpu.max": "200000 100000\n"}, 2.0, 2),
    # a quota above the affinity mask: the mask wins
    (PROC_V2, {"cgroup.controllers": "cpu", "user.slice/cpu.max": "1600000 100000\n"}, 16.0, 8),
    # v1: the cpu controller's folder; -1 is no quota, so the process's own 2.5 CPUs count
    (PROC_V1, {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
               "cpu,cpuacct/job/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
               "memory/job/cpu.cfs_quota_us": "100000\n"}, 2.5, 2),
    # no quota anywhere, or an unreadable file: the affinity mask alone
    (PROC_V1, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 8),
    (PROC_V2, {"cgroup.controllers": "cpu", "cpu.max": "garbage\n"}, None, 8),
])
def test_available_cpus_from_affinity_and_cgroup_quota(tmp_path, monkeypatch, proc, files, quota, cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    root, proc_cgroup = fake_cgroups(tmp_path, proc, files)
    assert threads.cgroup_cpu_quota(root, proc_cgroup) == quota
    assert threads.available_cpus(root, proc_cgroup) == cpus


def test_no_cgroup_file_and_a_one_cpu_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert threads.cgroup_cpu_quota(tmp_path, tmp_path / "missing") is None
    assert threads.available_cpus(tmp_path, tmp_path / "missing") == 1


@pytest.mark.parametrize("omp, requested, useful, expected", [
    (None, None, None, 6), ("3", None, None, 3), ("4,2", None, None, 4), ("3", 5, None, 5), ("0", None, None, 6),
    ("many", None, None, 6), (None, None, 1, 1), (None, None, 4, 4), (None, None, 200, 6), ("3", None, 1, 3),
    (None, 5, 1, 5)])
def test_the_count_given_wins(monkeypatch, omp, requested, useful, expected):
    """--threads, then OMP_NUM_THREADS (its first level, a count above 0), then the CPUs available as far as
    the model's work keeps them busy."""
    monkeypatch.setattr(threads, "available_cpus", lambda: 6)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert threads.cpu_threads(requested, useful) == expected


@pytest.mark.parametrize("config, expected", [
    ({"sample_size": 8, "block_out_channels": [32, 64]}, 1),  # mini at 64 px
    ({"sample_size": 64, "block_out_channels": [32, 64]}, 2),  # the same UNet at 512 px
    ({"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280]}, 200),  # SD1.5
    ({"sample_size": [128, 96], "block_out_channels": [320, 640, 1280]}, 600)])  # a non-square SDXL
def test_threads_only_as_many_as_the_work_keeps_busy(config, expected):
    assert threads.useful_threads(config) == expected


def test_a_later_session_keeps_the_count_given(monkeypatch):
    import torch

    monkeypatch.setattr(threads, "_given", None)
    monkeypatch.setattr(threads, "available_cpus", lambda: 6)
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        assert threads.use_cpu_threads(useful=1) == 1 == torch.get_num_threads()
        assert threads.use_cpu_threads(useful=4) == 4 == torch.get_num_threads()  # each model its own
        assert threads.use_cpu_threads(3) == 3 == torch.get_num_threads()
        assert threads.use_cpu_threads(useful=1) == 3 == torch.get_num_threads()  # none asked: --threads stays
    finally:
        torch.set_num_threads(1)


def test_every_cpu_thread_for_a_block_then_the_models_count(monkeypatch):
    import torch

    monkeypatch.setattr(threads, "_given", None)
    monkeypatch.setattr(threads, "available_cpus", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        threads.use_cpu_threads(useful=1)
        with threads.every_cpu_thread():
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
        threads.use_cpu_threads(2)  # --threads 2
        with threads.every_cpu_thread():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_a_session_on_a_small_model_runs_one_thread(monkeypatch, icd_home):
    """Opened without --threads or OMP_NUM_THREADS on a machine of 6 CPUs, a tiny model's session runs one."""
    import torch

    from icd.app import session as session_module

    monkeypatch.setattr(threads, "_given", None)
    monkeypatch.setattr(threads, "available_cpus", lambda: 6)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(session_module, "_OPEN", {})
    torch.set_num_threads(2)
    try:
        session_module.open_session("tiny", "cpu", "fp32", "torch")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_unless_told_otherwise(given, expected):
    """icd sets the wait policy when it is imported, before torch (which reads it once) loads."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys, icd.app.cli; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == expected
