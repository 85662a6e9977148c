"""Files the user gave or asked for. Every writer of a user-visible file goes through `atomic_write` (a crash
never leaves a half-written output under the final name, nor replaces a file it was not allowed to), every
reader of an input through `open_regular` (a FIFO, a device or a folder is refused at once, never hangs)."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from .errors import ICDError, InputError, OutputExistsError

# `.NAME.<pid>-<hex>.tmp`: the writer's pid lets a later run tell an abandoned temporary from a live one.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)-[0-9a-f]+\.tmp")
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
# File systems without hard links (FAT on a USB stick, some network shares) answer os.link with these.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
_UMASK_LOCK = threading.Lock()


def open_regular(path: str | Path, *, follow_symlinks: bool = True) -> BinaryIO:
    """The input opened for binary reading if it is a regular file, else one InputError. The kind is checked
    before the open (a device is never opened, a FIFO cannot hang the non-blocking open) and after it (the path
    may have changed). With `follow_symlinks` False a link is refused (a cache's files must not lead outside)."""
    path = Path(path)
    name = path.name
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        _refuse_unless_regular(name, (os.stat if follow_symlinks else os.lstat)(path).st_mode)
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot open ({exc.strerror})") from None
    try:
        _refuse_unless_regular(name, os.fstat(descriptor).st_mode)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def real_path(path: str | Path) -> Path:
    """The absolute path with its symlinks resolved as far as they resolve. Unlike Path.resolve, a symlink loop
    is no exception here: the path comes back as it is, and fails as its own item when it is opened."""
    return Path(os.path.realpath(path))


def _refuse_unless_regular(name: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((kind for is_kind, kind in _KINDS if is_kind(mode)), "an unknown kind of file")
    raise InputError(f"{name}: not a regular file ({kind})")


def atomic_write(path: str | Path, write_fn: Callable[[Path], object], *, overwrite: bool = False) -> None:
    """Write through `write_fn(temporary_path)`, then put the result under `path` in one step; without
    `overwrite` that step claims the name atomically (a file that appeared meanwhile is kept: OutputExistsError).
    The output gets the modes a plain creation would give under the umask, whatever `write_fn` used."""
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise _exists_error(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_path(path)
        write_fn(temporary)
        _follow_umask(temporary)
        if temporary.is_dir():
            _move_folder(temporary, path, overwrite)
        else:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
            _move_file(temporary, path, overwrite)
        _sync_folder(path.parent)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
        raise ICDError(f"{path.name}: cannot write ({reason})") from exc
    finally:
        with suppress(OSError):  # cleanup must not hide the real error
            if temporary is not None:
                shutil.rmtree(temporary) if temporary.is_dir() else temporary.unlink()


def update_with_ends(digest, file: BinaryIO, size: int, span: int = 1 << 20):
    """`digest` fed the first and last `span` bytes of `file` (`size` bytes, read from its start): what tells
    two big weight files apart without reading them whole."""
    digest.update(file.read(span))
    file.seek(max(0, size - span))
    digest.update(file.read(span))
    return digest


def temporary_path(path: Path) -> Path:
    """A fresh temporary name beside `path`, `.NAME.<pid>-<hex>.tmp` (what `sweep_temporaries` recognises), NAME
    shortened to fit the file system's limit on a name's bytes: a legal output name must not fail for it."""
    tail = f".{os.getpid()}-{secrets.token_hex(4)}.tmp"
    name = os.fsencode(path.name)
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255  # the file system does not say
    room = name_max - 1 - len(tail)
    if len(name) > room:
        while room > 1 and name[room] & 0xC0 == 0x80:  # cut between UTF-8 characters, not inside one
            room -= 1
        name = name[:room]
    return path.with_name(os.fsdecode(b"." + name) + tail)


def _exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path.name} exists (use --overwrite to replace it)")


def _move_file(temporary: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # fails, rather than replaces, when the name was taken meanwhile
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        _claim_then_replace(temporary, path, lambda: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)))


def _move_folder(temporary: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(temporary, path)
    else:
        _claim_then_replace(temporary, path, lambda: os.mkdir(path))


def _claim_then_replace(temporary: Path, path: Path, claim: Callable[[], object]) -> None:
    """Create an empty placeholder at `path` exclusively (the atomic claim), then move the result over it."""
    try:
        claim()
    except FileExistsError:
        raise _exists_error(path) from None
    try:
        os.replace(temporary, path)
    except OSError:
        with suppress(OSError):  # give the name back, unless someone wrote into the placeholder meanwhile
            if path.is_dir():
                os.rmdir(path)  # refuses a folder that is not empty
            elif path.stat().st_size == 0:
                path.unlink()
        raise


def _follow_umask(temporary: Path) -> None:
    """Give the temporary (and everything in it) the modes a normal creation would, 0o666 or 0o777 less the
    umask: some writers create 0600 files (safetensors does, through its own temporary files)."""
    with _UMASK_LOCK:  # reading the umask means setting it: under a lock, with a harmless value meanwhile
        umask = os.umask(0o022)
        os.umask(umask)
    entries = [temporary]
    if temporary.is_dir() and not temporary.is_symlink():
        for folder, folders, files in os.walk(temporary):
            entries += [Path(folder, name) for name in folders + files]
    for entry in entries:
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        os.chmod(entry, full & ~umask)


def _sync_folder(folder: Path) -> None:
    """Make the new name itself durable; some file systems cannot sync a folder, which costs nothing then."""
    with suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def sweep_temporaries(folder: str | Path) -> int:
    """Remove the temporaries that writers which have since died left in `folder`; returns how many. Only
    `.NAME.<pid>-<hex>.tmp` entries whose pid is no live process go, not another user's nor anything else."""
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or _is_live(int(match["pid"])):
            continue
        with suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed += 1
    return removed


def _is_live(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or a number no pid can be
        return True
    return True
