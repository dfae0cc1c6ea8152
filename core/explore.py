"""What the Data Explorer shows of a run's dataset (no Streamlit here).

Everything is read from the run folder: ``dataset.json`` (written at training, see
``docs/ARCHITECTURE.md``) and, where that is absent (older runs), the split manifest
``manifest.csv``. The images themselves are read only for the parts that need pixels
(sample grid, intensity histograms, image sizes per class) and only when the run's data
folder is on this machine (:func:`images_available`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from core.data import SPLITS, dataset_summary, load_manifest
from core.errors import DatasetError, InvalidImageError
from core.preprocess import load_gray, to_gray, to_uint8

log = logging.getLogger(__name__)

DATABASE_URL = "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database"
HIST_BINS = 32


def data_dir_of(run: Any) -> Path | None:
    """The folder a run was trained on (``RunArtifacts.data_dir``), None when none says."""
    return Path(run.data_dir) if run.data_dir else None


def manifest_frame(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's ``manifest.csv`` (path, class, split, sha1, phash, dup_group) or None."""
    path = Path(run_dir) / "manifest.csv"
    if not path.is_file():
        return None
    try:
        manifest = load_manifest(path, Path(run_dir))
    except (OSError, DatasetError) as exc:
        log.warning("Unreadable manifest %s: %s", path, exc)
        return None
    return pd.DataFrame(manifest.rows)


def images_available(data_dir: Path | None, paths: Sequence[str], probe: int = 5) -> bool:
    """True when the data folder exists and the first ``probe`` listed images are in it."""
    if data_dir is None or not data_dir.is_dir() or not paths:
        return False
    return all((data_dir / p).is_file() for p in list(paths)[:probe])


def missing_images_text(data_dir: Path | None) -> str:
    """What to tell a user whose machine lacks the run's images, and how to get them."""
    where = f"`{data_dir}`" if data_dir else "the run's data folder (config.json names none)"
    return (f"The images of this run are not on this machine (looked in {where}). Download the "
            f"[COVID-19 Radiography Database]({DATABASE_URL}) with `python -m core.data "
            "download` (or **Download the database** on the **Training** page) and move it "
            "there, or copy the training machine's data folder to that path. Everything else "
            "on this page comes from the run's own files and is shown anyway.")


def dataset_record(run: Any) -> dict[str, Any] | None:
    """The run's ``dataset.json`` record; for older runs without one, the same record built
    from ``manifest.csv`` (``core.data.dataset_summary``: image sizes and bit depths only
    where the images are on this machine; sources from the evaluation report). None when
    the run has neither."""
    if run.dataset:
        return dict(run.dataset)
    path = Path(run.path) / "manifest.csv"
    if not path.is_file():
        return None
    try:
        manifest = load_manifest(path, data_dir_of(run) or Path(run.path))
    except (OSError, DatasetError) as exc:
        log.warning("Unreadable manifest %s: %s", path, exc)
        return None
    return dataset_summary(manifest, (run.report or {}).get("sources"))


def class_counts(record: Mapping[str, Any] | None, classes: Sequence[str] = ()) -> pd.DataFrame:
    """Images per split and class from a :func:`dataset_record`, columns ``split, class, n``
    (splits in train, val, test order; ``classes`` fixes the class order)."""
    counts: Mapping[str, Mapping[str, int]] = (record or {}).get("counts") or {}
    classes = list(classes) or sorted({c for v in counts.values() for c in v})
    rows = [{"split": s, "class": c, "n": int(counts[s].get(c, 0))}
            for s in SPLITS if s in counts for c in classes]
    return pd.DataFrame(rows, columns=["split", "class", "n"])


def sources(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A :func:`dataset_record`'s image sources (``{available, reason, per_class: {class:
    {source: n}}}``) plus ``confounded``: no source contributes images to more than one
    class."""
    src = dict((record or {}).get("sources") or {})
    per_class = {c: dict(v) for c, v in (src.get("per_class") or {}).items()}
    seen: dict[str, int] = {}
    for counts in per_class.values():
        for s in counts:
            seen[s] = seen.get(s, 0) + 1
    return {"available": bool(src.get("available")) and bool(per_class),
            "reason": src.get("reason") or "this run records no image sources",
            "per_class": per_class, "confounded": bool(seen) and max(seen.values()) == 1}


def sources_frame(per_class: Mapping[str, Mapping[str, int]]) -> pd.DataFrame:
    """:func:`sources`' ``per_class`` as rows ``class, source, n``."""
    return pd.DataFrame([{"class": c, "source": s, "n": n}
                         for c, counts in per_class.items() for s, n in counts.items()],
                        columns=["class", "source", "n"])


def sample_paths(manifest: pd.DataFrame, per_class: int = 4, seed: int = 0) -> dict[str, list[str]]:
    """A reproducible random sample of ``per_class`` image paths per class (any split)."""
    out: dict[str, list[str]] = {}
    for cls, group in manifest.groupby("class", sort=True):
        n = min(per_class, len(group))
        out[str(cls)] = group.sample(n=n, random_state=seed)["path"].tolist()
    return out


def thumbnail(path: str | Path, size: int = 192) -> np.ndarray:
    """A dataset image as uint8 grayscale whose longer side is at most ``size`` pixels.

    Raises :class:`~core.errors.InvalidImageError` for a missing or unreadable file."""
    try:
        with Image.open(path) as img:
            img.draft("L", (size, size))  # JPEG: decode at a reduced scale
            img.thumbnail((size, size))
            return to_uint8(to_gray(img))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"Cannot read {Path(path).name}: {exc}") from exc


def intensity_histograms(data_dir: Path, paths_by_class: Mapping[str, Sequence[str]],
                         bins: int = HIST_BINS) -> pd.DataFrame:
    """Pixel-intensity distribution per class: for each class the share of all its sampled
    images' pixels in each of ``bins`` equal bins of the grayscale [0, 1] (as the
    preprocessing contract reads them, before resizing and CLAHE). Columns
    ``class, intensity`` (the bin centre), ``share``; unreadable images are skipped."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    rows = []
    for cls, paths in paths_by_class.items():
        hist = np.zeros(bins, np.float64)
        for p in paths:
            try:
                gray = load_gray(data_dir / p)
            except InvalidImageError as exc:
                log.warning("Skipped in the histogram: %s", exc)
                continue
            hist += np.histogram(gray, bins=edges)[0]
        if hist.sum() > 0:
            share = hist / hist.sum()
            rows.extend({"class": cls, "intensity": float(c), "share": float(v)}
                        for c, v in zip(centres, share, strict=True))
    return pd.DataFrame(rows, columns=["class", "intensity", "share"])


def image_sizes(data_dir: Path | None, paths_by_class: Mapping[str, Sequence[str]] | None,
                dataset: Mapping[str, Any] | None) -> pd.DataFrame:
    """Image sizes (``WxH``), columns ``size, class, n``: per class from the images' headers
    (no pixels decoded) when ``data_dir`` and ``paths_by_class`` are given, else all classes
    together (``class`` = "all") from ``dataset.json``'s ``image_sizes``."""
    rows: list[dict[str, Any]] = []
    if data_dir is not None and paths_by_class:
        for cls, paths in paths_by_class.items():
            found: dict[str, int] = {}
            for p in paths:
                try:
                    with Image.open(data_dir / p) as img:
                        key = f"{img.size[0]}x{img.size[1]}"
                except (OSError, UnidentifiedImageError) as exc:
                    log.warning("Skipped in the size count: %s", exc)
                    continue
                found[key] = found.get(key, 0) + 1
            rows.extend({"size": k, "class": cls, "n": n} for k, n in found.items())
    elif dataset and dataset.get("image_sizes"):
        rows = [{"size": k, "class": "all", "n": int(n)} for k, n in dataset["image_sizes"].items()]
    df = pd.DataFrame(rows, columns=["size", "class", "n"])
    return df.sort_values(["n", "size"], ascending=[False, True], ignore_index=True)
