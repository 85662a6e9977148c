"""The `icd serve` protocol on a stream socket: each message is a JSON header and a safetensors blob of numpy
arrays, each prefixed by its length (8 bytes, big-endian). Never pickle: a message is data, not code."""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

LENGTH = struct.Struct(">Q")
MAX_HEADER = 1 << 20  # bytes of JSON: far more than any request needs
MAX_TENSORS = 1 << 34  # bytes of tensors: 16 GiB, beyond any latent or picture


class Disconnected(ConnectionError):
    """The other end closed the connection, or broke the framing: the stream cannot go on."""


class Malformed(ValueError):
    """A whole message whose header or arrays cannot be read: answered with an error, the stream goes on."""


def send(sock: socket.socket, header: dict, tensors: dict[str, np.ndarray] | None = None) -> None:
    body = json.dumps(header).encode()
    blob = save_tensors({name: np.ascontiguousarray(a) for name, a in tensors.items()}) if tensors else b""
    sock.sendall(LENGTH.pack(len(body)) + body + LENGTH.pack(len(blob)))
    if blob:
        sock.sendall(blob)


def receive(sock: socket.socket) -> tuple[dict, dict[str, np.ndarray]]:
    """The next whole message; `Malformed` when its parts are not a JSON object and safetensors arrays."""
    body = _exactly(sock, _length(sock, MAX_HEADER))
    size = _length(sock, MAX_TENSORS)
    blob = _exactly(sock, size) if size else b""
    try:
        header = json.loads(body)
    except (ValueError, RecursionError):
        raise Malformed("the header is not JSON") from None
    if not isinstance(header, dict):
        raise Malformed("the header is not a JSON object")
    try:
        return header, (load_tensors(blob) if blob else {})
    except Exception:  # safetensors raises its own error types on a blob that is not its format
        raise Malformed("the arrays are not a safetensors blob") from None


def _length(sock: socket.socket, limit: int) -> int:
    (size,) = LENGTH.unpack(_exactly(sock, LENGTH.size))
    if size > limit:
        raise Disconnected(f"a message part of {size} bytes is over the limit of {limit}")
    return size


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise Disconnected("the connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
