"""The socket front end of `icd serve`: a thread per connection (peers of another user refused) answers a
hello at once, even while jobs run, and hands requests to the scheduler. No client can hold the server: a reply
is sent from the client's own thread with a send timeout, a running job's client hears a heartbeat, and
connections are capped. The server only computes: clients read and write the user's files."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from icd.errors import ICDError

from ..requests import decode_request
from ..runner import LocalRunner
from .scheduler import Job, LocalWorker, ProcessWorker, Scheduler
from .sockets import clear_stale, describe, peer_uid
from .wire import Disconnected, Malformed, receive, send

log = logging.getLogger("icd")

HEARTBEAT_S = 2.0  # a running job's client hears from the server this often
SEND_TIMEOUT_S = 30.0  # a client that reads nothing for this long is dropped
MAX_CONNECTIONS = 256  # beyond this a new client is told the server is busy (it then runs its jobs itself)
ACCEPT_RETRY_S = 0.1  # out of descriptors: wait this long for some to be freed


class Server:
    """The front end over a scheduler of one worker per device (the first in this process)."""

    def __init__(self, runner: LocalRunner, model_ref: str, compile: bool, path: Path,
                 others: Sequence[ProcessWorker] = ()):
        self.path, self.compile = path, compile
        workers = [LocalWorker(runner)]
        for worker in others:
            worker.wait_ready()
            workers.append(worker)
        first = workers[0].facts
        for worker in workers[1:]:
            for fact in ("fingerprint", "dtype", "backend"):
                if worker.facts[fact] != first[fact]:
                    raise ICDError(f"the workers on {first['device']} and {worker.device} differ in {fact} "
                                   f"({first[fact]}, {worker.facts[fact]}): name it with its option")
        self.scheduler = Scheduler(workers)
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.facts = {"model": model_ref, "fingerprint": first["fingerprint"],
                      "devices": [worker.device for worker in workers], "dtype": first["dtype"],
                      "backend": first["backend"], "compile": compile, "size_multiple": first["size_multiple"],
                      "pid": os.getpid(), "socket": str(path)}

    def description(self) -> str:
        return f"{describe(self.facts)} at {self.path}"

    def serve(self, ready) -> None:
        """Listen until Ctrl-C or SIGTERM; then stop the scheduler and remove the socket."""
        listener = self._listen()
        identity = os.stat(self.path).st_ino
        try:
            self.scheduler.start()
            ready(self.description())
            while True:
                self._accept(listener)
        except KeyboardInterrupt:
            log.info("stopping after the jobs in flight, if any")
        finally:
            listener.close()
            with suppress(OSError):
                if os.stat(self.path).st_ino == identity:
                    self.path.unlink()
            self.scheduler.stop()

    def _accept(self, listener: socket.socket) -> None:
        """One client: its own thread, or an error reply when MAX_CONNECTIONS are open; a failed accept (no
        descriptor left) is said once per burst and retried."""
        try:
            conn, _ = listener.accept()
        except OSError as err:
            log.warning("cannot accept a connection (%s): retrying", err.strerror or err)
            time.sleep(ACCEPT_RETRY_S)
            return
        if not self.connections.acquire(blocking=False):
            _reply(conn, ({"error": f"busy: {MAX_CONNECTIONS} connections are open"}, {}))
            conn.close()
            return
        threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        finally:
            self.connections.release()

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
            conn.settimeout(SEND_TIMEOUT_S)
            uid = peer_uid(conn)
            if uid != os.getuid():
                log.warning("refused a connection from user id %d (this server serves user id %d only)", uid,
                            os.getuid())
                _reply(conn, ({"error": f"refused: this server serves user id {os.getuid()} only"}, {}))
                return
            mismatch, devices = None, None  # what the client's hello allows; without one, any worker
            while True:
                try:
                    conn.settimeout(None)  # a client may wait as long as it likes between its requests
                    header, arrays = receive(conn)
                    conn.settimeout(SEND_TIMEOUT_S)
                except Malformed as err:
                    log.info("a message that cannot be read (%s) was answered with an error", err)
                    reply = ({"error": f"malformed message: {err}"}, {})
                except (Disconnected, OSError):
                    return
                else:
                    if header.get("op") == "hello":  # answered at once, even while jobs run
                        mismatch, devices = self.match(header)
                        reply = ({**self.facts, "workers": self.scheduler.status(), "mismatch": mismatch}, {})
                    elif mismatch is not None:
                        reply = ({"error": f"this server cannot run it: {mismatch}"}, {})
                    elif (reply := self._run(conn, header, arrays, devices)) is None:
                        return
                if not _reply(conn, reply):
                    return

    def _run(self, conn: socket.socket, header: dict, arrays: dict, devices) -> tuple[dict, dict] | None:
        """A request's reply, with heartbeats to its client while it waits; None when no worker answered it
        (the server stops, or its worker ended) or the client stopped listening."""
        try:
            request = decode_request(header, arrays)
        except (KeyError, TypeError, ValueError) as err:
            log.info("a malformed request (%s: %s) was answered with an error", type(err).__name__, err)
            return {"error": f"malformed request ({type(err).__name__}: {err})"}, {}
        job = Job(request, devices)
        if not self.scheduler.submit(job):
            return None
        while not job.done.wait(HEARTBEAT_S):
            if not _reply(conn, ({"working": True}, {})):
                return None
        return job.reply

    def match(self, request: dict) -> tuple[str | None, frozenset[str]]:
        """Why this server cannot run a client's jobs bit for bit as the client itself would (or None), and
        the devices whose workers may run them: the device it names, or with `auto`, each of that kind."""
        import torch

        from icd.models.loading import PRECISIONS, resolve_device, resolve_dtype
        from icd_export.registry import satisfies

        served = frozenset()
        if request.get("fingerprint") != self.facts["fingerprint"]:
            return f"it serves model {self.facts['model']} ({self.facts['fingerprint']})", served
        try:
            device = resolve_device(request.get("device", "auto"))
            dtype = PRECISIONS[resolve_dtype(request.get("dtype", "auto"), device)]
        except ICDError as err:
            return str(err), served
        auto = request.get("device", "auto") == "auto"
        alive = self.scheduler.alive_devices()
        served = frozenset(name for name in alive if (
            torch.device(name).type == device.type if auto else torch.device(name) == device))
        if not served or dtype != self.facts["dtype"]:
            return f"it runs on {', '.join(self.facts['devices'])}, {self.facts['dtype']}", served
        if not satisfies(request.get("backend", "auto"), self.facts["backend"]):
            return f"it runs the {self.facts['backend']} backend", served
        if bool(request.get("compile")) != self.compile:
            return "its --compile setting differs", served
        return None, served


def _reply(conn: socket.socket, reply: tuple[dict, dict]) -> bool:
    """Send a reply within the connection's timeout; False when the client left or stopped reading."""
    try:
        send(conn, *reply)
        return True
    except OSError:
        log.debug("a client left, or read nothing for %.0f s, before its reply was sent", SEND_TIMEOUT_S)
        return False
