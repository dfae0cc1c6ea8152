"""The reference notebook's published figures, side by side with a run's report.

The reference notebook (a ResNet50 with a frozen ImageNet backbone on the full four-class
COVID-19 Radiography Database) published these test figures at argmax. A run's figures are
only directly comparable when it has the same four classes and was trained and tested on the
whole database; :func:`comparability` says why not otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

REFERENCE_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
# Images per class in the full COVID-19 Radiography Database (21,165 images).
DATABASE_COUNTS = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}

REFERENCE_OVERALL = {"accuracy": 0.687, "macro_f1": 0.700, "macro_roc_auc": 0.921}
# sensitivity, specificity, PPV, NPV, ROC-AUC per class (fractions).
REFERENCE_PER_CLASS = {
    "COVID": {"sensitivity": 0.670, "specificity": 0.837, "ppv": 0.458, "npv": 0.925,
              "roc_auc": 0.850},
    "Lung_Opacity": {"sensitivity": 0.895, "specificity": 0.815, "ppv": 0.657, "npv": 0.951,
                     "roc_auc": 0.933},
    "Normal": {"sensitivity": 0.542, "specificity": 0.953, "ppv": 0.914, "npv": 0.691,
               "roc_auc": 0.910},
    "Viral Pneumonia": {"sensitivity": 0.911, "specificity": 0.978, "ppv": 0.742, "npv": 0.994,
                        "roc_auc": 0.994},
}
OVERALL_LABELS = {"accuracy": "Accuracy", "macro_f1": "Macro F1", "macro_roc_auc": "Macro ROC-AUC"}
PER_CLASS_LABELS = {"sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV",
                    "npv": "NPV", "roc_auc": "ROC-AUC"}


def _value(item: Any) -> float | None:
    return item.get("value") if isinstance(item, dict) else item


def _run_per_class(report: dict[str, Any], cls: str, key: str) -> float | None:
    if key == "roc_auc":
        return _value(((report.get("threshold_free") or {}).get("per_class") or {})
                      .get(cls, {}).get("roc_auc"))
    return _value(((report.get("at_argmax") or {}).get("per_class") or {}).get(cls, {}).get(key))


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: ``{"figure", "reference", "this run", "difference", "pct"}``
    (fractions; ``pct``: a rate best read as a percentage, not a score such as ROC-AUC;
    ``this run`` is None where the run lacks the class or the figure is undefined). Per-class
    figures of this run are at argmax, as the reference reported them."""
    overall = report.get("overall") or {}
    rows = []
    for key, label in OVERALL_LABELS.items():
        rows.append(_row(label, REFERENCE_OVERALL[key], _value(overall.get(key))))
    for cls in REFERENCE_CLASSES:
        for key, label in PER_CLASS_LABELS.items():
            rows.append(_row(f"{cls} {label}", REFERENCE_PER_CLASS[cls][key],
                             _run_per_class(report, cls, key)))
    return rows


def _row(label: str, ref: float, mine: float | None) -> dict[str, Any]:
    return {"figure": label, "reference": ref, "this run": mine,
            "difference": None if mine is None else round(mine - ref, 6),
            "pct": not label.endswith(("ROC-AUC", "F1"))}


def side_by_side(report: dict[str, Any], fmt: Callable[[float, bool], str]
                 ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The comparison as two compact tables of text cells ``"reference → this run"``:
    overall (one row) and per class (one row per reference class). ``fmt(value, pct)``
    formats one figure (the dashboard passes ``core.ui.fmt_metric``)."""
    def cell(r: dict[str, Any]) -> str:
        mine = "–" if r["this run"] is None else fmt(r["this run"], r["pct"])
        return f"{fmt(r['reference'], r['pct'])} → {mine}"

    rows = comparison_rows(report)
    n_overall = len(OVERALL_LABELS)
    overall = {"": "reference → this run"}
    overall.update({r["figure"]: cell(r) for r in rows[:n_overall]})
    per_class = []
    for cls in REFERENCE_CLASSES:
        mine = [r for r in rows[n_overall:] if r["figure"].startswith(f"{cls} ")]
        per_class.append({"Class": cls, **{r["figure"][len(cls) + 1:]: cell(r) for r in mine}})
    return [overall], per_class


def comparability(classes: Sequence[str], counts: dict[str, int] | None = None) -> list[str]:
    """Why this run's figures are not directly comparable with the reference's (empty when
    they are): a different class set, or fewer images than the full database."""
    reasons = []
    missing = [c for c in REFERENCE_CLASSES if c not in classes]
    extra = [c for c in classes if c not in REFERENCE_CLASSES]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing)}")
        if extra:
            parts.append(f"adds {', '.join(extra)}")
        reasons.append(f"This run's class set differs from the reference's four classes (it "
                       f"{' and '.join(parts)}): with fewer classes each one-vs-rest task and "
                       "the overall figures change meaning.")
    if counts:
        total = sum(counts.values())
        full = sum(DATABASE_COUNTS.get(c, 0) for c in classes)
        if full and total < 0.9 * full:
            reasons.append(f"This run used {total:,} images, against {full:,} in the full "
                           "database for the same classes: smaller test sets give wider "
                           "intervals and different class balances.")
    return reasons
