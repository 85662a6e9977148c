"""The client side of `icd serve`: find a server that fits a command's model, device and dtype, run the
jobs' operations on it, and fall back to this process when it goes away, so that a batch always completes."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from icd.errors import ICDError
from icd.models.manifest import Manifest

from .runner import LocalRunner, Runner, p2p_to_json
from .server import sockets
from .wire import Disconnected, receive, send

log = logging.getLogger("icd")

CONNECT_TIMEOUT_S = 5.0


class ServerGone(Exception):
    """The server closed the connection or died: the caller carries on in-process."""


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT_S)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _hello(conn: socket.socket, request: dict) -> dict | None:
    """The server's facts (with `mismatch` saying why it cannot serve `request`), or None when it does not
    answer as a server of ours."""
    try:
        send(conn, {"op": "hello", **request})
        facts, _ = receive(conn)
    except (OSError, Disconnected):
        return None
    if "error" in facts:
        log.debug("%s", facts["error"])
        return None
    conn.settimeout(None)  # jobs take as long as they take; a dead server closes the connection
    return facts


def running_servers() -> list[tuple[Path, dict | None]]:
    """Every socket in the serve folder with its server's facts, None for a stale one (no server)."""
    found = []
    for path in sockets():
        conn = _connect(path)
        facts = None
        if conn is not None:
            with conn:
                facts = _hello(conn, {})
        found.append((path, facts))
    return found


def find_server(manifest: Manifest, device: str, dtype: str, backend: str, compile: bool) -> RemoteRunner | None:
    """A connection to a running server of this model, device and dtype (as this process would resolve
    them), or None."""
    request = {"fingerprint": manifest.fingerprint, "device": device, "dtype": dtype, "backend": backend,
               "compile": compile}
    for path in sockets():
        conn = _connect(path)
        if conn is None:
            continue
        facts = _hello(conn, request)
        if facts is not None and facts.get("mismatch") is None:
            return RemoteRunner(conn, facts, manifest, path)
        conn.close()
        if facts is not None:
            log.debug("not using the server at %s: %s", path, facts["mismatch"])
    return None


def stop_server(path: Path, facts: dict, wait_s: float = 60.0) -> None:
    """SIGTERM a server (it finishes its job in flight) and wait until its socket is gone."""
    try:
        os.kill(int(facts["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if path.exists():
        raise ICDError(f"the server at {path} (pid {facts['pid']}) did not stop within {wait_s:.0f} s")


class RemoteRunner:
    """The runner of a server: each operation is one request on the connection."""

    def __init__(self, conn: socket.socket, facts: dict, manifest: Manifest, path: Path):
        self.conn, self.path, self.manifest = conn, path, manifest
        self.backend, self.dtype, self.size_multiple = facts["backend"], facts["dtype"], facts["size_multiple"]

    def _call(self, header: dict, tensors: dict | None = None) -> tuple[dict, dict]:
        try:
            send(self.conn, header, tensors)
            reply, results = receive(self.conn)
        except (OSError, Disconnected) as err:
            self.conn.close()
            raise ServerGone(str(err) or type(err).__name__) from None
        if "error" in reply:
            raise ICDError(reply["error"])
        return reply, results

    def invert(self, pixels, prompt, seed):
        return self._call({"op": "invert", "prompt": prompt, "seed": seed}, {"pixels": pixels})[1]["x_T"]

    def edit(self, x_T, source, target, method, guidance, tau, p2p, mask=None):
        tensors = {"x_T": x_T} if mask is None else {"x_T": x_T, "mask": mask}
        reply, results = self._call({"op": "edit", "source": source, "target": target, "method": method,
                                     "guidance": guidance, "tau": tau, "p2p": p2p_to_json(p2p)}, tensors)
        return results["pixels"], reply["notes"], results.get("mask")

    def reconstruct(self, x_T, prompt):
        return self._call({"op": "reconstruct", "prompt": prompt}, {"x_T": x_T})[1]["pixels"]

    def generate(self, prompt, seed, width, height, guidance, tau):
        return self._call({"op": "generate", "prompt": prompt, "seed": seed, "width": width, "height": height,
                           "guidance": guidance, "tau": tau})[1]["pixels"]


class FallbackRunner:
    """A server's runner that turns into an in-process one (opened then) when the server goes away; the
    operation that found it gone is run again here, so no item of the batch is lost."""

    def __init__(self, remote: RemoteRunner, open_local: Callable[[], LocalRunner]):
        self.remote, self._open_local = remote, open_local
        self.current: Runner = remote

    @property
    def manifest(self) -> Manifest:
        return self.current.manifest

    @property
    def backend(self) -> str:
        return self.current.backend

    @property
    def dtype(self) -> str:
        return self.current.dtype

    @property
    def size_multiple(self) -> int:
        return self.current.size_multiple

    def _run(self, operation: str, *args):
        if self.current is self.remote:
            try:
                return getattr(self.remote, operation)(*args)
            except ServerGone as err:
                log.warning("the server at %s went away (%s): continuing in this process", self.remote.path, err)
                self.current = self._open_local()
        return getattr(self.current, operation)(*args)

    def invert(self, *args):
        return self._run("invert", *args)

    def edit(self, *args):
        return self._run("edit", *args)

    def reconstruct(self, *args):
        return self._run("reconstruct", *args)

    def generate(self, *args):
        return self._run("generate", *args)
