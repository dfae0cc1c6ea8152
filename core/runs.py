"""Find trained runs under ``models/`` and read what they wrote (no Streamlit; reading needs no torch).

A page shows a run from the small files written beside its checkpoint; reading them never
loads the network or imports torch (a test checks ``sys.modules``). The writers at the end
of this module (``summarise``, ``write_dataset_summary``, the CLI) do import it.

| file | what | written by |
| --- | --- | --- |
| ``run.json`` | checkpoint summary: classes, arch, preprocessing, epoch, created, weights hash, calibration, operating point, OOD and low-confidence cut-offs | training's finish (``core.train.fit``), ``python -m core.runs summarise`` |
| ``config.json`` | the resolved training configuration | training |
| ``history.json`` | one row per epoch | training |
| ``dataset.json`` | class counts per split, duplicates, skipped files, image sizes and bit depths, sources | training, ``python -m core.runs dataset`` |
| ``report/metrics.json`` | the evaluation report (``docs/METRICS.md``) | ``core.evaluate`` |
| ``report/predictions.csv`` | per-image records of the test split | ``core.evaluate`` |
| ``serving.json`` | the serving graph's reduced-precision check (which precisions may serve) | ``core.export`` (training's finish) |

The files fitted on the weights (calibration, OOD, int8) sit beside ``best.pt`` as sidecars
stamped with its hash (``core.sidecars``); ``python -m core.runs migrate RUN_DIR`` writes them
for a run from before the sidecars, whose ``best.pt`` holds those keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core import sidecars
from core.files import file_sha256, write_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = ROOT / "models"
DEFAULT_DEMO_DIR = ROOT / "assets" / "demo"
DEMO_FILE = "demo.json"
"""Marks a run folder that ships with the repository (the demo model, ``core.demo``): its
provenance and weight format. Such a folder is never written at run time: its exported
serving graph goes to the user's cache folder (``core.export.graph_dir``)."""
DEMO_NAME = "demo (shipped)"
"""The demo run's name in the run selector."""
SUMMARY_FILE = "run.json"
DATASET_FILE = "dataset.json"
CHECKPOINT_FILE = "best.pt"
SERVING_FILE = "serving.json"
SEVERITIES = ("high", "medium", "low", "info")
"""Finding severities, most severe first (``metrics.json["findings"][i]["severity"]``)."""


def models_dir() -> Path:
    """``$CXR_MODELS_DIR`` if set, else the repository's ``models/``."""
    return Path(os.environ.get("CXR_MODELS_DIR") or DEFAULT_MODELS_DIR)


def demo_enabled() -> bool:
    """False when the deployment hides the shipped demo model (``CXR_DEMO=0``)."""
    return os.environ.get("CXR_DEMO", "1").strip().lower() not in ("0", "false", "no", "off")


def demo_dir() -> Path:
    """``$CXR_DEMO_DIR`` if set, else the repository's ``assets/demo``."""
    return Path(os.environ.get("CXR_DEMO_DIR") or DEFAULT_DEMO_DIR)


def is_shipped(run_dir: str | Path) -> bool:
    """A run folder that ships with the repository (it holds ``demo.json``)."""
    return (Path(run_dir) / DEMO_FILE).is_file()


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
    for ckpt in root.rglob(CHECKPOINT_FILE):
        if not ckpt.is_file():
            continue
        report = ckpt.parent / "report" / "metrics.json"
        name = ckpt.parent.relative_to(root).as_posix()
        runs.append(RunInfo(name=name if name != "." else root.name, path=ckpt.parent,
                            checkpoint=ckpt, report=report if report.is_file() else None,
                            modified=ckpt.stat().st_mtime))
    return sorted(runs, key=lambda r: (-r.modified, r.name))


def demo_run(folder: str | Path | None = None) -> RunInfo | None:
    """The shipped demo run (``folder``, default :func:`demo_dir`) when it is there and not
    hidden (:func:`demo_enabled`); None otherwise."""
    if not demo_enabled():
        return None
    folder = Path(folder) if folder is not None else demo_dir()
    ckpt = folder / CHECKPOINT_FILE
    if not (ckpt.is_file() and is_shipped(folder)):
        return None
    report = folder / "report" / "metrics.json"
    return RunInfo(name=DEMO_NAME, path=folder, checkpoint=ckpt,
                   report=report if report.is_file() else None, modified=ckpt.stat().st_mtime)


def selectable_runs(root: str | Path | None = None,
                    demo: str | Path | None = None) -> list[RunInfo]:
    """The runs a user can pick: their own (:func:`list_runs`, newest first, so the newest
    is the default), then the shipped demo (:func:`demo_run`), which is the active model
    only on a machine with no run of its own."""
    found = list_runs(root)
    shipped = demo_run(demo)
    if shipped is not None and not any(r.path.resolve() == shipped.path.resolve()
                                       for r in found):
        found.append(shipped)
    return found


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


def predictor_files(checkpoint: str | Path) -> tuple[tuple[str, float], ...]:
    """The files a predictor of ``checkpoint`` reads, with their modification times: the
    checkpoint and every sidecar beside it named like it (``best.*``: the calibration, OOD
    and int8 sidecars of ``core.sidecars`` among them), sorted by path.

    The dashboard keys its cached predictor on this, so a retrained checkpoint, a refitted
    sidecar (recalibrated, new OOD cut-offs, an int8 graph added) or a new ``serving.json``
    (which precision serves) is loaded again. Raises
    :class:`core.errors.CheckpointError` when the checkpoint is absent.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        from core.errors import CheckpointError

        raise CheckpointError(f"Checkpoint not found: {checkpoint}. Train a run with "
                              f"`python -m core.train --output {checkpoint.parent}`.")
    files = {checkpoint, *sidecars.sidecar_files(checkpoint),
             *(p for p in checkpoint.parent.glob(f"{checkpoint.stem}.*")
               if p.is_file() and not p.name.endswith(".tmp"))}
    if (checkpoint.parent / SERVING_FILE).is_file():
        files.add(checkpoint.parent / SERVING_FILE)
    return tuple(sorted((str(p), p.stat().st_mtime) for p in files))


AUTO_SERVING = (("openvino", "bf16"), ("onnx", "int8"))
"""What the predictor's default settings (``runtime="auto", precision="auto"``) serve on a
CPU, fastest first, before fp32 on ONNX Runtime: each only where the run's check
(``serving.json``, of these weights) passed for it, its runtime is installed and, for bf16,
the CPU runs bf16 natively (``core.serving.auto_serving``)."""

_SERVING_TEXT = {
    "openvino-bf16": "bf16 graph on OpenVINO where the CPU runs bf16 natively (passed its check "
                     "against fp32); fp32 graph on ONNX Runtime elsewhere",
    "onnx-int8": "int8 graph on ONNX Runtime (passed its check against fp32)",
    "onnx-fp32": "fp32 graph on ONNX Runtime (the same decisions as PyTorch fp32)",
}


def serving(check: dict[str, Any] | None, weights_sha256: str | None = None) -> dict[str, str]:
    """How ``core.inference.Predictor`` serves a run on a CPU with its default settings
    (:data:`AUTO_SERVING`): the first reduced precision whose check (``serving.json``, of
    these weights) passed, else the fp32 graph on ONNX Runtime
    (``core.network.DEFAULT_RUNTIME``). Pure: needs no torch."""
    checks = (check or {}).get("checks", {})
    current = check is not None and (weights_sha256 is None
                                     or check.get("weights_sha256") == weights_sha256)
    passed = [f"{r}-{p}" for r, p in AUTO_SERVING if current and checks.get(f"{r}-{p}", {}).get("passed")]
    network = (passed or ["onnx-fp32"])[0]
    runtime, _, precision = network.partition("-")
    return {"runtime": runtime, "network": network, "precision": precision,
            "text": _SERVING_TEXT[network]}


@dataclass(frozen=True, eq=False)
class RunArtifacts:
    """Everything a page shows of one run, read from the small files beside its checkpoint.

    Missing pieces are None (or empty) and named in ``missing`` as ``"what: command"``
    (the command that makes them), so that a page can show guidance instead of failing.
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
    serving_check: dict[str, Any] | None  # serving.json
    missing: tuple[str, ...] = field(default_factory=tuple)
    demo: dict[str, Any] | None = None  # demo.json: a run shipped with the repository

    @property
    def is_demo(self) -> bool:
        return self.demo is not None

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
    def epoch(self) -> int | None:
        """The epoch whose weights ``best.pt`` holds."""
        value = self._get("epoch") or (self.report or {}).get("run", {}).get("epoch")
        return None if value is None else int(value)

    @property
    def created(self) -> str | None:
        """When the checkpoint was saved (ISO 8601); for older runs, the file's time."""
        value = self._get("created")
        if value:
            return str(value)
        try:
            mtime = self.checkpoint.stat().st_mtime
        except OSError:
            return None
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of ``best.pt`` (older runs: as the report recorded it)."""
        return (self._get("weights_sha256")
                or (self.report or {}).get("run", {}).get("checkpoint_sha256"))

    @property
    def temperature(self) -> float | None:
        """The calibration temperature (None when the run is not calibrated)."""
        if self.summary and "temperature" in self.summary:
            t = self.summary["temperature"]
            return None if t is None else float(t)
        cal = (self.report or {}).get("calibration") or {}
        return float(cal["temperature"]) if cal.get("fitted") else None

    @property
    def operating_point(self) -> dict[str, Any] | None:
        return self._get("operating_point") or (self.report or {}).get("operating_point")

    @property
    def screening_class(self) -> str | None:
        op = self.operating_point
        return str(op["class"]) if op else None

    @property
    def ood_threshold(self) -> float | None:
        value = self._get("ood_threshold")
        return None if value is None else float(value)

    @property
    def low_confidence_threshold(self) -> float | None:
        value = self._get("low_confidence_threshold")
        return None if value is None else float(value)

    @property
    def serving(self) -> dict[str, str]:
        """How the predictor serves this run on a CPU (:func:`serving`)."""
        return dict(self._get("serving") or serving(self.serving_check, self.weights_sha256))

    @property
    def data_dir(self) -> str | None:
        """The dataset folder the run was trained on (paths of the records are relative to it)."""
        value = ((self.config or {}).get("data", {}).get("data_dir")
                 or (self.dataset or {}).get("data_dir")
                 or (self.report or {}).get("run", {}).get("data_dir"))
        if not value:
            return None
        if self.demo is not None and not Path(value).is_absolute():
            # a shipped run records its data folder relative to the repository's root
            return os.path.normpath(ROOT / value)
        return str(value)

    @property
    def findings(self) -> list[dict[str, Any]]:
        """The report's findings as records ``{id, severity, text}``, most severe first
        (stable within a severity). Older reports stored plain strings: those become
        ``info`` records."""
        raw = (self.report or {}).get("findings") or []
        out = []
        for i, f in enumerate(raw):
            if isinstance(f, str):
                out.append({"id": f"finding-{i}", "severity": "info", "text": f})
            else:
                out.append(dict(f))
        rank = {s: k for k, s in enumerate(SEVERITIES)}
        return sorted(out, key=lambda f: rank.get(f.get("severity"), len(SEVERITIES)))


def _missing(run_dir: Path, summary: Any, report: Any, predictions: Any, dataset: Any,
             serving_check: Any, data_dir: str | None, shipped: bool = False) -> list[str]:
    """``"what: command"`` for each piece a page may need that the run folder lacks."""
    ckpt = run_dir / CHECKPOINT_FILE
    data = f" --data-dir {data_dir}" if data_dir else " --data-dir <dataset>"
    out = []
    if summary is None:
        out.append(f"checkpoint summary (run.json): python -m core.runs summarise {run_dir}")
    if report is None:
        out.append(f"evaluation report: python -m core.evaluate --checkpoint {ckpt}{data}")
    elif predictions is None:
        out.append(f"per-image records: python -m core.evaluate --checkpoint {ckpt}{data}")
    elif "correct" not in predictions.columns:
        out.append("per-image records with OOD, probe and lung-focus columns: "
                   f"python -m core.evaluate --checkpoint {ckpt}{data}")
    if dataset is None:
        out.append(f"dataset summary (dataset.json): python -m core.runs dataset {run_dir}{data}")
    if serving_check is None and not shipped:  # a shipped run serves fp32, no check needed
        out.append(f"serving graph and its precision check (serving.json): python -m "
                   f"core.export {run_dir}{data}")
    return out


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Read a run folder (see the module docstring); never loads the network or torch."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        from core.errors import CheckpointError

        raise CheckpointError(f"{run_dir} holds no best.pt: train a run with "
                              f"`python -m core.train --output {run_dir}`.")
    summary = _read_optional(run_dir / SUMMARY_FILE)
    config = _read_optional(run_dir / "config.json")
    history = _read_optional(run_dir / "history.json") or []
    report = _read_optional(run_dir / "report" / "metrics.json")
    predictions = None
    csv = run_dir / "report" / "predictions.csv"
    if csv.is_file():
        import pandas as pd

        try:
            predictions = pd.read_csv(csv)
        except (OSError, ValueError) as exc:  # half-written or damaged: shown as missing
            log.warning("Cannot read %s: %s", csv, exc)
    dataset = _read_optional(run_dir / DATASET_FILE)
    serving_check = _read_optional(run_dir / SERVING_FILE)
    demo = (_read_optional(run_dir / DEMO_FILE) or {}) if is_shipped(run_dir) else None
    try:
        root = models_dir()
        name = run_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        name = DEMO_NAME if demo is not None else run_dir.name
    run = RunArtifacts(name=name, path=run_dir, checkpoint=run_dir / CHECKPOINT_FILE,
                       summary=summary, config=config, history=list(history), report=report,
                       predictions=predictions, dataset=dataset, serving_check=serving_check,
                       demo=None if demo is None else dict(demo))
    missing = _missing(run_dir, summary, report, predictions, dataset, serving_check,
                       run.data_dir, shipped=demo is not None)
    return replace(run, missing=tuple(missing))


# ---------------------------------------------------------------- writing (torch from here on)


def summarise(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """The checkpoint summary ``run.json`` of a run (written into the run folder with
    ``write``): read from ``best.pt`` and its sidecars (``core.sidecars``) once, so that
    pages need not load them. A stale sidecar is a CheckpointError."""
    run_dir = Path(run_dir)
    best = run_dir / CHECKPOINT_FILE
    ckpt = sidecars.load_run_checkpoint(best)
    temperature = ckpt.get("temperature")
    op = ckpt.get("operating_point")
    ood = ckpt.get("ood")
    low = ckpt.get("low_confidence")
    sha = file_sha256(best)
    doc = {
        "classes": [str(c) for c in ckpt["classes"]],
        "arch": str(ckpt.get("arch", "")),
        "preprocess": dict(ckpt.get("preprocess") or {}),
        "epoch": ckpt.get("epoch"),
        "created": ckpt.get("created"),
        "weights_sha256": sha,
        "temperature": None if temperature is None else float(temperature),
        "operating_point": None if op is None else {
            k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
            for k, v in op.items()},
        "ood_threshold": None if ood is None else float(ood["threshold"]),
        "low_confidence_threshold": None if low is None else float(low["threshold"]),
        "serving": serving(_read_optional(run_dir / SERVING_FILE), sha),
    }
    if write:
        write_json(run_dir / SUMMARY_FILE, doc)
        log.info("Wrote %s", run_dir / SUMMARY_FILE)
    return doc


def migrate(run_dir: str | Path) -> list[Path]:
    """Write the sidecars of a run from before them (:func:`core.sidecars.migrate`; its
    ``best.pt`` is not modified), then its ``run.json``. Returns the files written."""
    run_dir = Path(run_dir)
    written = sidecars.migrate(run_dir / CHECKPOINT_FILE)
    if not written:
        log.info("%s: nothing to migrate (its sidecars are present, or it holds no fitted keys)",
                 run_dir)
    summarise(run_dir)
    return written


def write_dataset_summary(run_dir: str | Path, data_dir: str | Path,
                          manifest: Any | None = None) -> dict[str, Any]:
    """Write ``dataset.json`` for a run from its manifest (``manifest``, else the run's
    ``manifest.csv``: skipped files are then unknown and listed as none), with the image
    sources from ``<Class>.metadata.xlsx`` where the dataset has them."""
    from core.data import dataset_summary, load_manifest
    from core.metadata import source_report

    run_dir = Path(run_dir)
    if manifest is None:
        path = run_dir / "manifest.csv"
        if not path.is_file():
            from core.errors import CheckpointError

            raise CheckpointError(f"{path} not found: the dataset summary is made from the run's "
                                  "split manifest (written by core.train).")
        manifest = load_manifest(path, data_dir)
    doc = dataset_summary(manifest, sources=source_report(data_dir, manifest.classes))
    write_json(run_dir / DATASET_FILE, doc)
    log.info("Wrote %s", run_dir / DATASET_FILE)
    return doc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m core.runs",
        description="Write the small files the dashboard reads beside a run's checkpoint "
                    "(training writes them; these commands make them for older runs).")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summarise", help="write RUN_DIR/run.json from RUN_DIR/best.pt",
                       description="Write RUN_DIR/run.json, the checkpoint summary (classes, "
                                   "preprocessing, weights hash, calibration, operating point, "
                                   "OOD and low-confidence cut-offs, how it is served).")
    p.add_argument("run_dir", help="the run folder (holds best.pt)")
    p = sub.add_parser("migrate", help="write the sidecars of an older run from its best.pt",
                       description="For a run from before the sidecars (calibration, operating "
                                   "point, OOD and int8 statistics inside best.pt): write "
                                   "best.calibration.json, best.ood.safetensors and "
                                   "best.int8.pt from those keys, stamped with the hash of "
                                   "best.pt, which is not modified; then run.json.")
    p.add_argument("run_dir", help="the run folder (holds best.pt)")
    p = sub.add_parser("dataset", help="write RUN_DIR/dataset.json from RUN_DIR/manifest.csv",
                       description="Write RUN_DIR/dataset.json: images per class and split, "
                                   "duplicate groups, image sizes and bit depths, sources.")
    p.add_argument("run_dir", help="the run folder (holds manifest.csv)")
    p.add_argument("--data-dir", default=None,
                   help="the dataset the run was trained on (default: as its config.json says)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from core.errors import CXRError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "summarise":
            summarise(args.run_dir)
        elif args.command == "migrate":
            migrate(args.run_dir)
        else:
            data_dir = args.data_dir or (
                (_read_optional(Path(args.run_dir) / "config.json") or {})
                .get("data", {}).get("data_dir"))
            if not data_dir:
                log.error("Pass --data-dir: %s has no config.json naming it", args.run_dir)
                return 2
            write_dataset_summary(args.run_dir, data_dir)
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
