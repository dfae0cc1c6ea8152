"""File primitives shared by the run writers: content hashes, atomic writes and the user's
data folder (no torch, nothing heavy: the predictor imports it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

APP_NAME = "cxr-insight"


def data_dir() -> Path:
    """The user's data folder for CXR Insight (``CXR_DATA_HOME`` overrides it): the audit
    log's database and spool, and the cache of graphs exported on first use."""
    override = os.environ.get("CXR_DATA_HOME")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_path

    return user_data_path(APP_NAME, appauthor=False)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; on success it replaces ``path``
    (``os.replace``), so a reader sees the old file or the new one, never half of one. On an
    error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as JSON atomically; NaN is an error, not invalid JSON."""
    write_bytes_atomic(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
