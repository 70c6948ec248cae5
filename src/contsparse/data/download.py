"""Downloads with checksums, and where datasets are kept."""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from contsparse.errors import UserError
from contsparse.storage import file_digest


def data_root() -> Path:
    """``$CONTSPARSE_DATA``, else ``~/.cache/contsparse``."""
    return Path(os.environ.get("CONTSPARSE_DATA", Path.home() / ".cache" / "contsparse"))


MISSING_DATA_DIR_FIX = ("create it, drop --data-dir to use the cache, or (a resumed run whose data moved) give "
                        "its new place with resume --data-dir")


def require_data_dir(directory: Path, fix: str = MISSING_DATA_DIR_FIX) -> None:
    """Refuse a ``--data-dir`` that is not a folder, saying which way it is wrong."""
    if directory.is_file():
        raise UserError(f"data directory {directory} is a file; give the folder that holds the dataset files")
    if not directory.is_dir():
        raise UserError(f"data directory {directory} does not exist; {fix}")


def fetch_verified(name: str, md5: str, target: Path, mirrors: tuple[str, ...]) -> bool:
    """Download ``name`` from the first mirror that serves it with the right MD5 into ``target``;
    False when no mirror can be reached (offline). A partial or wrong download never takes
    ``target``'s place, and when a mirror answered but did not deliver (an HTTP error, a transfer
    cut short, other bytes), the error names each such mirror and why: being told to go online
    would not help. Each call downloads into a file of its own, so the points of a sweep fetching
    the same dataset at once do not write into one another's download."""
    target.parent.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []  # "url: why", for mirrors that answered
    for mirror in mirrors:
        if _verified(target, md5):  # another process finished the same download meanwhile
            return True
        handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        partial = Path(partial_name)
        url = mirror + name
        try:
            with os.fdopen(handle, "wb") as out:
                failure = _download(url, out, partial)
            if failure is _UNREACHABLE:
                continue
            if failure:
                failed.append(f"{url}: {failure}")
                continue
            digest = file_digest(partial, "md5")
            if digest == md5:
                partial.replace(target)
                return True
            failed.append(f"{url}: served md5 {digest}, expected {md5} (a proxy's error page, or a changed file?)")
        finally:
            partial.unlink(missing_ok=True)
    if _verified(target, md5):
        return True
    if failed:
        raise UserError(f"cannot download {name}: {'; '.join(failed)}; put the verified file into "
                        f"{target.parent} yourself")
    return False


_UNREACHABLE = "unreachable"


def _download(url: str, out: BinaryIO, partial: Path) -> str | None:
    """Copy ``url`` into ``out``: None when done, ``_UNREACHABLE`` when no server answers
    (offline), else why the server's answer is not the file (an HTTP error, a transfer that broke
    off or stalled). A one-line error if the file cannot be written here (a full disk, say)."""
    try:
        response = urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError, TimeoutError):
        return _UNREACHABLE
    with response:
        expected, received = response.headers.get("Content-Length"), 0
        while True:
            try:
                chunk = response.read(1 << 20)
            except (OSError, TimeoutError, http.client.HTTPException) as err:
                return f"the transfer broke off after {received:,} bytes ({type(err).__name__}: {err})"
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as err:
                raise UserError(f"cannot write the download {partial}: {err.strerror or err}") from None
            received += len(chunk)
    if expected is not None and expected.isdigit() and received != int(expected):
        return f"the transfer ended after {received:,} of {int(expected):,} bytes"
    return None


def _verified(path: Path, md5: str) -> bool:
    try:
        return path.is_file() and file_digest(path, "md5") == md5
    except OSError:
        return False
