"""The operating table: a screening class's sensitivity, specificity, PPV and NPV across
thresholds, from a run's stored per-image probabilities (``report/predictions.csv``).

Pure NumPy/pandas over :mod:`core.metrics` (the same confusion-matrix arithmetic and decision
rule as the evaluation report), so the dashboard's threshold explorer and ROI calculator
never re-run the model and agree with the report at the stored operating point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from core import metrics as M
from core.errors import ConfigError

DEFAULT_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)


def records_arrays(records: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true indices, calibrated probabilities N x K)`` from per-image records with
    ``true_class`` and ``prob_<class>`` columns."""
    classes = list(classes)
    missing = [f"prob_{c}" for c in classes if f"prob_{c}" not in records.columns]
    if "true_class" not in records.columns or missing:
        raise ConfigError(f"The per-image records lack columns {missing or ['true_class']}; "
                          "re-run `python -m core.evaluate` for this run.")
    unknown = sorted(set(records["true_class"]) - set(classes))
    if unknown:
        raise ConfigError(f"Records name classes {unknown} that the run does not have ({classes}).")
    y = records["true_class"].map({c: i for i, c in enumerate(classes)}).to_numpy(int)
    proba = records[[f"prob_{c}" for c in classes]].to_numpy(float)
    return y, proba


def confusion_at(y: np.ndarray, proba: np.ndarray, screen: int, threshold: float) -> np.ndarray:
    """Confusion matrix (rows true, columns predicted) under the operating-point rule
    (:func:`core.metrics.predict_at_threshold`)."""
    k = proba.shape[1]
    pred = M.predict_at_threshold(proba, screen, threshold)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (np.asarray(y, int), pred), 1)
    return cm


def _row(cm: np.ndarray, screen: int, prevalence: float | None) -> dict[str, float]:
    m = M.counts_to_metrics(cm, None if prevalence is None
                            else np.full(cm.shape[0], float(prevalence)))
    row = {k: float(m[k][screen]) for k in ("tp", "fp", "fn", "tn", "sensitivity",
                                             "specificity", "ppv", "npv")}
    if prevalence is not None:
        row["ppv"] = float(m["ppv_at_prevalence"][screen])
        row["npv"] = float(m["npv_at_prevalence"][screen])
    return row


def operating_table(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], cls: str,
                    thresholds: Sequence[float] | None = None,
                    prevalence: float | None = None) -> pd.DataFrame:
    """One row per threshold: tp, fp, fn, tn, sensitivity, specificity, PPV and NPV of
    ``cls`` (PPV/NPV at ``prevalence`` by Bayes' rule when given, else at the sample's)."""
    classes = list(classes)
    if cls not in classes:
        raise ConfigError(f"{cls!r} is not one of the run's classes: {', '.join(classes)}")
    if prevalence is not None and not 0.0 < prevalence < 1.0:
        raise ConfigError(f"prevalence={prevalence} must lie strictly between 0 and 1")
    screen = classes.index(cls)
    ts = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, float)
    rows = [{"threshold": float(t), **_row(confusion_at(y, proba, screen, t), screen, prevalence)}
            for t in ts]
    return pd.DataFrame(rows)


def at_threshold(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], cls: str,
                 threshold: float, prevalence: float | None = None) -> dict[str, Any]:
    """The figures of ``cls`` at one threshold and the whole confusion matrix there."""
    classes = list(classes)
    table = operating_table(y, proba, classes, cls, [threshold], prevalence)
    cm = confusion_at(y, proba, classes.index(cls), threshold)
    return {**table.iloc[0].to_dict(), "confusion": cm.tolist(), "classes": classes}
