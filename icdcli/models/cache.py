"""The local cache ($ICD_HOME) and resumable downloads into it.

Downloads resume with Range requests and every final file appears atomically: an interrupted download never
leaves something that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import ModelError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


def icd_home() -> Path:
    """The cache root: $ICD_HOME, else $XDG_CACHE_HOME/icd, else ~/.cache/icd."""
    if os.environ.get("ICD_HOME"):
        return Path(os.environ["ICD_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "icd"
    return Path.home() / ".cache" / "icd"


def _offline_var() -> str | None:
    """The first offline switch that is set truthy, read now so tests and users can flip it."""
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUTHY), None)


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = 30) -> Path:
    """Fetch `url` to `dest`, resuming a previous `.part`; `dest` only ever appears complete."""
    dest = Path(dest)
    if dest.exists():
        return dest
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
        raise ModelError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    if expected is not None and part.stat().st_size != expected:
        raise ModelError(f"cannot download {url}: connection closed early; run again to resume")
    os.replace(part, dest)
    return dest


def cached_download(url: str, *, progress: bool = True) -> Path:
    """A weights file a manifest names by URL, fetched once into the cache (one folder per URL)."""
    folder = icd_home() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = folder / (posixpath.basename(urllib.parse.urlsplit(url).path) or "download")
    if not dest.exists() and (var := _offline_var()):
        raise ModelError(f"offline ({var} is set): {url} is not in the cache")
    return download(url, dest, progress=progress)
