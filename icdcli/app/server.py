"""`icd serve`: one process holds a model and answers the jobs of every `icd` command of the same user on a
Unix socket, so that a shell loop pays the model's start-up once.

The server only computes: clients read and write the user's files and send tensors (`icd.app.wire`). Jobs
from several clients are queued on one lock; a `hello` is answered at once, so a client learns whether this
server fits its model, device and dtype while another client's job runs.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
import traceback
from contextlib import suppress
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


def socket_path(model_name: str, device: torch.device, dtype: str) -> Path:
    from .jobs import slug

    name = f"{slug(model_name)}-{str(device).replace(':', '-')}-{dtype}{SOCKET_SUFFIX}"
    path = serve_folder() / name
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
    return (f"serving {facts['model']} ({facts['fingerprint']}) on {facts['device']}, {facts['dtype']}, "
            f"{facts['backend']}")


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


class Server:
    """Answers the requests of each connection in its own thread; the model runs one job at a time."""

    def __init__(self, runner: LocalRunner, model_ref: str, compile: bool, path: Path):
        model = runner.session.model
        self.runner, self.path = runner, path
        self.device, self.compile = model.device, compile
        self.facts = {"model": model_ref, "fingerprint": runner.manifest.fingerprint, "device": str(model.device),
                      "dtype": runner.dtype, "backend": runner.backend, "compile": compile,
                      "size_multiple": runner.size_multiple, "pid": os.getpid(), "socket": str(path)}
        self.jobs = threading.Lock()
        self.stopping = threading.Event()

    def description(self) -> str:
        return f"{describe(self.facts)} at {self.path}"

    def serve(self, ready) -> None:
        """Listen until Ctrl-C or SIGTERM; then let the job in flight finish and remove the socket."""
        listener = self._listen()
        identity = os.stat(self.path).st_ino
        try:
            ready(self.description())
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        except KeyboardInterrupt:
            log.info("stopping after the job in flight, if any")
        finally:
            listener.close()
            with suppress(OSError):
                if os.stat(self.path).st_ino == identity:
                    self.path.unlink()
            with self.jobs:
                self.stopping.set()

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
            while not self.stopping.is_set():
                try:
                    header, tensors = receive(conn)
                except (Disconnected, OSError):
                    return
                if header.get("op") == "hello":  # answered at once, even while another client's job runs
                    if not self._reply(conn, ({**self.facts, "mismatch": self.mismatch(header)}, None)):
                        return
                    continue
                with self.jobs:
                    if self.stopping.is_set() or not self._reply(conn, self.answer(header, tensors)):
                        return

    @staticmethod
    def _reply(conn: socket.socket, reply: tuple[dict, dict | None]) -> bool:
        try:
            send(conn, *reply)
            return True
        except OSError:  # the client went away mid-job: its result is dropped, the server goes on
            log.debug("a client left before its result was sent")
            return False

    def mismatch(self, request: dict) -> str | None:
        """Why this server cannot run a client's jobs bit for bit as the client itself would, or None."""
        from icd.models.loading import PRECISIONS, resolve_device, resolve_dtype

        if request.get("fingerprint") != self.facts["fingerprint"]:
            return f"it serves model {self.facts['model']} ({self.facts['fingerprint']})"
        try:
            device = resolve_device(request.get("device", "auto"))
            dtype = PRECISIONS[resolve_dtype(request.get("dtype", "auto"), device)]
        except ICDError as err:
            return str(err)
        if device != self.device or dtype != self.facts["dtype"]:
            return f"it runs on {self.facts['device']}, {self.facts['dtype']}"
        if request.get("backend", "auto") not in ("auto", self.facts["backend"]):
            return f"it runs the {self.facts['backend']} backend"
        if bool(request.get("compile")) != self.compile:
            return "its --compile setting differs"
        return None

    def answer(self, header: dict, tensors: dict) -> tuple[dict, dict | None]:
        """Run one job; any failure becomes the reply's one-line error, never the server's end."""
        runner = self.runner
        try:
            op = header.get("op")
            if op == "invert":
                return {}, {"x_T": runner.invert(tensors["pixels"], header["prompt"], header["seed"])}
            if op == "edit":
                pixels, notes = runner.edit(tensors["x_T"], header["source"], header["target"], header["method"],
                                            header["guidance"], header["tau"], p2p_from_json(header["p2p"]))
                return {"notes": notes}, {"pixels": pixels}
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
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return {"error": f"unexpected {type(err).__name__} in the server: {first}"}, None
