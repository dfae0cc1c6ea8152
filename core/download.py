"""Get the COVID-19 Radiography Database from Kaggle: ``python -m core.data download``.

The download goes through ``kagglehub`` (imported only here, only when called) into a
staging folder beside the destination, the database folder is moved into place
(``data/COVID-19_Radiography_Dataset`` by default) and its layout and counts per class are
verified with :func:`core.data.discover`. Every failure (no network, credentials or consent
needed, disk full, a partial copy in the way) raises :class:`core.errors.DownloadError`
whose message says why and what to do; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import DEFAULT_DATA_DIR
from core.data import discover
from core.errors import DatasetError, DownloadError

log = logging.getLogger(__name__)

HANDLE = "tawsifurrahman/covid19-radiography-database"
DATASET_URL = "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database"
EXPECTED_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
# The counts published with the database (version 4); a copy that differs is reported, not
# refused, since Kaggle versions may add images.
PUBLISHED_COUNTS = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192,
                    "Viral Pneumonia": 1345}
CREDENTIALS_HELP = (
    "Sign in to Kaggle, open the dataset page once to accept its terms if it asks, create an "
    "API token (kaggle.com > Settings > API > Create New Token) and either set "
    "KAGGLE_USERNAME and KAGGLE_KEY or save the token as ~/.kaggle/kaggle.json; then run the "
    "command again."
)


@dataclass(frozen=True)
class Verified:
    """A dataset folder checked against the database's layout."""

    root: Path
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    downloaded: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _manual_help(dest: Path) -> str:
    return (f"Or download the archive from {DATASET_URL} on a connected machine, unzip it so "
            f"that {dest}/COVID/images/ exists, and run `python -m core.data download --dest "
            f"{dest}` again to verify it.")


def verify(root: str | Path) -> Verified:
    """The database's layout (``<Class>/images/*.png``) and its four classes under ``root``,
    with the images per class; counts that differ from the published ones become notes."""
    root = Path(root)
    ds = discover(root)  # raises DatasetError: missing folder, no classes, empty classes
    if ds.layout != "database":
        raise DatasetError(f"{root} is not laid out like the COVID-19 Radiography Database "
                           "(<Class>/images/*.png).")
    missing = [c for c in EXPECTED_CLASSES if c not in ds.classes]
    if missing:
        raise DatasetError(f"{root} lacks the class folder(s) {', '.join(missing)} of the "
                           f"COVID-19 Radiography Database (found {', '.join(ds.classes)}).")
    counts = ds.counts()
    notes = [f"{cls}: {n} images, the published database has {PUBLISHED_COUNTS[cls]}"
             for cls, n in counts.items()
             if cls in PUBLISHED_COUNTS and n != PUBLISHED_COUNTS[cls]]
    extra = [c for c in ds.classes if c not in EXPECTED_CLASSES]
    if extra:
        notes.append(f"extra class folder(s) not in the database: {', '.join(extra)}")
    return Verified(root=root, counts=counts, notes=notes)


def find_dataset_root(folder: Path, max_depth: int = 3) -> Path | None:
    """``folder`` or the first folder below it (breadth first, at most ``max_depth`` levels)
    that holds the database's class folders (``<Class>/images/``)."""
    queue: deque[tuple[Path, int]] = deque([(folder, 0)])
    while queue:
        here, depth = queue.popleft()
        subdirs = sorted(d for d in here.iterdir() if d.is_dir())
        if any(d.name in EXPECTED_CLASSES and (d / "images").is_dir() for d in subdirs):
            return here
        if depth < max_depth:
            queue.extend((d, depth + 1) for d in subdirs)
    return None


def _import_kagglehub() -> Any:
    try:
        import kagglehub
    except ImportError as exc:
        raise DownloadError("The download needs the kagglehub package: `pip install -r "
                            "requirements.txt` (or `pip install kagglehub`).") from exc
    return kagglehub


def _kaggle_errors(kagglehub: Any) -> tuple[type[BaseException], ...]:
    """kagglehub's own exception types that do not derive from OSError (credentials,
    backend answers, corrupt archives); empty where the module does not define them."""
    module = getattr(kagglehub, "exceptions", None)
    names = ("CredentialError", "UnauthenticatedError", "BackendError", "NotFoundError",
             "DataCorruptionError", "KaggleEnvironmentError")
    return tuple(t for t in (getattr(module, n, None) for n in names)
                 if isinstance(t, type) and issubclass(t, BaseException))


def explain(exc: BaseException, dest: Path) -> str:
    """Why a kagglehub download failed and what to do, from the exception it raised."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    name = type(exc).__name__
    if status in (401, 403) or name in ("CredentialError", "UnauthenticatedError"):
        return (f"Kaggle refused the download of {HANDLE}"
                f"{f' (HTTP {status})' if status else ''}: this dataset needs a signed-in "
                f"Kaggle account that has accepted its terms. {CREDENTIALS_HELP} "
                f"{_manual_help(dest)}")
    if status == 404 or name == "NotFoundError":
        return (f"Kaggle has no dataset {HANDLE} (HTTP 404): check the handle at {DATASET_URL}. "
                f"{_manual_help(dest)}")
    if status is not None:
        return (f"Kaggle answered HTTP {status} for {HANDLE} ({exc}). Try again later. "
                f"{_manual_help(dest)}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"The disk holding {dest.parent} is full: the database needs about 1 GB free "
                "(twice that while it unpacks). Free some space or pass another --dest.")
    if isinstance(exc, OSError):  # requests' ConnectionError and Timeout are OSErrors
        return (f"Could not reach Kaggle to download {HANDLE}: no network connection? "
                f"({name}: {exc}). Connect this machine to the internet and run the command "
                f"again. {_manual_help(dest)}")
    return f"The Kaggle download of {HANDLE} failed ({name}: {exc}). {_manual_help(dest)}"


def download(dest: str | Path = DEFAULT_DATA_DIR, handle: str = HANDLE) -> Verified:
    """Download the database into ``dest`` and verify it; a ``dest`` that already holds a
    complete copy is verified and kept (no download)."""
    dest = Path(dest)
    if dest.exists():
        try:
            found = verify(dest)
        except DatasetError as exc:
            raise DownloadError(f"{dest} already exists but is not a complete copy of the "
                                f"database ({exc}). Move it away, or pass another --dest.") from exc
        log.info("%s already holds the database: nothing to download", dest)
        return found
    kagglehub = _import_kagglehub()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.download"
    shutil.rmtree(staging, ignore_errors=True)  # a previous attempt's leftovers
    log.info("Downloading %s from Kaggle into %s (about 800 MB)...", handle, staging)
    try:
        fetched = Path(kagglehub.dataset_download(handle, output_dir=str(staging)))
        root = find_dataset_root(fetched)
        if root is None:
            raise DownloadError(f"The download from {DATASET_URL} holds no COVID/images/ "
                                f"folder (in {fetched}): the dataset's layout changed? "
                                f"{_manual_help(dest)}")
        root.rename(dest)
    except (OSError, *_kaggle_errors(kagglehub)) as exc:
        raise DownloadError(explain(exc, dest)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        found = verify(dest)
    except DatasetError as exc:
        raise DownloadError(f"The downloaded copy in {dest} is incomplete: {exc} Delete it "
                            "and run the command again.") from exc
    return Verified(root=found.root, counts=found.counts, notes=found.notes, downloaded=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core.data",
                                 description="Dataset tools of CXR Insight.")
    sub = ap.add_subparsers(dest="command", required=True)
    dl = sub.add_parser(
        "download", help="download the COVID-19 Radiography Database from Kaggle",
        description=f"Download the COVID-19 Radiography Database ({DATASET_URL}) with "
        "kagglehub, then verify its layout and count the images per class. No account is "
        "needed where Kaggle serves it anonymously; otherwise: " + CREDENTIALS_HELP,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dl.add_argument("--dest", default=DEFAULT_DATA_DIR,
                    help="where the database folder goes (train with --data-dir DEST)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        found = download(args.dest)
    except (DownloadError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    lines = [f"  {cls:<16} {n:>6}" for cls, n in found.counts.items()]
    log.info("%s the COVID-19 Radiography Database in %s: %d images\n%s",
             "Downloaded" if found.downloaded else "Verified", found.root, found.total,
             "\n".join(lines))
    for note in found.notes:
        log.warning("%s", note)
    log.info("Train on it: python -m core.train --data-dir %s --output models/<run>", found.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
