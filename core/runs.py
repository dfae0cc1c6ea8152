"""Find trained runs under ``models/`` and read what they wrote (no Streamlit here)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def models_dir() -> Path:
    """``$CXR_MODELS_DIR`` if set, else the repository's ``models/``."""
    return Path(os.environ.get("CXR_MODELS_DIR") or DEFAULT_MODELS_DIR)


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: Path
    checkpoint: Path
    report: Path | None
    modified: float


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """Runs that have a ``best.pt``, newest first."""
    root = Path(root) if root is not None else models_dir()
    if not root.is_dir():
        return []
    runs = []
    for ckpt in root.glob("*/best.pt"):
        report = ckpt.parent / "report" / "metrics.json"
        runs.append(RunInfo(name=ckpt.parent.name, path=ckpt.parent, checkpoint=ckpt,
                            report=report if report.is_file() else None,
                            modified=ckpt.stat().st_mtime))
    return sorted(runs, key=lambda r: r.modified, reverse=True)


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_history(run: RunInfo) -> list[dict[str, Any]]:
    path = run.path / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []
