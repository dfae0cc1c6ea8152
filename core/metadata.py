"""Image sources per class from the database's ``<Class>.metadata.xlsx`` spreadsheets.

Part of the data layer (no model): ``core.runs`` puts the sources in ``dataset.json`` and
the evaluation report joins them with its predictions (images and accuracy per source).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class ScoredImages(Protocol):
    """What :func:`source_report` reads of predictions (``core.scoring.Predictions``)."""

    paths: list[str]
    y_true: np.ndarray
    logits: np.ndarray
    classes: list[str]


def _column(df: Any, *names: str) -> str | None:
    norm = {re.sub(r"[^a-z]", "", str(c).lower()): c for c in df.columns}
    for n in names:
        if n in norm:
            return norm[n]
    return None


def source_report(data_dir: str | Path, classes: Sequence[str],
                  preds: ScoredImages | None = None) -> dict[str, Any]:
    """Image sources per class from ``<Class>.metadata.xlsx`` (grouped by URL/source).

    With ``preds`` also the evaluated images per source and the accuracy on them (joined
    on the file name). A bad or unreadable spreadsheet becomes ``available: false``
    with a reason; other errors (bugs) propagate.
    """
    root = Path(data_dir)
    files = {c: root / f"{c}.metadata.xlsx" for c in classes}
    files = {c: p for c, p in files.items() if p.is_file()}
    if not files:
        return {"available": False, "reason": f"no <Class>.metadata.xlsx files in {root}",
                "per_class": {}}
    try:
        import pandas as pd

        source_of: dict[str, str] = {}
        per_class: dict[str, Any] = {}
        for cls, path in files.items():
            df = pd.read_excel(path)
            src = _column(df, "url", "source", "sources")
            name = _column(df, "filename", "file", "name")
            if src is None:
                per_class[cls] = {"n_listed": len(df), "sources": [],
                                  "note": f"{path.name} has no URL/source column"}
                continue
            values = df[src].fillna("unknown").astype(str).str.strip()
            counts = values.value_counts()
            per_class[cls] = {"n_listed": len(df), "sources": [
                {"source": s, "count": int(n)} for s, n in counts.items()]}
            if name is not None:
                for f, s in zip(df[name].astype(str), values, strict=True):
                    source_of[Path(f.strip()).stem.lower()] = s
    except _spreadsheet_errors() as exc:  # a bad or unreadable spreadsheet: report, don't fail
        return {"available": False, "reason": f"cannot read metadata: {type(exc).__name__}: {exc}",
                "per_class": {}}
    out: dict[str, Any] = {"available": True, "reason": None, "per_class": per_class,
                           "confounded": _confounded(per_class)}
    if preds is not None and source_of:
        out["evaluated_by_source"] = _by_source(preds, source_of)
    return out


def _spreadsheet_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad ``metadata.xlsx`` raises: I/O, not a zip or truncated (zipfile,
    EOFError), broken XML inside (a SyntaxError), not a workbook (openpyxl), no Excel
    reader installed (ImportError), odd content (pandas' ValueError/KeyError). Programming
    errors (TypeError, AttributeError, ...) are not caught."""
    import zipfile

    errors: tuple[type[BaseException], ...] = (
        OSError, EOFError, zipfile.BadZipFile, SyntaxError, ImportError, ValueError, KeyError)
    try:
        from openpyxl.utils.exceptions import InvalidFileException
    except ImportError:
        return errors
    return (*errors, InvalidFileException)


def _confounded(per_class: dict[str, Any]) -> bool:
    """True when no source contributes images to more than one class."""
    seen: dict[str, int] = {}
    for entry in per_class.values():
        for s in {x["source"] for x in entry["sources"]}:
            seen[s] = seen.get(s, 0) + 1
    return bool(seen) and max(seen.values()) == 1


def _by_source(preds: ScoredImages, source_of: dict[str, str]) -> list[dict[str, Any]]:
    pred = preds.logits.argmax(1)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(preds.paths):
        groups.setdefault(source_of.get(Path(p).stem.lower(), "unknown"), []).append(i)
    rows = []
    for s, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ix = np.asarray(idx)
        rows.append({
            "source": s, "n": len(idx),
            "classes": {c: int((preds.y_true[ix] == j).sum()) for j, c in enumerate(preds.classes)
                        if (preds.y_true[ix] == j).any()},
            "accuracy": round(float((pred[ix] == preds.y_true[ix]).mean()), 6),
        })
    return rows

