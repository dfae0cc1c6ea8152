"""What the overview pages (Home, Executive Summary, Model Performance) show of a run, as
plain data: the status checklist, the headline KPIs, findings in order of severity and the
per-class, shortcut and external-validation tables. No Streamlit here; the pages draw.

Every function reads a :class:`core.runs.RunArtifacts` or its report and tolerates missing
pieces (older runs without ``run.json`` or ``dataset.json``, reports without a section).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from core import operating
from core.config import DEFAULT_DATA_DIR, default_data_dir
from core.metrics import prevalence_adjusted
from core.runs import SEVERITIES, RunArtifacts

DATASET_COMMAND = "python -m core.data download"  # or the Training page's download button
TRAIN_COMMAND = "python -m core.train --preset cpu-lungs --data-dir {data} --output models/cpu-lungs"
PER_CLASS_COLUMNS = {"sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV",
                     "npv": "NPV", "f1": "F1"}


@dataclass(frozen=True)
class Check:
    """One line of the status checklist: ``command`` fixes it when ``ok`` is false."""

    what: str
    ok: bool
    detail: str
    command: str | None = None


@dataclass(frozen=True)
class Kpi:
    label: str
    item: Any  # a report Metric {value, ci95, ...} or None
    pct: bool
    help: str


# ------------------------------------------------------------------ run facts


def run_data_dir(run: RunArtifacts | None) -> str | None:
    """The dataset folder the run was trained on (``RunArtifacts.data_dir``)."""
    return None if run is None else run.data_dir


def dataset_dir(run: RunArtifacts | None) -> Path | None:
    """The first existing dataset folder: the run's, then ``$CXR_DATA_DIR``, then
    ``data/COVID-19_Radiography_Dataset``; None when none exists."""
    for cand in (run_data_dir(run), default_data_dir(), DEFAULT_DATA_DIR):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def screening_class(run: RunArtifacts) -> str | None:
    """The operating point's class (COVID for the database), None without an operating
    point."""
    return run.screening_class


def created(run: RunArtifacts) -> str:
    """When the checkpoint was saved, in UTC to the minute (``RunArtifacts.created``)."""
    stamp = run.created
    if not stamp:
        return "unknown"
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if when.tzinfo is None:
        return when.strftime("%Y-%m-%d %H:%M")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def dataset_totals(run: RunArtifacts) -> dict[str, int] | None:
    """Images per class over all splits, from ``dataset.json`` (None without it)."""
    counts = (run.dataset or {}).get("counts") or {}
    if not counts:
        return None
    totals: dict[str, int] = {}
    for split in counts.values():
        for cls, n in (split or {}).items():
            totals[cls] = totals.get(cls, 0) + int(n)
    return totals


def checklist(run: RunArtifacts | None) -> list[Check]:
    """Dataset, model and report, each with the exact command that fixes it, then anything
    else the run lacks (``RunArtifacts.missing``: ``"what: command"``)."""
    data = dataset_dir(run)
    data_arg = str(data) if data else DEFAULT_DATA_DIR
    checks = [
        Check("Dataset", data is not None,
              f"found at `{data}`" if data else
              f"not found at the run's folder, `$CXR_DATA_DIR` or `{DEFAULT_DATA_DIR}`. "
              "Download it there (Kaggle account needed), or set `CXR_DATA_DIR` to your copy.",
              None if data else DATASET_COMMAND),
        Check("Model", run is not None,
              f"run `{run.name}` (`{run.checkpoint}`)" if run else "no trained model under "
              "models/ (a run appears when `models/<run>/best.pt` exists).",
              None if run else TRAIN_COMMAND.format(data=data_arg)),
    ]
    if run is None:
        checks.append(Check("Evaluation report", False, "needs a trained model first.", None))
        return checks
    extra = []
    report_cmd = f"python -m core.evaluate --checkpoint {run.checkpoint}"
    for entry in run.missing:
        what, _, command = entry.partition(": ")
        what = what.strip()
        if what.lower() in ("report", "evaluation report"):
            report_cmd = command or report_cmd
        else:
            extra.append(Check(what[:1].upper() + what[1:], False, "missing.", command or None))
    checks.append(Check("Evaluation report", run.report is not None,
                        "`report/metrics.json` written" if run.report is not None else
                        "no `report/metrics.json` yet.",
                        None if run.report is not None else report_cmd))
    return checks + extra


# ------------------------------------------------------------------ headline figures


def headline(run: RunArtifacts) -> list[Kpi]:
    """Accuracy, macro F1, macro ROC-AUC and the screening class's sensitivity and PPV at the
    operating point (at argmax, and labelled so, when the run has no operating point)."""
    report = run.report or {}
    overall = report.get("overall") or {}
    kpis = [
        Kpi("Accuracy (test)", overall.get("accuracy"), True, "Share of test images classified "
            "correctly (most probable class)."),
        Kpi("Macro F1", overall.get("macro_f1"), False, "F1 averaged over the classes."),
        Kpi("Macro ROC-AUC", overall.get("macro_roc_auc"), False,
            "One-vs-rest ROC-AUC averaged over the classes (threshold-free)."),
    ]
    cls = screening_class(run)
    block, where = report.get("at_operating_point"), "operating point"
    if not cls or not block:
        block, where = report.get("at_argmax") or {}, "argmax"
        cls = cls or ("COVID" if "COVID" in run.classes else (run.classes or [None])[0])
    per = ((block or {}).get("per_class") or {}).get(cls or "", {})
    suffix = "" if where == "operating point" else " (argmax)"
    kpis.append(Kpi(f"{cls} sensitivity{suffix}", per.get("sensitivity"), True,
                    f"Share of {cls} images flagged as {cls} at the {where}."))
    kpis.append(Kpi(f"{cls} PPV{suffix}", per.get("ppv"), True,
                    f"Share of {cls} calls that are {cls}, at this test set's prevalence."))
    return kpis


def sorted_findings(run: RunArtifacts) -> list[dict[str, Any]]:
    """The findings, most severe first (stable within a severity)."""
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(run.findings, key=lambda f: rank.get(str(f.get("severity")), len(rank)))


def shortcut_summary(report: dict[str, Any]) -> dict[str, Any] | None:
    """The occlusion probe: risk, verdict, chance and the three conditions' accuracies."""
    sc = report.get("shortcut")
    if not sc:
        return None
    cond = sc.get("conditions") or {}
    return {"risk": sc.get("risk"), "verdict": sc.get("verdict"),
            "chance_accuracy": sc.get("chance_accuracy"),
            "full": (cond.get("full") or {}).get("accuracy"),
            "periphery": (cond.get("periphery") or {}).get("accuracy"),
            "centre": (cond.get("centre") or {}).get("accuracy")}


def external_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Internal vs external figures and their drop (internal − external; positive = worse
    outside), one row per figure; empty when not measured."""
    drop = (report.get("external") or {}).get("drop") or {}
    labels = {"accuracy": "Accuracy", "macro_f1": "Macro F1", "macro_roc_auc": "Macro ROC-AUC"}
    pairs = [(label, drop[key]) for key, label in labels.items() if key in drop]
    pairs += [(f"{cls} ROC-AUC", d) for cls, d in (drop.get("per_class_roc_auc") or {}).items()]
    return [{"Figure": label, "Internal": d.get("internal"), "External": d.get("external"),
             "Drop": d.get("drop")} for label, d in pairs]


# ------------------------------------------------------------------ per-class table


def sample_prevalence(report: dict[str, Any], classes: Sequence[str]) -> dict[str, float]:
    """Each class's share of the evaluated set."""
    counts = report.get("class_counts") or {}
    n = sum(counts.values()) or 1
    return {c: counts.get(c, 0) / n for c in classes}


def per_class_rows(report: dict[str, Any], block_name: str = "at_argmax") -> list[dict[str, Any]]:
    """One row per class from a decision block: support, sensitivity, specificity, PPV, NPV,
    F1 (report Metrics with CIs) and ROC-AUC (threshold-free)."""
    block = report.get(block_name) or {}
    ranking = (report.get("threshold_free") or {}).get("per_class") or {}
    rows = []
    for cls, per in (block.get("per_class") or {}).items():
        row: dict[str, Any] = {"Class": cls, "Support": per.get("support")}
        row.update({label: per.get(key) for key, label in PER_CLASS_COLUMNS.items()})
        row["ROC-AUC"] = (ranking.get(cls) or {}).get("roc_auc")
        rows.append(row)
    return rows


def prevalence_rows(report: dict[str, Any], block_name: str,
                    prevalence: dict[str, float]) -> list[dict[str, Any]]:
    """PPV and NPV of each class at the prevalence given for it: Bayes' rule
    (:func:`core.metrics.prevalence_adjusted`) on the block's sensitivity and specificity
    (point values; None where undefined)."""
    per_class = (report.get(block_name) or {}).get("per_class") or {}
    rows = []
    for cls, p in prevalence.items():
        per = per_class.get(cls) or {}
        sens = (per.get("sensitivity") or {}).get("value")
        spec = (per.get("specificity") or {}).get("value")
        adj = prevalence_adjusted(np.array([np.nan if sens is None else sens]),
                                  np.array([np.nan if spec is None else spec]), np.array([p]))
        rows.append({"Class": cls, "Prevalence": float(p),
                     "PPV at prevalence": _defined(float(adj["ppv_at_prevalence"][0])),
                     "NPV at prevalence": _defined(float(adj["npv_at_prevalence"][0]))})
    return rows


# ------------------------------------------------------------------ operating-point explorer


def _defined(v: Any) -> Any:
    return None if isinstance(v, float) and not np.isfinite(v) else v


def explore(records: Any, classes: Sequence[str], cls: str, threshold: float,
            prevalence: float | None = None) -> dict[str, Any]:
    """The screening class's figures and the whole confusion matrix at ``threshold``, from a
    run's per-image records (:func:`core.operating.at_threshold`; undefined figures are None),
    plus ``table``: the same figures over thresholds 0, 0.01, ... 1 for the curve.

    Raises ``ConfigError`` when the records lack the columns it needs."""
    y, proba = operating.records_arrays(records, classes)
    point = operating.at_threshold(y, proba, classes, cls, threshold, prevalence)
    out = {k: _defined(v) for k, v in point.items()}
    out["table"] = operating.operating_table(y, proba, classes, cls, prevalence=prevalence)
    return out


def stored_threshold(run: RunArtifacts, default: float = 0.5) -> float:
    """The run's operating threshold (``default`` without an operating point)."""
    thr = (run.operating_point or {}).get("threshold")
    return float(thr) if thr is not None else default
