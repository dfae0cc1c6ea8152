"""Find trained runs under ``models/`` and read what they wrote (no Streamlit, no torch here).

A page shows a run from the small files written beside its checkpoint; reading them never
loads the network or imports torch (a test checks ``sys.modules``):

| file | what | written by |
| --- | --- | --- |
| ``run.json`` | checkpoint summary: classes, arch, preprocessing, epoch, created, weights hash, calibration, operating point, OOD and low-confidence cut-offs | training's finish (``core.train.fit``), ``python -m core.runs summarise`` |
| ``config.json`` | the resolved training configuration | training |
| ``history.json`` | one row per epoch | training |
| ``dataset.json`` | class counts per split, duplicates, skipped files, image sizes, sources | training |
| ``report/metrics.json`` | the evaluation report (``docs/METRICS.md``) | ``core.evaluate`` |
| ``report/predictions.csv`` | per-image records of the test split | ``core.evaluate`` |
| ``int8.json`` | the int8 network's check | ``core.quantize`` |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SUMMARY_FILE = "run.json"
DATASET_FILE = "dataset.json"


def models_dir() -> Path:
    """``$CXR_MODELS_DIR`` if set, else the repository's ``models/``."""
    return Path(os.environ.get("CXR_MODELS_DIR") or DEFAULT_MODELS_DIR)


@dataclass(frozen=True)
class RunInfo:
    """A run found on disk: ``name`` is its folder relative to the models folder
    (``lungviews/crop``), so runs at any depth are told apart."""

    name: str
    path: Path
    checkpoint: Path
    report: Path | None
    modified: float


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """Runs that have a ``best.pt``, at any depth under ``root``, newest first."""
    root = Path(root) if root is not None else models_dir()
    if not root.is_dir():
        return []
    runs = []
    for ckpt in root.rglob("best.pt"):
        if not ckpt.is_file():
            continue
        report = ckpt.parent / "report" / "metrics.json"
        name = ckpt.parent.relative_to(root).as_posix()
        runs.append(RunInfo(name=name if name != "." else root.name, path=ckpt.parent,
                            checkpoint=ckpt, report=report if report.is_file() else None,
                            modified=ckpt.stat().st_mtime))
    return sorted(runs, key=lambda r: (-r.modified, r.name))


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _read_optional(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or unreadable (a page then shows
    what is missing; it never fails on a half-written run)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_history(run: RunInfo) -> list[dict[str, Any]]:
    path = run.path / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


@dataclass(frozen=True, eq=False)
class RunArtifacts:
    """Everything a page shows of one run, read from the small files beside its checkpoint.

    Missing pieces are None (or empty) and named in ``missing`` with the command that makes
    them, so that a page can show guidance instead of failing.
    """

    name: str
    path: Path
    checkpoint: Path
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    history: list[dict[str, Any]]
    report: dict[str, Any] | None
    predictions: Any  # pandas.DataFrame | None: the per-image records of the test split
    dataset: dict[str, Any] | None
    int8: dict[str, Any] | None
    missing: tuple[str, ...] = field(default_factory=tuple)

    # -- what the checkpoint summary says, with the report and config as fall-backs

    def _get(self, key: str, default: Any = None) -> Any:
        if self.summary and key in self.summary:
            return self.summary[key]
        return default

    @property
    def classes(self) -> list[str]:
        if self.summary and self.summary.get("classes"):
            return list(self.summary["classes"])
        if self.report:
            return list(self.report["run"]["classes"])
        return []

    @property
    def arch(self) -> str:
        return str(self._get("arch") or (self.config or {}).get("train", {}).get("arch", ""))

    @property
    def img_size(self) -> int | None:
        pre = self._get("preprocess") or (self.config or {}).get("preprocess") or {}
        return pre.get("img_size")

    @property
    def lung_view(self) -> str:
        pre = self._get("preprocess") or (self.config or {}).get("preprocess") or {}
        return str(pre.get("lung_view", "none"))

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def operating_point(self) -> dict[str, Any] | None:
        return self._get("operating_point") or (self.report or {}).get("operating_point")

    @property
    def findings(self) -> list[dict[str, Any]]:
        """The report's findings as records ``{id, severity, text}`` (older reports stored
        plain strings: those become ``info`` records)."""
        raw = (self.report or {}).get("findings") or []
        out = []
        for i, f in enumerate(raw):
            if isinstance(f, str):
                out.append({"id": f"finding-{i}", "severity": "info", "text": f})
            else:
                out.append(dict(f))
        return out


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Read a run folder (see the module docstring); never loads the network."""
    run_dir = Path(run_dir)
    if not (run_dir / "best.pt").is_file():
        from core.errors import CheckpointError

        raise CheckpointError(f"{run_dir} holds no best.pt: train a run with "
                              f"`python -m core.train --output {run_dir}`.")
    missing = []
    summary = _read_optional(run_dir / SUMMARY_FILE)
    config = _read_optional(run_dir / "config.json")
    history = _read_optional(run_dir / "history.json") or []
    report = _read_optional(run_dir / "report" / "metrics.json")
    if report is None:
        missing.append(f"report: python -m core.evaluate --checkpoint {run_dir / 'best.pt'}")
    predictions = None
    csv = run_dir / "report" / "predictions.csv"
    if csv.is_file():
        import pandas as pd

        predictions = pd.read_csv(csv)
    dataset = _read_optional(run_dir / DATASET_FILE)
    int8 = _read_optional(run_dir / "int8.json")
    try:
        root = models_dir()
        name = run_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        name = run_dir.name
    return RunArtifacts(name=name, path=run_dir, checkpoint=run_dir / "best.pt", summary=summary,
                        config=config, history=list(history), report=report,
                        predictions=predictions, dataset=dataset, int8=int8,
                        missing=tuple(missing))
