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


def require_data_dir(directory: Path, fix: str = "create it or drop --data-dir") -> None:
    """Refuse a ``--data-dir`` that is not a folder, saying which way it is wrong."""
    if directory.is_file():
        raise UserError(f"data directory {directory} is a file; give the folder that holds the dataset files")
    if not directory.is_dir():
        raise UserError(f"data directory {directory} does not exist; {fix}")


def fetch_verified(name: str, md5: str, target: Path, mirrors: tuple[str, ...]) -> bool:
    """Download ``name`` from the first mirror that serves it with the right MD5 into ``target``;
    False when no mirror answers (offline). A partial or wrong download never takes ``target``'s
    place, and when every mirror that answered served other bytes, the error says so (being told
    to go online would not help). Each call downloads into a file of its own, so the points of a
    sweep fetching the same dataset at once do not write into one another's download."""
    target.parent.mkdir(parents=True, exist_ok=True)
    wrong: list[str] = []  # mirror: md5 of what it served
    for mirror in mirrors:
        if _verified(target, md5):  # another process finished the same download meanwhile
            return True
        handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        partial = Path(partial_name)
        try:
            with os.fdopen(handle, "wb") as out:
                if not _download(mirror + name, out, partial):
                    continue
            digest = file_digest(partial, "md5")
            if digest == md5:
                partial.replace(target)
                return True
            wrong.append(f"{mirror}{name} (md5 {digest})")
        finally:
            partial.unlink(missing_ok=True)
    if _verified(target, md5):
        return True
    if wrong:
        raise UserError(f"refused {'; '.join(wrong)}: expected md5 {md5} (a proxy's error page, or a changed "
                        f"file?); put the verified file into {target.parent} yourself")
    return False


def _download(url: str, out: BinaryIO, partial: Path) -> bool:
    """Copy ``url`` into ``out``; False if the mirror cannot be reached or the transfer breaks off
    (network errors), a one-line error if the file cannot be written here (a full disk, say)."""
    try:
        response = urllib.request.urlopen(url, timeout=10)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False
    with response:
        expected, received = response.headers.get("Content-Length"), 0
        while True:
            try:
                chunk = response.read(1 << 20)
            except (OSError, TimeoutError, http.client.HTTPException):
                return False
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as err:
                raise UserError(f"cannot write the download {partial}: {err.strerror or err}") from None
            received += len(chunk)
    return expected is None or not expected.isdigit() or received == int(expected)


def _verified(path: Path, md5: str) -> bool:
    try:
        return path.is_file() and file_digest(path, "md5") == md5
    except OSError:
        return False
