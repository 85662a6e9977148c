"""Files the user gave or asked for: how outputs appear (whole, atomically) and what inputs may be.

Every writer of a user-visible file goes through `atomic_write`, so a crash or a signal never leaves a
half-written output under the final name.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from .errors import ICDError, OutputExistsError


def atomic_write(path: str | Path, write_fn: Callable[[Path], object], *, overwrite: bool = False) -> None:
    """Write through `write_fn(temporary_path)` then rename, so a crash never leaves a half-written output."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path.name} exists (use --overwrite to replace it)")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_fn(temporary)
        if temporary.is_dir():  # a folder (a model's base): replaced whole
            if path.exists():
                shutil.rmtree(path)
        else:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
        raise ICDError(f"{path.name}: cannot write ({reason})") from exc
    finally:
        with suppress(OSError):  # cleanup must not hide the real error
            shutil.rmtree(temporary) if temporary.is_dir() else temporary.unlink()
