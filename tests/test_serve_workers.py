"""`icd serve` with several workers and batches: two `--device cpu` workers behind one socket share the jobs
(the least busy takes the next), and jobs that wait together with one operation and size run as one batch."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest

from icd.app.requests import REQUESTS, Invert, Reconstruct
from icd.app.serve import front as server
from icd.app.serve.scheduler import ProcessWorker
from icd.errors import ICDError
from icd.images import as_array
from icd.app.cli.serve import serve_runner as _serve_runner
from icd.app.serve.client import RemoteRunner, _hello
from icd.app.runner import LocalRunner
from icd.app.session import open_session
from icd.app.serve.wire import receive, send
from icd.models.hub import resolve_model
from tests.fixtures.cli import icd
from tests.test_serve import EDIT, Served, _icd_process, files, photo

# Batching changes fp32 bits on the CPU (oneDNN picks other kernels per batch size; the math is row-independent):
# a row batched against the same job alone, max abs, measured on the trained `mini`: invert 3.8e-6 (x_T),
# reconstruct 1.2e-5, generate 8.2e-6 (pixels in [-1, 1]). The batch tests run on mini: on the random `tiny`
# weights the inversion is chaotic (a 1e-6 change of the pixels moves x_T by 3.5e-3), so there batching's
# last-bit noise grows to 3e-2.
BATCH_TOLERANCE = 1e-4
WAIT_S = 60


@pytest.fixture(scope="module")
def two_workers(icd_home):
    started = Served("--device", "cpu")  # with TINY's --device cpu: two CPU workers
    yield started
    started.close()


def worker_lines(cwd) -> list[tuple[int, int]]:
    """(pid, jobs) of each worker, from `icd serve --status`."""
    status = icd("serve", "--status", cwd=cwd)
    assert status.exit_code == 0, status.output
    return [(int(pid), int(jobs)) for pid, jobs in re.findall(r"worker \d: cpu, pid (\d+), (\d+) jobs?", status.stdout)]


def test_two_clients_are_served_by_both_workers_bit_identically(two_workers, icd_home, tmp_path):
    assert two_workers.ready.endswith(f"on 2 workers (cpu, cpu), fp32, torch at "
                                      f"{icd_home / 'serve' / 'tiny-sd15-cpu+cpu-fp32.sock'}")
    workers = worker_lines(tmp_path)
    assert [jobs for _, jobs in workers] == [0, 0] and workers[0][0] == two_workers.process.pid
    assert workers[1][0] != two_workers.process.pid  # the second worker is a process of its own
    for name in ("a", "b"):
        for i in range(2):
            photo(tmp_path / name / f"p{i}.png", colour=(60 * i, 40 + 80 * (name == "b"), 200))
    runs = [_icd_process("edit", tmp_path / name, *EDIT, "-o", f"out-{name}", cwd=tmp_path) for name in ("a", "b")]
    for run in runs:
        _, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        assert f"icd: info: using the server at {two_workers.path}" in stderr
    jobs = [jobs for _, jobs in worker_lines(tmp_path)]
    # an inversion and an edit per photo, on both workers; two clients never have a job waiting while both
    # workers are busy, so no batch changes their bits
    assert sum(jobs) == 8 and min(jobs) >= 1
    for name in ("a", "b"):
        here = icd("edit", tmp_path / name, *EDIT, "-o", f"here-{name}", "--no-server", cwd=tmp_path)
        assert here.exit_code == 0, here.output
        assert sorted(files(tmp_path / f"out-{name}")) == ["p0-edit.png", "p1-edit.png"]
        assert files(tmp_path / f"out-{name}") == files(tmp_path / f"here-{name}")


def test_a_worker_that_dies_sends_its_clients_home_and_the_rest_serve_on(two_workers, tmp_path):
    (first, _), (second, second_jobs) = worker_lines(tmp_path)
    os.kill(second, signal.SIGKILL)
    source = photo(tmp_path / "a.png")
    for attempt in range(5):  # the server learns of the death at the next job it gives that worker
        result = icd("edit", source, *EDIT, "-o", f"{attempt}.png", cwd=tmp_path)
        assert result.exit_code == 0, result.output
        assert f"icd: info: using the server at {two_workers.path}" in result.stderr
        if f"icd: warning: the server at {two_workers.path} went away" in result.stderr:
            break
    else:
        raise AssertionError("no job was given to the dead worker")
    after = icd("edit", source, *EDIT, "-o", "after.png", cwd=tmp_path)
    assert after.exit_code == 0 and after.stderr == f"icd: info: using the server at {two_workers.path}\n"
    status = icd("serve", "--status", cwd=tmp_path)
    assert f"worker 2: cpu, pid {second}, {second_jobs} jobs in " in status.stdout  # none more: the lost one
    assert status.stdout.endswith(", ended\n")  # is not counted
    assert f"worker 1: cpu, pid {first}, " in status.stdout
    assert (tmp_path / f"{attempt}.png").read_bytes() == (tmp_path / "after.png").read_bytes()
    assert two_workers.process.poll() is None


@pytest.fixture
def gated(icd_home):
    """A one-worker server in this process whose worker waits at its first batch until the test opens the
    gate, so that the jobs sent meanwhile queue behind it; yields the server, the gate, and its batches."""
    runner = LocalRunner(open_session(resolve_model("mini"), "cpu", "fp32", directions=("forward", "reverse")))
    serving = server.Server(runner, "mini", False, icd_home / "unused.sock")
    (worker,) = serving.scheduler.workers
    gate, batches = threading.Event(), []
    real = worker.run

    def run(requests):
        batches.append([request.op for request in requests])
        if len(batches) == 1:
            gate.wait(WAIT_S)
        return real(requests)

    worker.run = run
    serving.scheduler.start()
    yield serving, gate, batches
    gate.set()
    serving.scheduler.stop()


def client(serving: server.Server) -> RemoteRunner:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=serving.handle, args=(ours,), daemon=True).start()
    facts = _hello(theirs, {"fingerprint": serving.facts["fingerprint"], "device": "cpu", "dtype": "fp32"})
    assert facts["mismatch"] is None
    return RemoteRunner(theirs, facts, resolve_model("mini"), serving.path)


def concurrently(serving, gate, calls) -> list:
    """Run calls[0] until the worker holds it, queue the other calls behind it, then open the gate."""
    results = [None] * len(calls)

    def call(i):
        results[i] = calls[i](client(serving))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    threads[0].start()
    deadline = time.monotonic() + WAIT_S
    while not serving.scheduler.workers[0].busy and time.monotonic() < deadline:
        time.sleep(0.01)
    for thread in threads[1:]:
        thread.start()
    while len(serving.scheduler.queue) < len(calls) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for thread in threads:
        thread.join(WAIT_S)
    return results


def here(runner: LocalRunner, request):
    """A request run in this process, as the numpy array a client gets."""
    return as_array(runner.run(request))


def close_rows(batched, alone) -> None:
    assert batched.shape == alone.shape
    assert np.abs(batched - alone).max() <= BATCH_TOLERANCE


def test_queued_jobs_of_one_operation_and_size_run_as_one_batch(gated):
    serving, gate, batches = gated
    runner = serving.scheduler.workers[0].runner
    rng = np.random.default_rng(0)
    pixels = [rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32) for _ in range(2)]
    held = rng.uniform(-1, 1, (1, 3, 64, 128)).astype(np.float32)  # another size: never in their batch
    jobs = [(held, "a red circle", 0), (pixels[0], "a red circle", 1), (pixels[1], "a blue square", 2)]
    results = concurrently(serving, gate, [lambda remote, job=job: remote.run(Invert(*job)) for job in jobs])
    assert batches == [["invert"], ["invert", "invert"]]
    assert np.array_equal(results[0], here(runner, Invert(*jobs[0])))  # a batch of one: the same bits as in-process
    for got, job in zip(results[1:], jobs[1:]):
        close_rows(got, here(runner, Invert(*job)))
    assert not np.allclose(results[1], results[2], atol=0.1)  # each client got its own row
    assert [(w["jobs"], w["batches"]) for w in serving.scheduler.status()] == [(3, 2)]


def test_queued_generations_and_reconstructions_batch_by_size(gated):
    serving, gate, batches = gated
    runner = serving.scheduler.workers[0].runner
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    latent = here(runner, Invert(pixels, "a red circle", 3))
    calls = [("reconstruct", latent, "a red circle"), ("generate", "a red circle", 5, 64, 64, 3.0, 0.7),
             ("generate", "a blue square", 6, 64, 64, 3.0, 0.7),
             ("generate", "a blue square", 7, 64, 64, 2.0, 0.7),  # other guidance: a batch of its own
             ("reconstruct", latent * 0.5, "a green circle"), ("reconstruct", latent, "a red circle")]
    results = concurrently(serving, gate, [lambda remote, op=op, args=args: remote.run(REQUESTS[op](*args))
                                           for op, *args in calls])
    assert batches[0] == ["reconstruct"]  # the others arrive in any order: the batches they form are fixed
    assert sorted(batches[1:]) == [["generate"], ["generate", "generate"], ["reconstruct", "reconstruct"]]
    alone = [here(runner, REQUESTS[op](*args)) for op, *args in calls]
    assert np.array_equal(results[0], alone[0]) and np.array_equal(results[3], alone[3])
    for got, expected in zip(results, alone):
        close_rows(got, expected)


def test_a_bad_job_in_a_batch_fails_alone(gated):
    serving, gate, batches = gated
    runner = serving.scheduler.workers[0].runner
    latent = here(runner, Invert(np.zeros((1, 3, 64, 64), np.float32), "a red circle", 0))
    conns = []
    for header in ({"op": "reconstruct", "prompt": "a red circle"}, {"op": "reconstruct", "prompt": 12},
                   {"op": "reconstruct", "prompt": "a blue square"}):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        threading.Thread(target=serving.handle, args=(ours,), daemon=True).start()
        send(theirs, header, {"x_T": latent})
        conns.append(theirs)
        deadline = time.monotonic() + WAIT_S
        while not (serving.scheduler.workers[0].busy and len(serving.scheduler.queue) == len(conns) - 1) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    gate.set()
    replies = [receive(conn) for conn in conns]
    assert batches == [["reconstruct"], ["reconstruct", "reconstruct"]]
    assert replies[1][0]["error"].startswith("unexpected ") and " in the server: " in replies[1][0]["error"]
    assert replies[1][1] == {}
    assert np.array_equal(replies[2][1]["pixels"], here(runner, Reconstruct(latent, "a blue square")))  # run alone
    for conn in conns:
        conn.close()


def test_a_client_that_names_a_device_matches_only_its_workers(icd_home):
    runner = LocalRunner(open_session(resolve_model("tiny"), "cpu", "fp32"))
    serving = server.Server(runner, "tiny", False, icd_home / "unused.sock")
    request = {"fingerprint": serving.facts["fingerprint"], "dtype": "auto"}
    assert serving.match({**request, "device": "cpu"}) == (None, frozenset({"cpu"}))
    assert serving.match(request) == (None, frozenset({"cpu"}))  # auto: every worker of the kind it resolves to
    serving.scheduler.workers[0].alive = False
    assert serving.match({**request, "device": "cpu"}) == ("it runs on cpu, fp32", frozenset())


def test_a_worker_process_that_cannot_open_its_model_is_one_line(icd_home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    missing = functools.partial(_serve_runner, resolve_model("tiny"), "fp16", "auto", False, logging.WARNING)
    worker = ProcessWorker("cpu", missing)
    try:
        with pytest.raises(ICDError, match=r"^--device cpu: --dtype fp16: not supported on the CPU"):
            worker.wait_ready()
    finally:
        worker.close()
    assert worker.process.exitcode == 0
