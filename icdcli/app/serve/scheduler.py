"""The scheduler of `icd serve`: one queue of requests, the workers that run them (one copy of the model per
device), and the batching of queued requests of one batch key into one model call. The server's own process
serves the first device, each further device a spawned process of its own: CUDA contexts, torch.compile and
CUDA graphs are per process, eager PyTorch would contend for one interpreter lock, and two `--device cpu` hold
two real copies of the model."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

from icd.errors import ICDError, first_line

from ..requests import Request, decode_request, encode_result
from ..runner import LocalRunner
from .wire import Disconnected, receive, send

log = logging.getLogger("icd")

MAX_BATCH_ROWS = 8  # jobs in one model call: more would only make the first client wait for the last
WORKER_STOP_S = 60.0
Reply = tuple[dict, dict]  # a JSON header and named arrays, as the wire sends them


def answer(runner: LocalRunner, request: Request) -> Reply:
    """Run one request; any failure becomes the reply's one-line error, never the server's end."""
    try:
        return encode_result(request.op, runner.run(request))
    except ICDError as err:
        return {"error": str(err)}, {}
    except Exception as err:  # the server's wall: the client reports it as its item's failure
        log.debug("job failed:\n%s", traceback.format_exc())
        return {"error": f"unexpected {type(err).__name__} in the server: {first_line(err)}"}, {}


def answer_batch(runner: LocalRunner, requests: list[Request]) -> list[Reply]:
    """Run requests of one batch key as one model call; a batch that fails (a bad job, or rows beyond the
    device's memory) runs again one job at a time, so that each client gets its own result or error."""
    if len(requests) > 1:
        try:
            return [encode_result(r.op, result) for r, result in zip(requests, runner.run_batch(requests))]
        except Exception:
            log.debug("a batch of %d jobs failed, running them one by one:\n%s", len(requests), traceback.format_exc())
    return [answer(runner, request) for request in requests]


def runner_facts(runner: LocalRunner) -> dict:
    """What a worker's model is (and its CPU threads), for the server's checks and `--status`."""
    import torch

    return {"device": str(runner.session.model.device), "dtype": runner.dtype, "backend": runner.backend,
            "fingerprint": runner.manifest.fingerprint, "size_multiple": runner.size_multiple, "pid": os.getpid(),
            "threads": torch.get_num_threads()}


@dataclass(eq=False)
class Job:
    """A client's request waiting for a worker; `reply` is set, and `done`, when it has run."""

    request: Request
    devices: frozenset[str] | None  # the devices whose workers may run it (None: any)
    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None  # None once done: the server stopped, or the worker was lost

    @property
    def key(self) -> tuple | None:
        return self.request.batch_key()


class WorkerLost(Exception):
    """A worker's process ended: its jobs' clients carry on in their own process."""


class Worker(ABC):
    """One copy of the model on one device, and what it has done (for `--status`)."""

    def __init__(self, facts: dict):
        self.facts, self.device = facts, facts["device"]
        self.jobs = self.batches = 0
        self.busy, self.alive = False, True

    def status(self) -> dict:
        return {"device": self.device, "pid": self.facts["pid"], "jobs": self.jobs, "batches": self.batches,
                "busy": self.busy, "alive": self.alive, "threads": self.facts.get("threads")}  # none while loading

    @abstractmethod
    def run(self, requests: list[Request]) -> list[Reply]:
        """The requests' replies, in order (raises WorkerLost when the worker is gone)."""

    def close(self) -> None:
        """End the worker."""


class LocalWorker(Worker):
    """The model in the server's own process."""

    def __init__(self, runner: LocalRunner):
        super().__init__(runner_facts(runner))
        self.runner = runner

    def run(self, requests):
        return answer_batch(self.runner, requests)


def _batch_message(replies: list[Reply]) -> Reply:
    """Several (header, arrays) as one message: the headers in a list, each array named `i.name`."""
    return ({"items": [header for header, _ in replies]},
            {f"{i}.{name}": array for i, (_, arrays) in enumerate(replies) for name, array in arrays.items()})


def _unbatched(message: Reply) -> list[Reply]:
    """A batch message's (header, arrays), each array's `i.` taken off its name."""
    header, arrays = message
    return [(item, {name.removeprefix(f"{i}."): array for name, array in arrays.items() if name.startswith(f"{i}.")})
            for i, item in enumerate(header["items"])]


class ProcessWorker(Worker):
    """The model in a process of its own, spawned (never forked: torch's threads and CUDA do not survive a
    fork), talking the wire protocol on a socket pair. It starts loading at once; `wait_ready` waits for it,
    so that several devices load in parallel. Not a daemon: torch.compile may start processes of its own."""

    def __init__(self, device: str, open_runner: Callable[[str], LocalRunner]):
        import multiprocessing

        self.conn, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = multiprocessing.get_context("spawn").Process(
            target=_work, args=(theirs, open_runner, device), name=f"icd serve worker ({device})")
        self.process.start()
        theirs.close()
        super().__init__({"device": device, "pid": self.process.pid})
        self.ready = False

    def wait_ready(self) -> None:
        """Wait until the model is open in the worker; its failure is one line naming the device."""
        try:
            facts, _ = receive(self.conn)
        except (Disconnected, OSError):
            self.process.join(WORKER_STOP_S)
            raise ICDError(f"--device {self.device}: the worker process ended before its model was open "
                           f"(exit code {self.process.exitcode})") from None
        if "error" in facts:  # said by the worker, which then ends
            self.process.join(WORKER_STOP_S)
            raise ICDError(f"--device {self.device}: {facts['error']}")
        self.facts, self.device, self.ready = facts, facts["device"], True

    def run(self, requests):
        try:
            send(self.conn, *_batch_message([request.encode() for request in requests]))
            return _unbatched(receive(self.conn))
        except (Disconnected, OSError) as err:
            raise WorkerLost(str(err) or type(err).__name__) from None

    def close(self) -> None:
        """End the worker: it reads the end of its connection (or, still loading, is killed) and exits."""
        self.conn.close()
        if not self.ready:
            self.process.kill()
        self.process.join(WORKER_STOP_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _work(conn: socket.socket, open_runner: Callable[[str], LocalRunner], device: str) -> None:
    """A worker process: open the model on `device`, send its facts, then answer batches until closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    with conn:
        try:
            runner = open_runner(device)
        except Exception as err:
            with suppress(OSError):
                send(conn, {"error": str(err) if isinstance(err, ICDError)
                            else f"unexpected {type(err).__name__}: {first_line(err)}"})
            return
        try:
            send(conn, runner_facts(runner))
            while True:
                requests = [decode_request(*item) for item in _unbatched(receive(conn))]
                send(conn, *_batch_message(answer_batch(runner, requests)))
        except (Disconnected, OSError):
            return


class Scheduler:
    """The queue and the workers: each worker's thread takes a batch, runs it and marks its jobs done."""

    def __init__(self, workers: Sequence[Worker]):
        self.workers = list(workers)
        self.queue: list[Job] = []
        self.changed = threading.Condition()
        self.stopping = False
        self.feeders: list[threading.Thread] = []

    def start(self) -> None:
        for worker in self.workers:
            feeder = threading.Thread(target=self._feed, args=(worker,), daemon=True)
            feeder.start()
            self.feeders.append(feeder)

    def submit(self, job: Job) -> bool:
        """Queue a job (False when the server is stopping: the caller replies nothing)."""
        with self.changed:
            if self.stopping:
                return False
            self.queue.append(job)
            self.changed.notify_all()
        return True

    def stop(self) -> None:
        """Let the batches in flight finish; drop the queued jobs (their clients go on in their own process)."""
        with self.changed:
            self.stopping = True
            for job in self.queue:
                job.done.set()
            self.queue.clear()
            self.changed.notify_all()
        for feeder in self.feeders:
            feeder.join()

    def status(self) -> list[dict]:
        with self.changed:
            return [worker.status() for worker in self.workers]

    def alive_devices(self) -> set[str]:
        return {worker.device for worker in self.workers if worker.alive}

    def _feed(self, worker: Worker) -> None:
        """A worker's thread: take a batch, run it, hand each job its reply; until the server stops."""
        while True:
            with self.changed:
                batch = self._take(worker)
                while batch is None and not self.stopping:
                    self.changed.wait()
                    batch = self._take(worker)
                if batch is None:
                    return
                worker.busy = True
            lost = None
            try:
                replies = worker.run([job.request for job in batch])
            except WorkerLost as err:
                log.warning("the worker on %s (pid %s) ended (%s): its clients go on in their own process",
                            worker.device, worker.facts["pid"], err)
                lost, replies = err, [None] * len(batch)
            with self.changed:
                worker.busy, worker.alive = False, lost is None
                if lost is None:
                    worker.jobs += len(batch)
                    worker.batches += 1
                self.changed.notify_all()
            for job, reply in zip(batch, replies):
                job.reply = reply
                job.done.set()
            if not worker.alive:
                self._drop_unservable()
                return

    def _take(self, worker: Worker) -> list[Job] | None:
        """The next batch for `worker` (called holding `changed`): the first job it may run, unless an idle
        worker that may run it too has done fewer jobs (the least busy one takes it), with the queued jobs of
        the same batch key, up to a fair share of the queue among the idle workers."""
        eligible = [job for job in self.queue if job.devices is None or worker.device in job.devices]
        if not eligible:
            return None
        first = eligible[0]
        idle = [other for other in self.workers if other.alive and not other.busy]
        rivals = [other for other in idle if first.devices is None or other.device in first.devices]
        if min(rivals, key=lambda other: other.jobs) is not worker:
            return None
        share = min(MAX_BATCH_ROWS, math.ceil(len(eligible) / len(idle)))
        batch = [first]
        if first.key is not None:
            batch += [job for job in eligible[1:] if job.key == first.key][:share - 1]
        for job in batch:
            self.queue.remove(job)
        return batch

    def _drop_unservable(self) -> None:
        """After a worker ended: the queued jobs that no living worker may run go back to their clients."""
        alive = self.alive_devices()
        with self.changed:
            for job in [job for job in self.queue if job.devices is not None and not job.devices & alive]:
                self.queue.remove(job)
                job.done.set()
