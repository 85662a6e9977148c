"""Where servers listen, and who may talk to them: the serve folder ($ICD_HOME/serve, its owner's only), the
socket of a model, device and dtype, its peer's user id, and whether a socket still has a server. Light
(no torch), so that every command can look for a server at no cost."""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

from icd.errors import ICDError, UsageError
from icd.models.cache import icd_home

log = logging.getLogger("icd")

SOCKET_SUFFIX = ".sock"
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108, with the terminating zero
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def serve_folder(make: bool = True) -> Path:
    """Where servers put their sockets: $ICD_HOME/serve, readable by its owner only (made so, unless not `make`)."""
    folder = icd_home() / "serve"
    if make:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    return folder


def socket_path(model_name: str, devices: Sequence[str], dtype: str) -> Path:
    from ..naming import slug

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


def sockets() -> list[Path]:
    """The socket files in the serve folder (none when it does not exist yet)."""
    folder = serve_folder(make=False)
    return sorted(folder.glob(f"*{SOCKET_SUFFIX}")) if folder.is_dir() else []


def is_alive(path: Path) -> bool:
    """Whether a process listens on the socket `path` (a stale file left by a killed server does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


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


def describe(facts: dict) -> str:
    """What a server serves, in one line."""
    devices = facts["devices"]
    where = devices[0] if len(devices) == 1 else f"{len(devices)} workers ({', '.join(devices)})"
    return f"serving {facts['model']} ({facts['fingerprint']}) on {where}, {facts['dtype']}, {facts['backend']}"


def describe_worker(number: int, worker: dict) -> str:
    """One worker of a server and what it has done, in one line."""
    jobs, batches = worker["jobs"], worker["batches"]
    state = "ended" if not worker["alive"] else "busy" if worker["busy"] else "idle"
    threads = worker.get("threads") if worker["alive"] else None  # none while loading; an ended one has none
    return (f"worker {number}: {worker['device']}, pid {worker['pid']}, {jobs} job{'s' * (jobs != 1)} in {batches} "
            f"batch{'es' * (batches != 1)}, {state}" + (f"; {threads} CPU thread{'s' * (threads != 1)}" if threads
                                                       else ""))
