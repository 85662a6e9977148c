"""`icd serve`: one process holds a model and answers the jobs of every `icd` command of the same user on a
Unix socket, so that a shell loop pays the model's start-up once.

The server only computes: clients read and write the user's files and send tensors (`icd.app.wire`). With
several `--device` values it runs one worker per device behind the one socket: the server's own process
serves the first device, and each further device gets a process of its own (spawned), because a CUDA device
wants its own context and streams, torch.compile and CUDA graphs hold per-process state, the Python side of
eager PyTorch would contend for one interpreter lock, and the session cache is per process, so that
`--device cpu --device cpu` holds two real copies of the model. Jobs wait in one queue; an idle worker takes
the first job it may run (a client that named a device is served there) and, from jobs queued behind it,
those that share its operation and size, as one model call with the rows stacked. A `hello` is answered at
once, so a client learns whether this server fits its model, device and dtype while other jobs run.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import stat
import struct
import threading
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from icd.errors import ICDError, UsageError
from icd.models.cache import icd_home

if TYPE_CHECKING:  # a client imports this module for `sockets`: torch stays out of it
    import torch

from .runner import LocalRunner, p2p_from_json
from .wire import Disconnected, receive, send

log = logging.getLogger("icd")

SOCKET_SUFFIX = ".sock"
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108, with the terminating zero
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def serve_folder() -> Path:
    """Where servers put their sockets: $ICD_HOME/serve, readable by its owner only."""
    folder = icd_home() / "serve"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def socket_path(model_name: str, devices: Sequence[torch.device], dtype: str) -> Path:
    from .jobs import slug

    served = "+".join(str(device).replace(":", "-") for device in devices)
    path = serve_folder() / f"{slug(model_name)}-{served}-{dtype}{SOCKET_SUFFIX}"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ICDError(f"the socket path {path} is longer than {MAX_SOCKET_PATH} bytes: set ICD_HOME to a "
                       "shorter folder")
    return path


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (SO_PEERCRED)."""
    _, uid, _ = _CREDENTIALS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    return uid


def describe(facts: dict) -> str:
    """What a server serves, in one line."""
    devices = facts["devices"]
    where = devices[0] if len(devices) == 1 else f"{len(devices)} workers ({', '.join(devices)})"
    return f"serving {facts['model']} ({facts['fingerprint']}) on {where}, {facts['dtype']}, {facts['backend']}"


def describe_worker(number: int, worker: dict) -> str:
    """One worker of a server and what it has done, in one line."""
    jobs, batches = worker["jobs"], worker["batches"]
    state = "ended" if not worker["alive"] else "busy" if worker["busy"] else "idle"
    return (f"worker {number}: {worker['device']}, pid {worker['pid']}, {jobs} job{'s' * (jobs != 1)} in {batches} "
            f"batch{'es' * (batches != 1)}, {state}")


def sockets() -> list[Path]:
    """The socket files in the serve folder (none when it does not exist yet)."""
    folder = icd_home() / "serve"
    return sorted(folder.glob(f"*{SOCKET_SUFFIX}")) if folder.is_dir() else []


def is_alive(path: Path) -> bool:
    """Whether a process listens on the socket `path` (a stale file left by a killed server does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def clear_stale(path: Path) -> None:
    """Make way for a server at `path`: a stale socket (its server is gone) is removed; a live one, or a file
    that is not a socket, is an error. Cheap, so `icd serve` says so before it loads the model."""
    if not (path.exists() or path.is_symlink()):
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ICDError(f"{path} is not a socket: remove it or set ICD_HOME elsewhere")
    if is_alive(path):
        raise UsageError(f"a server already listens at {path}: `icd serve --stop` ends it")
    log.info("replacing the stale socket %s (its server is gone)", path)
    path.unlink()


BATCHED = {"invert": "pixels", "reconstruct": "x_T"}  # the operations batched by their input's shape
MAX_BATCH_ROWS = 8  # jobs in one model call: more would only make the first client wait for the last
WORKER_STOP_S = 60.0


def batch_key(header: dict, tensors: dict) -> tuple | None:
    """Jobs with equal keys can run as one model call, their rows stacked; None for a job that runs alone."""
    op = header.get("op")
    if op in BATCHED:
        rows = tensors.get(BATCHED[op])
        return (op, rows.shape) if rows is not None and rows.ndim == 4 and rows.shape[0] == 1 else None
    if op == "generate":
        return op, header.get("width"), header.get("height"), header.get("guidance"), header.get("tau")
    return None


def answer(runner: LocalRunner, header: dict, tensors: dict) -> tuple[dict, dict | None]:
    """Run one job; any failure becomes the reply's one-line error, never the server's end."""
    try:
        op = header.get("op")
        if op == "invert":
            return {}, {"x_T": runner.invert(tensors["pixels"], header["prompt"], header["seed"])}
        if op == "edit":
            pixels, notes, used = runner.edit(tensors["x_T"], header["source"], header["target"], header["method"],
                                              header["guidance"], header["tau"], p2p_from_json(header["p2p"]),
                                              tensors.get("mask"))
            return {"notes": notes}, {"pixels": pixels} if used is None else {"pixels": pixels, "mask": used}
        if op == "reconstruct":
            return {}, {"pixels": runner.reconstruct(tensors["x_T"], header["prompt"])}
        if op == "generate":
            return {}, {"pixels": runner.generate(header["prompt"], header["seed"], header["width"],
                                                  header["height"], header["guidance"], header["tau"])}
        return {"error": f"unknown request {op!r}"}, None
    except ICDError as err:
        return {"error": str(err)}, None
    except Exception as err:  # the server's wall: the client reports it as its item's failure
        log.debug("job failed:\n%s", traceback.format_exc())
        return {"error": f"unexpected {type(err).__name__} in the server: {_first_line(err)}"}, None


def answer_batch(runner: LocalRunner, jobs: list[tuple[dict, dict]]) -> list[tuple[dict, dict | None]]:
    """Run jobs of one batch key as one model call; a batch that fails (a bad job, or rows beyond the device's
    memory) runs again one job at a time, so that each client gets its own result or error."""
    if len(jobs) > 1:
        try:
            return _answer_rows(runner, jobs)
        except Exception:
            log.debug("a batch of %d jobs failed, running them one by one:\n%s", len(jobs), traceback.format_exc())
    return [answer(runner, header, tensors) for header, tensors in jobs]


def _answer_rows(runner: LocalRunner, jobs: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    headers = [header for header, _ in jobs]
    prompts = [header["prompt"] for header in headers]
    first = headers[0]
    if first["op"] == "invert":
        rows = runner.invert_rows([tensors["pixels"] for _, tensors in jobs], prompts, [h["seed"] for h in headers])
        return [({}, {"x_T": row}) for row in rows]
    if first["op"] == "reconstruct":
        rows = runner.reconstruct_rows([tensors["x_T"] for _, tensors in jobs], prompts)
    else:
        rows = runner.generate_rows(prompts, [h["seed"] for h in headers], first["width"], first["height"],
                                    first["guidance"], first["tau"])
    return [({}, {"pixels": row}) for row in rows]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def runner_facts(runner: LocalRunner) -> dict:
    """What a worker's model is, for the server's checks and `--status`."""
    return {"device": str(runner.session.model.device), "dtype": runner.dtype, "backend": runner.backend,
            "fingerprint": runner.manifest.fingerprint, "size_multiple": runner.size_multiple, "pid": os.getpid()}


@dataclass(eq=False)
class Job:
    """A client's request waiting for a worker; the worker's thread sends the reply on `conn`."""

    conn: socket.socket
    header: dict
    tensors: dict
    devices: frozenset[str] | None  # the devices whose workers may run it (None: any)
    key: tuple | None = field(init=False, default=None)
    done: threading.Event = field(default_factory=threading.Event)
    sent: bool = False  # the reply reached the client: its connection goes on

    def __post_init__(self):
        self.key = batch_key(self.header, self.tensors)


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
                "busy": self.busy, "alive": self.alive}

    @abstractmethod
    def run(self, jobs: list[Job]) -> list[tuple[dict, dict | None]]:
        """The jobs' replies, in order (raises WorkerLost when the worker is gone)."""


class LocalWorker(Worker):
    """The model in the server's own process."""

    def __init__(self, runner: LocalRunner):
        super().__init__(runner_facts(runner))
        self.runner = runner

    def run(self, jobs):
        return answer_batch(self.runner, [(job.header, job.tensors) for job in jobs])


class ProcessWorker(Worker):
    """The model in a process of its own, spawned (never forked: torch's threads and CUDA do not survive a
    fork), talking the `icd.app.wire` protocol on a socket pair. It starts loading at once; `wait_ready`
    waits for it, so that several devices load in parallel. Not a daemon: torch.compile may start processes
    of its own there."""

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

    def run(self, jobs):
        tensors = {f"{i}.{name}": array for i, job in enumerate(jobs) for name, array in job.tensors.items()}
        try:
            send(self.conn, {"jobs": [job.header for job in jobs]}, tensors)
            reply, results = receive(self.conn)
        except (Disconnected, OSError) as err:
            raise WorkerLost(str(err) or type(err).__name__) from None
        return [(header, _numbered(results, i) or None) for i, header in enumerate(reply["replies"])]

    def close(self) -> None:
        """End the worker: it reads the end of its connection (or, still loading, is killed) and exits."""
        self.conn.close()
        if not self.ready:
            self.process.kill()
        self.process.join(WORKER_STOP_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _numbered(tensors: dict, index: int) -> dict:
    """Job `index`'s tensors out of a batch message, where each name is prefixed with its job's number."""
    prefix = f"{index}."
    return {name[len(prefix):]: array for name, array in tensors.items() if name.startswith(prefix)}


def _work(conn: socket.socket, open_runner: Callable[[str], LocalRunner], device: str) -> None:
    """A worker process: open the model on `device`, send its facts, then answer batches until the server
    closes the connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    with conn:
        try:
            runner = open_runner(device)
        except Exception as err:
            with suppress(OSError):
                send(conn, {"error": str(err) if isinstance(err, ICDError)
                            else f"unexpected {type(err).__name__}: {_first_line(err)}"})
            return
        try:
            send(conn, runner_facts(runner))
            while True:
                header, tensors = receive(conn)
                replies = answer_batch(runner, [(job, _numbered(tensors, i)) for i, job in enumerate(header["jobs"])])
                send(conn, {"replies": [reply for reply, _ in replies]},
                     {f"{i}.{name}": array for i, (_, results) in enumerate(replies) for name, array in
                      (results or {}).items()})
        except (Disconnected, OSError):
            return


class Server:
    """Answers the requests of each connection in its own thread; each worker runs one batch at a time."""

    def __init__(self, runner: LocalRunner, model_ref: str, compile: bool, path: Path,
                 others: Sequence[ProcessWorker] = ()):
        self.path, self.compile = path, compile
        self.workers: list[Worker] = [LocalWorker(runner)]
        for worker in others:
            worker.wait_ready()
            self.workers.append(worker)
        first = self.workers[0].facts
        for worker in self.workers[1:]:
            for fact in ("fingerprint", "dtype", "backend"):
                if worker.facts[fact] != first[fact]:
                    raise ICDError(f"the workers on {first['device']} and {worker.device} differ in {fact} "
                                   f"({first[fact]}, {worker.facts[fact]}): name it with its option")
        self.facts = {"model": model_ref, "fingerprint": first["fingerprint"],
                      "devices": [worker.device for worker in self.workers], "dtype": first["dtype"],
                      "backend": first["backend"], "compile": compile, "size_multiple": first["size_multiple"],
                      "pid": os.getpid(), "socket": str(path)}
        self.queue: list[Job] = []
        self.changed = threading.Condition()
        self.stopping = False
        self.feeders: list[threading.Thread] = []

    def description(self) -> str:
        return f"{describe(self.facts)} at {self.path}"

    def serve(self, ready) -> None:
        """Listen until Ctrl-C or SIGTERM; then `stop` and remove the socket."""
        listener = self._listen()
        identity = os.stat(self.path).st_ino
        try:
            self.start()
            ready(self.description())
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        except KeyboardInterrupt:
            log.info("stopping after the jobs in flight, if any")
        finally:
            listener.close()
            with suppress(OSError):
                if os.stat(self.path).st_ino == identity:
                    self.path.unlink()
            self.stop()

    def start(self) -> None:
        """Start each worker's thread, which takes its batches from the queue."""
        for worker in self.workers:
            feeder = threading.Thread(target=self._feed, args=(worker,), daemon=True)
            feeder.start()
            self.feeders.append(feeder)

    def stop(self) -> None:
        """Let the batches in flight finish and send their replies; drop the queued jobs (their clients, finding
        the connection closed, go on in their own process)."""
        with self.changed:
            self.stopping = True
            for job in self.queue:
                job.done.set()
            self.queue.clear()
            self.changed.notify_all()
        for feeder in self.feeders:
            feeder.join()

    def _listen(self) -> socket.socket:
        clear_stale(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # the socket is born 0600: no moment when others may connect
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(previous)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        return listener

    def handle(self, conn: socket.socket) -> None:
        """One client's connection: its requests in order until it closes or the server stops."""
        with conn:
            uid = peer_uid(conn)
            if uid != os.getuid():
                log.warning("refused a connection from user id %d (this server serves user id %d only)", uid,
                            os.getuid())
                with suppress(OSError):
                    send(conn, {"error": f"refused: this server serves user id {os.getuid()} only"})
                return
            devices = None  # what the client's hello allows; a job sent without one may run anywhere
            while True:
                try:
                    header, tensors = receive(conn)
                except (Disconnected, OSError):
                    return
                if header.get("op") == "hello":  # answered at once, even while jobs run
                    mismatch, devices = self.match(header)
                    if not _reply(conn, ({**self.facts, "workers": self.worker_status(), "mismatch": mismatch},
                                         None)):
                        return
                    continue
                job = Job(conn, header, tensors, devices)
                with self.changed:
                    if self.stopping:
                        return
                    self.queue.append(job)
                    self.changed.notify_all()
                job.done.wait()
                if not job.sent:
                    return

    def worker_status(self) -> list[dict]:
        with self.changed:
            return [worker.status() for worker in self.workers]

    def _feed(self, worker: Worker) -> None:
        """A worker's thread: take a batch, run it, send each job's reply; until the server stops."""
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
                replies = worker.run(batch)
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
                job.sent = reply is not None and _reply(job.conn, reply)
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
        alive = {worker.device for worker in self.workers if worker.alive}
        with self.changed:
            for job in [job for job in self.queue if job.devices is not None and not job.devices & alive]:
                self.queue.remove(job)
                job.done.set()

    def match(self, request: dict) -> tuple[str | None, frozenset[str]]:
        """Why this server cannot run a client's jobs bit for bit as the client itself would (or None), and
        the devices whose workers may run them: the device it names, or with `auto`, each of that kind."""
        import torch

        from icd.models.loading import PRECISIONS, resolve_device, resolve_dtype

        served = frozenset()
        if request.get("fingerprint") != self.facts["fingerprint"]:
            return f"it serves model {self.facts['model']} ({self.facts['fingerprint']})", served
        try:
            device = resolve_device(request.get("device", "auto"))
            dtype = PRECISIONS[resolve_dtype(request.get("dtype", "auto"), device)]
        except ICDError as err:
            return str(err), served
        auto = request.get("device", "auto") == "auto"
        served = frozenset(worker.device for worker in self.workers if worker.alive and (
            torch.device(worker.device).type == device.type if auto else torch.device(worker.device) == device))
        if not served or dtype != self.facts["dtype"]:
            return f"it runs on {', '.join(self.facts['devices'])}, {self.facts['dtype']}", served
        if request.get("backend", "auto") not in ("auto", self.facts["backend"]):
            return f"it runs the {self.facts['backend']} backend", served
        if bool(request.get("compile")) != self.compile:
            return "its --compile setting differs", served
        return None, served

    def mismatch(self, request: dict) -> str | None:
        return self.match(request)[0]


def _reply(conn: socket.socket, reply: tuple[dict, dict | None]) -> bool:
    try:
        send(conn, *reply)
        return True
    except OSError:  # the client went away mid-job: its result is dropped, the server goes on
        log.debug("a client left before its result was sent")
        return False
