"""The Explainability page's gallery: test cases from the run's per-image records
(``report/predictions.csv``, see docs/METRICS.md), filtered without running the model.

Older reports lack some columns (``correct``, ``lung_focus``, ``ood``): :func:`records`
derives ``correct`` from the classes and leaves the others empty, and the filters that need
a missing column say so through :func:`available_filters`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from core.clinical import LOW_LUNG_FOCUS

ALL = "All"
OUTCOMES = (ALL, "Correct", "Wrong")
CAM_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM"}
CAM_HELP = ("Grad-CAM at layer4 comes from the forward pass itself (fast); at other layers "
            "and for Grad-CAM++ (pixel-wise gradient weights) a backward pass runs. EigenCAM is "
            "class-agnostic: the first principal component of the layer's activations.")

HOW_TO_READ = """
**How to read a heatmap.** Warm colours mark the image regions whose features raised the
score of the explained class the most; cool colours contributed little. The map is computed
on the network's last feature maps (a few pixels across at `layer4`) and upsampled, so it is
coarse: it points at regions, not at outlines.

**What it cannot tell.** A heatmap shows where the network's evidence lies; it is **not a
lesion detector**. A warm region is not a finding, a cool one is not normal tissue, and a
plausible-looking map does not make the prediction right. Maps outside the lungs (text
markers, borders, devices, the letterbox padding) suggest the model relies on shortcuts of
the image source rather than on disease. Different methods and layers give different maps
of the same decision: compare them before trusting any one.

**Lung focus** is the heatmap's share of energy on the lung field divided by the lungs'
share of the image: 1 = no preference, above 1 = concentrated on the lungs, below 1 = mostly
outside them.
"""


def _as_bool(series: pd.Series) -> pd.Series:
    """A CSV column of True/False (possibly with empty cells) as a nullable boolean."""
    if series.dtype == bool:
        return series.astype("boolean")
    mapped = series.map(lambda v: {"true": True, "false": False}.get(str(v).strip().lower()))
    return mapped.astype("boolean")


def records(predictions: pd.DataFrame | None) -> pd.DataFrame:
    """The per-image records with typed columns: ``correct`` (derived from the classes when
    absent), ``ood`` and ``low_confidence`` as nullable booleans, ``lung_focus`` and
    ``ood_score`` as floats (NaN where not scored or absent)."""
    if predictions is None:
        return pd.DataFrame(columns=["path", "true_class", "predicted_class"])
    df = predictions.copy()
    if "correct" in df:
        df["correct"] = _as_bool(df["correct"])
    else:
        df["correct"] = (df["predicted_class"] == df["true_class"]).astype("boolean")
    for col in ("ood", "low_confidence"):
        df[col] = _as_bool(df[col]) if col in df else pd.Series(pd.NA, index=df.index,
                                                                  dtype="boolean")
    for col in ("lung_focus", "ood_score"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else float("nan")
    return df


def available_filters(df: pd.DataFrame) -> dict[str, bool]:
    """Whether the records can be filtered by low lung focus and by the OOD flag."""
    return {"low_focus": bool(df["lung_focus"].notna().any()),
            "ood": bool(df["ood"].notna().any())}


def filter_records(df: pd.DataFrame, true_class: str = ALL, predicted_class: str = ALL,
                   outcome: str = ALL, low_focus_only: bool = False,
                   ood_only: bool = False) -> pd.DataFrame:
    """The records of :func:`records` matching every filter (``ALL`` = no filter). Low lung
    focus: ``lung_focus`` < :data:`core.clinical.LOW_LUNG_FOCUS`; OOD: ``ood`` is True."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    keep = pd.Series(True, index=df.index)
    if true_class != ALL:
        keep &= df["true_class"] == true_class
    if predicted_class != ALL:
        keep &= df["predicted_class"] == predicted_class
    if outcome != ALL:
        keep &= df["correct"].fillna(False) == (outcome == "Correct")
    if low_focus_only:
        keep &= df["lung_focus"] < LOW_LUNG_FOCUS
    if ood_only:
        keep &= df["ood"].fillna(False).astype(bool)
    return df[keep.astype(bool)]


def case_label(row: Any) -> str:
    """A gallery caption: file name, true -> predicted class."""
    mark = "✓" if bool(row["correct"]) else "✗"
    name = str(row["path"]).rsplit("/", 1)[-1]
    return f"{mark} {name}: {row['true_class']} → {row['predicted_class']}"
