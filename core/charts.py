"""Plotly figure builders shared by the dashboard's pages (no Streamlit here).

Every builder takes plain report data (see ``docs/METRICS.md``) and returns a
``plotly.graph_objects.Figure``. Class traces take their colour from ``colours``
(``core.ui.class_colours(classes)``: one colour-blind-safe colour per class on every page);
other traces are drawn in neutral greys with distinct dashes so they never look like a class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FONT_SIZE = 15
NEUTRAL = ("#222222", "#777777")
SEQUENTIAL = "Blues"


def _style(fig: go.Figure, title: str | None = None, height: int = 440) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height, font={"size": FONT_SIZE},
                      title={"text": title, "x": 0, "xanchor": "left"} if title else None,
                      margin={"l": 70, "r": 30, "t": 60 if title else 30, "b": 30},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0,
                              "xanchor": "left"})
    return fig


def row_normalise(counts: Sequence[Sequence[float]]) -> np.ndarray:
    """Each row divided by its total (NaN for a class without images)."""
    cm = np.asarray(counts, float)
    totals = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, cm / np.where(totals > 0, totals, 1), np.nan)


def confusion_figure(labels: Sequence[str], counts: Sequence[Sequence[float]],
                     normalised: bool = False, title: str | None = None) -> go.Figure:
    """Heatmap of a confusion matrix (rows true, columns predicted), each cell labelled with
    its count, or with its share of the row when ``normalised``."""
    labels = [str(c).replace("_", " ") for c in labels]
    cm = np.asarray(counts, float)
    z = row_normalise(cm) if normalised else cm
    text = [[("–" if np.isnan(v) else f"{100 * v:.1f}%") if normalised else f"{int(v)}"
             for v in row] for row in z]
    finite = z[np.isfinite(z)]
    zmax = 1.0 if normalised else max(1.0, float(finite.max()) if finite.size else 1.0)
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, text=text, texttemplate="%{text}",
        textfont={"size": FONT_SIZE + 3}, colorscale=SEQUENTIAL, zmin=0, zmax=zmax,
        colorbar={"title": {"text": "share of row" if normalised else "images",
                            "side": "right"},
                  "tickformat": ".0%" if normalised else "d",
                  "dtick": 0.25 if normalised else max(1, math.ceil(zmax / 5))},
        hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>"))
    fig.update_xaxes(title="Predicted class", side="bottom")
    fig.update_yaxes(title="True class", autorange="reversed")
    n = max(len(labels), 1)
    return _style(fig, title, height=max(360, 110 * n + 140))


def _class_curve(fig: go.Figure, x: Sequence[float], y: Sequence[float], cls: str,
                 colour: str, name: str) -> None:
    fig.add_trace(go.Scatter(x=list(x), y=list(y), mode="lines", name=name,
                             line={"color": colour, "width": 3}, line_shape="hv"))


def roc_figure(roc: dict[str, Any], colours: dict[str, str],
               aucs: dict[str, float | None] | None = None) -> go.Figure:
    """One-vs-rest ROC curves per class (``report["curves"]["roc"]``), with the chance
    diagonal; the legend gives each class's AUC where known."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line={"color": NEUTRAL[1], "dash": "dash", "width": 1.5}))
    for cls, curve in roc.items():
        if not curve:
            continue
        auc = (aucs or {}).get(cls)
        name = f"{cls} (AUC {auc:.3f})" if auc is not None else cls
        _class_curve(fig, curve["fpr"], curve["tpr"], cls, colours.get(cls, NEUTRAL[0]), name)
    fig.update_xaxes(title="1 − specificity (false-positive rate)", range=[0, 1])
    fig.update_yaxes(title="Sensitivity (true-positive rate)", range=[0, 1.02])
    return _style(fig, "ROC curves (one class vs the rest)", height=520)


def pr_figure(pr: dict[str, Any], colours: dict[str, str],
              prevalence: dict[str, float] | None = None) -> go.Figure:
    """Precision-recall curves per class (``report["curves"]["pr"]``); a dotted line at each
    class's prevalence marks a model without skill."""
    fig = go.Figure()
    for cls, curve in pr.items():
        if not curve:
            continue
        colour = colours.get(cls, NEUTRAL[0])
        _class_curve(fig, curve["recall"], curve["precision"], cls, colour, cls)
        p = (prevalence or {}).get(cls)
        if p is not None:
            fig.add_trace(go.Scatter(x=[0, 1], y=[p, p], mode="lines", showlegend=False,
                                     hoverinfo="skip",
                                     line={"color": colour, "dash": "dot", "width": 1.5}))
    fig.update_xaxes(title="Recall (sensitivity)", range=[0, 1])
    fig.update_yaxes(title="Precision (PPV)", range=[0, 1.02])
    return _style(fig, "Precision-recall curves (dotted: prevalence)", height=520)


def reliability_figure(calibration: dict[str, Any]) -> go.Figure:
    """Reliability diagram before (T = 1) and after temperature scaling: accuracy against
    mean confidence per bin (empty bins left out), the ECE in the legend."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"color": NEUTRAL[1], "dash": "dash", "width": 1.5}))
    styles = {"before": ("Before (T = 1)", NEUTRAL[1], "dot", "circle-open"),
              "after": (f"After (T = {calibration.get('temperature', 1.0):.3g})", NEUTRAL[0],
                        "solid", "circle")}
    for key, (label, colour, dash, symbol) in styles.items():
        part = calibration.get(key) or {}
        bins = [b for b in part.get("reliability") or [] if b.get("count")]
        ece = (part.get("ece") or {}).get("value")
        name = f"{label}, ECE {ece:.3f}" if ece is not None else label
        fig.add_trace(go.Scatter(
            x=[b["mean_confidence"] for b in bins], y=[b["accuracy"] for b in bins],
            customdata=[b["count"] for b in bins], mode="lines+markers", name=name,
            line={"color": colour, "dash": dash, "width": 3},
            marker={"size": 10, "symbol": symbol, "color": colour},
            hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata} images"
                          "<extra></extra>"))
    fig.update_xaxes(title="Mean confidence (top class)", range=[0, 1.02])
    fig.update_yaxes(title="Accuracy", range=[0, 1.02])
    return _style(fig, "Reliability diagram", height=520)


def history_figure(history: Sequence[dict[str, Any]]) -> go.Figure:
    """Loss and accuracy per epoch, training and validation."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy / macro F1"))
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    series = (("train_loss", "training loss", 1, NEUTRAL[1], "dash"),
              ("val_loss", "validation loss", 1, NEUTRAL[0], "solid"),
              ("train_acc", "training accuracy", 2, NEUTRAL[1], "dash"),
              ("val_acc", "validation accuracy", 2, NEUTRAL[0], "solid"),
              ("val_macro_f1", "validation macro F1", 2, NEUTRAL[0], "dot"))
    for key, name, col, colour, dash in series:
        if any(key in h for h in history):
            fig.add_trace(go.Scatter(x=epochs, y=[h.get(key) for h in history], name=name,
                                     mode="lines+markers", line={"color": colour, "dash": dash,
                                                                 "width": 3}), row=1, col=col)
    fig.update_xaxes(title="Epoch", dtick=1 if len(epochs) <= 20 else None)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    return _style(fig, None, height=460).update_layout(legend={"y": -0.25})


def operating_figure(table: Any, cls: str, threshold: float) -> go.Figure:
    """Sensitivity, specificity, PPV and NPV of ``cls`` against the threshold
    (``core.operating.operating_table``), with the chosen threshold marked."""
    fig = go.Figure()
    series = (("sensitivity", "Sensitivity", NEUTRAL[0], "solid"),
              ("specificity", "Specificity", NEUTRAL[0], "dash"),
              ("ppv", "PPV", NEUTRAL[1], "solid"), ("npv", "NPV", NEUTRAL[1], "dash"))
    for key, name, colour, dash in series:
        fig.add_trace(go.Scatter(x=list(table["threshold"]), y=list(table[key]), name=name,
                                 mode="lines", line={"color": colour, "dash": dash, "width": 3}))
    fig.add_vline(x=threshold, line={"color": "#000000", "width": 2, "dash": "dashdot"},
                  annotation_text=f"threshold {threshold:.3f}",
                  annotation_position="top left" if threshold > 0.5 else "top right")
    fig.update_xaxes(title=f"Threshold on the {cls} probability", range=[0, 1])
    fig.update_yaxes(title="Value", range=[0, 1.08])
    return _style(fig, None, height=460)
