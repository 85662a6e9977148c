"""`icd serve` against clients and servers that misbehave: a client that stops reading holds nobody but
itself, garbage gets an error reply and the connection goes on, a job after a hello that did not match is
refused at once, running out of descriptors or connections does not end the server; a client gives up on a
silent server and never uses a result that is not what it asked for.

The server runs in this process over a stand-in model that answers at once (the scheduler and the front end
are what is tested), its connections on socket pairs."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from icd.app.requests import Edit, Generate, Invert, Reconstruct
from icd.app.serve import client, front
from icd.app.serve.client import FallbackRunner, RemoteRunner, ServerGone
from icd.app.serve.wire import LENGTH, receive, send
from icd.editing import EditPlan

FINGERPRINT = "0123456789abcdef"
HELLO = {"op": "hello", "fingerprint": FINGERPRINT, "device": "cpu", "dtype": "fp32", "backend": "auto"}


class StandIn:
    """A model that answers every request at once: zeros of the shape the request asks for."""

    manifest = SimpleNamespace(fingerprint=FINGERPRINT)
    backend, dtype, size_multiple = "torch", "fp32", 8
    session = SimpleNamespace(model=SimpleNamespace(device="cpu"))

    def run_batch(self, requests):
        return [self.run(request) for request in requests]

    def run(self, request):
        if isinstance(request, Invert):
            rows, _, height, width = request.pixels.shape
            return np.zeros((rows, 4, height // 8, width // 8), np.float32)
        if isinstance(request, Generate):
            return np.zeros((1, 3, request.height, request.width), np.float32)
        rows, _, height, width = request.x_T.shape
        return np.zeros((rows, 3, height * 8, width * 8), np.float32)


@pytest.fixture
def serving(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "SEND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(front, "HEARTBEAT_S", 0.1)
    server = front.Server(StandIn(), "stand-in", False, tmp_path / "unused.sock")
    server.scheduler.start()
    yield server
    server.scheduler.stop()


def connect(server: front.Server) -> socket.socket:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=server.handle, args=(ours,), daemon=True).start()
    theirs.settimeout(10)
    return theirs


def ask(conn: socket.socket, header: dict, arrays: dict | None = None) -> tuple[dict, dict]:
    """One request and its reply, the server's heartbeats skipped."""
    send(conn, header, arrays)
    reply = receive(conn)
    while reply[0].get("working"):
        reply = receive(conn)
    return reply


def test_a_client_that_stops_reading_holds_nobody_but_itself(serving):
    stalled = connect(serving)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    send(stalled, *Reconstruct(np.zeros((1, 4, 128, 128), np.float32), "a cat").encode())  # a 12 MB reply
    started = time.monotonic()
    other = connect(serving)
    header, arrays = ask(other, *Generate("a dog", 1, 64, 64, 7.0, 1.0).encode())
    assert "error" not in header and arrays["pixels"].shape == (1, 3, 64, 64)
    assert time.monotonic() - started < 5  # it did not wait for the stalled client
    time.sleep(1.5)  # past the send timeout: the server has dropped the stalled client
    received = 0
    with pytest.raises((ConnectionError, OSError, EOFError)):
        while chunk := stalled.recv(1 << 20):
            received += len(chunk)
        raise EOFError
    assert received < 12 * 2**20  # it never got the whole reply
    assert serving.scheduler.status()[0]["busy"] is False


@pytest.mark.parametrize("frame, why", [
    ((b"{not json", b""), "malformed message: the header is not JSON"),
    ((b"[1, 2]", b""), "malformed message: the header is not a JSON object"),
    ((b'{"op": "invert"}', b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"), "malformed message: the arrays are not"),
    ((b'{"op": ["invert"]}', b""), "malformed request (TypeError"),
    ((b'{"op": "reconstruct", "prompt": "a"}', b""), "malformed request (TypeError"),
])
def test_garbage_gets_an_error_reply_and_the_connection_goes_on(serving, caplog, frame, why):
    conn = connect(serving)
    header, blob = frame
    with caplog.at_level(logging.INFO, logger="icd"):
        conn.sendall(LENGTH.pack(len(header)) + header + LENGTH.pack(len(blob)) + blob)
        reply, arrays = receive(conn)
    assert reply["error"].startswith(why) and arrays == {}
    assert sum("was answered with an error" in record.getMessage() for record in caplog.records) == 1
    facts, _ = ask(conn, HELLO)  # the same connection still works
    assert facts["mismatch"] is None


def test_a_job_after_a_hello_that_did_not_match_is_refused_at_once(serving):
    conn = connect(serving)
    facts, _ = ask(conn, {**HELLO, "dtype": "bf16"})
    assert facts["mismatch"] == "it runs on cpu, fp32"
    reply, _ = ask(conn, *Generate("a dog", 1, 64, 64, 7.0, 1.0).encode())
    assert reply == {"error": "this server cannot run it: it runs on cpu, fp32"}


def test_no_descriptor_left_delays_the_next_accept_and_the_server_goes_on(serving, caplog):
    class Exhausted:
        def accept(self):
            raise OSError(errno.EMFILE, "Too many open files")

    with caplog.at_level(logging.WARNING, logger="icd"):
        serving._accept(Exhausted())
    assert caplog.messages == ["cannot accept a connection (Too many open files): retrying"]


def test_connections_beyond_the_cap_are_told_the_server_is_busy(serving, monkeypatch):
    monkeypatch.setattr(serving, "connections", threading.BoundedSemaphore(1))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(serving.path))
    listener.listen(4)
    first, second = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2))
    for conn in (first, second):
        conn.connect(str(serving.path))
        conn.settimeout(10)
        serving._accept(listener)
    assert receive(second) == ({"error": "busy: 256 connections are open"}, {})
    facts, _ = ask(first, HELLO)  # the first is served as usual
    assert facts["mismatch"] is None
    for conn in (first, second, listener):
        conn.close()


def remote(conn: socket.socket, tmp_path) -> RemoteRunner:
    conn.settimeout(client.SILENCE_S)
    return RemoteRunner(conn, {"backend": "torch", "dtype": "fp32", "size_multiple": 8}, None, tmp_path / "x.sock")


def test_a_silent_server_is_given_up_and_the_job_runs_here(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "SILENCE_S", 0.5)
    near, far = socket.socketpair()  # the far end reads the request and then says nothing, as a suspended server
    threading.Thread(target=lambda: receive(far), daemon=True).start()
    local = StandIn()
    runner = FallbackRunner(remote(near, tmp_path), lambda: local)
    started = time.monotonic()
    result = runner.run(Generate("a dog", 1, 64, 64, 7.0, 1.0))
    assert result.shape == (1, 3, 64, 64) and runner.current is local
    assert 0.5 <= time.monotonic() - started < 5
    far.close()


@pytest.mark.parametrize("returned, why", [
    (np.full((1, 3, 8, 8), 0.5, np.float32), "it returned pixels of float32 (1, 3, 8, 8), not float32 (1, 3, 64, 64)"),
    (np.full((1, 3, 64, 64), np.nan, np.float32), "it returned pixels holding NaN or inf"),
    (np.zeros((1, 3, 64, 64), np.float64), "it returned pixels of float64"),
])
def test_a_result_that_is_not_what_was_asked_for_is_never_used(tmp_path, returned, why):
    near, far = socket.socketpair()

    def answer():
        receive(far)
        send(far, {}, {"pixels": returned})

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(ServerGone, match=why.replace("(", r"\(").replace(")", r"\)")):
        remote(near, tmp_path).run(Reconstruct(np.zeros((1, 4, 8, 8), np.float32), "a cat"))
    far.close()


def test_an_edit_result_is_checked_with_its_mask(tmp_path):
    near, far = socket.socketpair()
    plan = EditPlan("a cat", "a dog", "none", 7.0, 0.8)

    def answer():
        receive(far)
        send(far, {"notes": []}, {"pixels": np.zeros((1, 3, 64, 64), np.float32),
                                  "mask": np.zeros((1, 1, 4, 4), np.float32)})

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(ServerGone, match=r"it returned mask of float32 \(1, 1, 4, 4\), not float32 \(1, 1, 8, 8\)"):
        remote(near, tmp_path).run(Edit(np.zeros((1, 4, 8, 8), np.float32), plan))
    far.close()
