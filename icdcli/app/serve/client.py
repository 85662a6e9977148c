"""The client side of `icd serve`: run a command's requests on a server that fits its model, device and dtype,
falling back to this process when it goes away, falls silent (SILENCE_S) or returns something that is not the
result asked for, so that a batch always completes with results this process could have made."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from icd.errors import ICDError
from icd.latents import LATENT_CHANNELS, VAE_FACTOR
from icd.models.manifest import Manifest

from ..requests import Edit, Generate, Invert, Request, decode_result
from ..runner import LocalRunner, Runner
from .sockets import sockets
from .wire import Disconnected, Malformed, receive, send

log = logging.getLogger("icd")

CONNECT_TIMEOUT_S = 5.0
SILENCE_S = 30.0  # a server that says nothing for this long (it sends a heartbeat every 2 s) is given up on
STOP_WAIT_S = 60.0  # how long `icd serve --stop` waits for the server's socket to go


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
    """The server's facts (`mismatch`: why it cannot serve `request`), or None when it is not a server of ours."""
    try:
        send(conn, {"op": "hello", **request})
        facts, _ = receive(conn)
    except (OSError, Disconnected):
        return None
    if "error" in facts:
        log.debug("%s", facts["error"])
        return None
    conn.settimeout(SILENCE_S)  # jobs take as long as they take, with a heartbeat while they run
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
    """A connection to a running server of this model, device and dtype, or None."""
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


def served_or_here(manifest: Manifest, device: str, dtype: str, backend: str, compile: bool, no_server: bool,
                   open_here: Callable[[], Runner]) -> Runner:
    """A running `icd serve` of this model, device and dtype, falling back to `open_here()` if it goes away;
    else, or with `no_server`, `open_here()` at once."""
    from ..distributed import local_device

    remote = None if no_server else find_server(manifest, local_device(device), dtype, backend, compile)
    if remote is None:
        return open_here()
    log.info("using the server at %s", remote.path)
    return FallbackRunner(remote, open_here)


def stop_server(path: Path, facts: dict) -> None:
    """SIGTERM a server (it finishes its job in flight) and wait until its socket is gone."""
    try:
        os.kill(int(facts["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if path.exists():
        raise ICDError(f"the server at {path} (pid {facts['pid']}) did not stop within {STOP_WAIT_S:.0f} s")


class RemoteRunner:
    """The runner of a server: each request is one message on the connection."""

    def __init__(self, conn: socket.socket, facts: dict, manifest: Manifest, path: Path):
        self.conn, self.path, self.manifest = conn, path, manifest
        self.backend, self.dtype, self.size_multiple = facts["backend"], facts["dtype"], facts["size_multiple"]

    def run(self, request: Request):
        try:
            send(self.conn, *request.encode())
            header, arrays = receive(self.conn)
            while header.get("working"):  # the server's heartbeat while the job runs
                header, arrays = receive(self.conn)
            if "error" in header:
                raise ICDError(header["error"])
            result = decode_result(request.op, header, arrays)
            check_result(request, result)
        except TimeoutError:
            self.conn.close()
            raise ServerGone(f"it said nothing for {SILENCE_S:.0f} s") from None
        except (OSError, Disconnected, Malformed, KeyError, TypeError, ValueError) as err:
            self.conn.close()
            raise ServerGone(str(err) or type(err).__name__) from None
        return result


def check_result(request: Request, result) -> None:
    """What a server returned has the shape, dtype and values the request asks for (else a ValueError)."""
    scale = VAE_FACTOR
    if isinstance(request, Invert):
        rows, _, height, width = request.pixels.shape
        expected = {"x_T": (result, (rows, LATENT_CHANNELS, height // scale, width // scale))}
    elif isinstance(request, Generate):
        expected = {"pixels": (result, (1, 3, request.height, request.width))}
    else:
        rows, _, height, width = request.x_T.shape
        pixels = result.pixels if isinstance(request, Edit) else result
        expected = {"pixels": (pixels, (rows, 3, height * scale, width * scale))}
        if isinstance(request, Edit) and result.mask is not None:
            expected["mask"] = (result.mask, (1, 1, height, width))
    for name, (array, shape) in expected.items():
        if array.dtype != np.float32 or array.shape != shape:
            raise ValueError(f"it returned {name} of {array.dtype} {array.shape}, not float32 {shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"it returned {name} holding NaN or inf")


class FallbackRunner:
    """A server's runner that turns into an in-process one (opened then) when the server goes away; the
    request that found it gone is run again here, so no item of the batch is lost."""

    def __init__(self, remote: RemoteRunner, open_local: Callable[[], LocalRunner]):
        self.remote, self._open_local = remote, open_local
        self.current: Runner = remote

    def __getattr__(self, name: str):
        """The facts a job records (manifest, backend, dtype, size multiple): the current runner's."""
        return getattr(self.current, name)

    def run(self, request: Request):
        if self.current is self.remote:
            try:
                return self.remote.run(request)
            except ServerGone as err:
                log.warning("the server at %s went away (%s): continuing in this process", self.remote.path, err)
                self.current = self._open_local()
        return self.current.run(request)
