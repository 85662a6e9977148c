"""The local cache ($ICD_HOME) and downloads into it, which resume (Range requests) and whose final files appear
atomically: an interrupted download never leaves something that looks complete."""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import stat
import sys
import urllib.error
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import ModelError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}
# Errors of the local disk (not of the network) while a download or a build writes into the cache.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST}

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent builds there are not guarded
    fcntl = None


def icd_home() -> Path:
    """The cache root: $ICD_HOME, else $XDG_CACHE_HOME/icd, else ~/.cache/icd."""
    if os.environ.get("ICD_HOME"):
        return Path(os.environ["ICD_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "icd"
    return Path.home() / ".cache" / "icd"


def cache_error(err: OSError) -> ModelError:
    """A failed write into the cache (a file where a folder should be, no permission, a full disk), in one line."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    return ModelError(f"cannot write to the icd cache ICD_HOME={icd_home()}: {reason}")


def is_disk_error(err: OSError) -> bool:
    """Whether an OSError came from the local disk (a path, a full disk, no permission), not the network."""
    return not isinstance(err, urllib.error.URLError) and (err.errno in _DISK_ERRNOS or bool(err.filename))


@contextmanager
def writing_cache() -> Iterator[None]:
    """Around code that writes into the cache: a disk error becomes `cache_error`'s one line."""
    try:
        yield
    except OSError as err:
        raise cache_error(err) from None


_HELD_LOCKS: set[Path] = set()


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock file (flock) between processes; taking it again inside the block is a no-op, so a
    locked build may call helpers that lock the same file."""
    path = Path(path)
    if path in _HELD_LOCKS or fcntl is None:
        yield
        return
    with writing_cache():
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _open_lock_file(path)
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD_LOCKS.add(path)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(path)


def _open_lock_file(path: Path):
    """The lock file, created if needed; anything but a regular file there (a FIFO would block the open, a link
    could lead outside the cache) is refused in one line."""
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise ModelError(f"{path} is not a regular file: remove it (icd keeps a lock file there)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o666), "a")


def _verdict_path(key: str) -> Path:
    return icd_home() / "checked" / key


def already_checked(key: str) -> bool:
    """Whether an expensive check of a model's files (named by `key`, with the model's fingerprint) passed."""
    return _verdict_path(key).is_file()


def remember_checked(key: str) -> None:
    """Record a passed check so later starts skip it; a cache that cannot be written only costs the check again."""
    with suppress(OSError):
        _verdict_path(key).parent.mkdir(parents=True, exist_ok=True)
        _verdict_path(key).touch()


def _offline_var() -> str | None:
    """The first offline switch that is set truthy, read now so tests and users can flip it."""
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUTHY), None)


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = 30) -> Path:
    """Fetch `url` to `dest`, resuming a previous `.part`; `dest` only ever appears complete."""
    import http.client  # the network stack and the bar: imported when a download happens, not at every start
    import urllib.request

    from tqdm import tqdm

    dest = Path(dest)
    if dest.exists():
        return dest
    with writing_cache():
        dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content_range = response.headers.get("Content-Range", "")
            if response.status != 206 or not content_range.startswith(f"bytes {offset}-"):
                offset = 0  # the server ignored the Range header: start over
            expected = offset + response.length if response.length is not None else None
            with open(part, "ab" if offset else "wb") as out, tqdm(
                    total=expected, initial=offset, desc=dest.name, unit="B", unit_scale=True,
                    unit_divisor=1024, file=sys.stderr, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            if e.headers.get("Content-Range", "") == f"bytes */{offset}":
                os.replace(part, dest)  # the .part already held the whole file
                return dest
            part.unlink()  # the .part does not fit what the server has: start over
            return download(url, dest, progress=progress, timeout=timeout)
        raise ModelError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if isinstance(e, OSError) and is_disk_error(e):
            raise cache_error(e) from None
        raise ModelError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    if expected is not None and part.stat().st_size != expected:
        raise ModelError(f"cannot download {url}: connection closed early; run again to resume")
    with writing_cache():
        os.replace(part, dest)
    return dest


def cached_download_path(url: str) -> Path:
    """Where a URL's file lives in the cache (one folder per URL, the URL's file name)."""
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    if name in ("", ".", ".."):
        raise ModelError(f"{url}: the URL names no file (its path must end in a file name)")
    return icd_home() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def cached_download(url: str, *, progress: bool = True) -> Path:
    """A weights file a manifest names by URL, fetched once into the cache."""
    dest = cached_download_path(url)
    if not dest.exists() and (var := _offline_var()):
        raise ModelError(f"offline ({var} is set): {url} is not in the cache")
    return download(url, dest, progress=progress)
