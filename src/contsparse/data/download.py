"""Downloads with checksums, and where datasets are kept."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

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
    to go online would not help)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    wrong: list[str] = []  # mirror: md5 of what it served
    for mirror in mirrors:
        try:
            with urllib.request.urlopen(mirror + name, timeout=10) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, TimeoutError):
            continue
        digest = file_digest(partial, "md5")
        if digest == md5:
            partial.replace(target)
            return True
        wrong.append(f"{mirror}{name} (md5 {digest})")
        partial.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    if wrong:
        raise UserError(f"refused {'; '.join(wrong)}: expected md5 {md5} (a proxy's error page, or a changed "
                        f"file?); put the verified file into {target.parent} yourself")
    return False
