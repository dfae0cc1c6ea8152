"""Clinical classification metrics with bootstrap confidence intervals (NumPy + scikit-learn).

No torch here: every function takes arrays (true class indices, predicted class indices,
per-class probabilities or logits) and returns numbers or JSON-ready dicts, so the same code
serves evaluation, the benchmark and the tests.

Conventions

* ``y_true`` and ``y_pred`` are integer class indices into ``classes``; ``proba`` is an
  ``(n, K)`` array of probabilities whose rows sum to 1.
* A metric whose denominator is empty is *undefined*: its value is ``None`` and
  ``undefined_reason`` says why (never a silent 0, never an exception).
* Confidence intervals are 95% percentile intervals from a stratified bootstrap: each
  resample draws, with replacement, as many images of every true class as the set holds, so
  class supports (and hence sensitivity's denominators) are the same in every resample. A
  resample is represented by a row of multiplicity weights (how often each image was
  drawn); all metrics are then computed for all resamples at once from those weights.

Why some formulas are written by hand although scikit-learn has them: point estimates of
ROC-AUC, average precision, log loss, Brier score and the curves come from scikit-learn, and
the tests check every hand-written formula against scikit-learn. The count-based metrics
(sensitivity ... kappa) are computed from stacks of confusion matrices, and ROC-AUC, average
precision and ECE from weight matrices, because calling scikit-learn once per resample
(1,000 resamples x a dozen metrics x two decision rules) takes minutes, while the
vectorised forms take well under a second, and because scikit-learn's ``zero_division``
turns an undefined metric into a number instead of a reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

CI_LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
DEFAULT_ECE_BINS = 15

PER_CLASS_RATES = ("sensitivity", "specificity", "ppv", "npv", "f1")
OVERALL = ("accuracy", "macro_f1", "weighted_f1", "weighted_recall", "cohen_kappa")


# ---------------------------------------------------------------- the Metric value


@dataclass(frozen=True)
class Metric:
    """A point estimate, its 95% interval, and why it is undefined when it is."""

    value: float | None
    ci95: tuple[float, float] | None = None
    undefined_reason: str | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "value": _round(self.value),
            "ci95": None if self.ci95 is None else [_round(self.ci95[0]), _round(self.ci95[1])],
            "undefined_reason": self.undefined_reason,
        }
        if self.note:
            out["note"] = self.note
        return out


def _round(v: float | None, digits: int = 6) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), digits)


def percentile_ci(samples: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Percentile interval over the resamples where the metric is defined (not NaN)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def make_metric(value: float, samples: np.ndarray | None, reason: str | None = None,
                note: str | None = None) -> Metric:
    """A Metric from a point value (NaN = undefined) and its bootstrap samples."""
    if value is None or not np.isfinite(value):
        return Metric(None, None, reason or "undefined (empty denominator)", note)
    ci = percentile_ci(samples) if samples is not None else None
    if samples is not None and ci is not None:
        n_def = int(np.isfinite(samples).sum())
        if n_def < len(samples):
            extra = f"interval from the {n_def} of {len(samples)} resamples where it is defined"
            note = f"{note}; {extra}" if note else extra
    return Metric(float(value), ci, None, note)


# ---------------------------------------------------------------- bootstrap resamples


def bootstrap_weights(y_true: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> np.ndarray:
    """Stratified bootstrap as a ``(n_resamples, n)`` matrix of multiplicity weights.

    Row ``b`` says how many times each image appears in resample ``b``; within each true
    class exactly as many images are drawn as the class holds. Same seed -> same matrix.
    """
    y = np.asarray(y_true)
    n = len(y)
    rng = np.random.default_rng(seed)
    flat = []  # flat indices b * n + i of every draw
    offsets = (np.arange(n_resamples) * n)[:, None]
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        flat.append((offsets + draws).ravel())
    counts = np.bincount(np.concatenate(flat) if flat else np.zeros(0, int),
                         minlength=n_resamples * n)
    return counts.reshape(n_resamples, n).astype(np.float64)


# ---------------------------------------------------------------- count-based metrics


def weighted_confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int,
                       weights: np.ndarray) -> np.ndarray:
    """``(B, K, K)`` confusion matrices (rows: truth, columns: prediction) for weight rows."""
    cell = np.asarray(y_true) * k + np.asarray(y_pred)
    onehot = np.zeros((len(cell), k * k))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (np.atleast_2d(weights) @ onehot).reshape(-1, k, k)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN (undefined) where den == 0, without warnings."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _mean_defined(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the entries selected by ``mask`` (NaN if none)."""
    sel = np.where(mask, x, 0.0)
    return _div(sel.sum(-1), np.broadcast_to(mask, x.shape).sum(-1))


def counts_to_metrics(cm: np.ndarray, prevalence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All count-based metrics from confusion matrices of shape ``(..., K, K)``.

    Per class (one-vs-rest, shape ``(..., K)``): tp, fp, fn, tn, support, sensitivity,
    specificity, ppv, npv, f1 and, when ``prevalence`` (one value per class, NaN = not set)
    is given, ppv/npv at that prevalence by Bayes' rule. Overall (shape ``(...)``):
    accuracy, macro_f1 (over classes where F1 is defined), weighted_f1, weighted_recall and
    Cohen's kappa. Undefined values are NaN.
    """
    cm = np.asarray(cm, dtype=float)
    n = cm.sum(axis=(-2, -1))
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(-1)
    predicted = cm.sum(-2)
    fn = support - tp
    fp = predicted - tp
    tn = n[..., None] - tp - fn - fp
    out = {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "support": support}
    out["sensitivity"] = _div(tp, tp + fn)
    out["specificity"] = _div(tn, tn + fp)
    out["ppv"] = _div(tp, tp + fp)
    out["npv"] = _div(tn, tn + fn)
    out["f1"] = _div(2 * tp, 2 * tp + fp + fn)
    if prevalence is not None:
        out.update(prevalence_adjusted(out["sensitivity"], out["specificity"], prevalence))
    out["accuracy"] = _div(tp.sum(-1), n)
    out["macro_f1"] = _mean_defined(out["f1"], np.isfinite(out["f1"]))
    out["weighted_f1"] = _div((np.nan_to_num(out["f1"]) * support).sum(-1), n)
    out["weighted_recall"] = _div((np.nan_to_num(out["sensitivity"]) * support).sum(-1), n)
    expected = _div((support * predicted).sum(-1), n * n)
    out["cohen_kappa"] = _div(out["accuracy"] - expected, 1.0 - expected)
    return out


def prevalence_adjusted(sensitivity: np.ndarray, specificity: np.ndarray,
                        prevalence: np.ndarray) -> dict[str, np.ndarray]:
    """PPV and NPV at an assumed prevalence p (Bayes' rule).

    PPV = sens*p / (sens*p + (1-spec)*(1-p));  NPV = spec*(1-p) / (spec*(1-p) + (1-sens)*p).
    """
    p = np.asarray(prevalence, dtype=float)
    sens, spec = np.asarray(sensitivity, float), np.asarray(specificity, float)
    ppv = _div(sens * p, sens * p + (1 - spec) * (1 - p))
    npv = _div(spec * (1 - p), spec * (1 - p) + (1 - sens) * p)
    return {"ppv_at_prevalence": ppv, "npv_at_prevalence": npv}


def _class_reasons(name: str, cls: str, tp: float, fp: float, fn: float, tn: float,
                   prevalence: float | None = None) -> str | None:
    reasons = {
        "sensitivity": (tp + fn == 0, f"no {cls} cases in the set (TP+FN=0)"),
        "specificity": (tn + fp == 0, f"every case in the set is {cls} (TN+FP=0)"),
        "ppv": (tp + fp == 0, f"the model never predicted {cls} (TP+FP=0)"),
        "npv": (tn + fn == 0, f"the model predicted {cls} for every image (TN+FN=0)"),
        "f1": (tp + fp + fn == 0, f"no {cls} cases and never predicted (TP+FP+FN=0)"),
    }
    if name in reasons:
        bad, why = reasons[name]
        return why if bad else None
    if name in ("ppv_at_prevalence", "npv_at_prevalence"):
        for dep in ("sensitivity", "specificity"):
            why = _class_reasons(dep, cls, tp, fp, fn, tn)
            if why:
                return f"needs {dep}, which is undefined: {why}"
        return f"empty denominator at prevalence {prevalence}"
    return None


def classification_block(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    weights: np.ndarray | None = None,
    prevalence: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per-class and overall count-based metrics with bootstrap CIs, JSON-ready.

    ``weights``: bootstrap weight rows (:func:`bootstrap_weights`); ``None`` gives point
    estimates only. ``prevalence``: class -> assumed prevalence for PPV/NPV.
    """
    k = len(classes)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    cm = (confusion_matrix(y_true, y_pred, labels=list(range(k))).astype(float) if len(y_true)
          else np.zeros((k, k)))  # scikit-learn refuses empty input; an empty set is undefined
    prev = _prevalence_vector(classes, prevalence)
    point = counts_to_metrics(cm, prev)
    boot = (counts_to_metrics(weighted_confusion(y_true, y_pred, k, weights), prev)
            if weights is not None else None)

    per_class: dict[str, Any] = {}
    for j, cls in enumerate(classes):
        c = {m: float(point[m][j]) for m in ("tp", "fp", "fn", "tn")}
        entry: dict[str, Any] = {"support": int(point["support"][j]),
                                 **{m: int(v) for m, v in c.items()}}
        names = list(PER_CLASS_RATES)
        if prev is not None and np.isfinite(prev[j]):
            entry["prevalence"] = float(prev[j])
            names += ["ppv_at_prevalence", "npv_at_prevalence"]
        for m in names:
            why = _class_reasons(m, cls, c["tp"], c["fp"], c["fn"], c["tn"],
                                 None if prev is None else float(prev[j]))
            samples = None if boot is None else boot[m][:, j]
            entry[m] = make_metric(point[m][j], samples, why).to_json()
        per_class[cls] = entry

    overall = {m: make_metric(point[m], None if boot is None else boot[m],
                              _overall_reason(m, point, classes),
                              _overall_note(m, point, classes)).to_json()
               for m in OVERALL}
    return {
        "n": int(cm.sum()),
        "overall": overall,
        "per_class": per_class,
        "confusion_matrix": confusion_block(cm, classes),
    }


def _prevalence_vector(classes: Sequence[str], prevalence: dict[str, float] | None) -> np.ndarray | None:
    if not prevalence:
        return None
    return np.array([float(prevalence.get(c, np.nan)) for c in classes])


def _overall_reason(name: str, point: dict[str, np.ndarray], classes: Sequence[str]) -> str | None:
    if np.isfinite(point[name]):
        return None
    if point["support"].sum() == 0:
        return "the set is empty"
    if name == "cohen_kappa":
        return "expected agreement is 1: truth and predictions each hold a single, same class"
    if name == "macro_f1":
        return "F1 is undefined for every class"
    return "empty denominator"


def _overall_note(name: str, point: dict[str, np.ndarray], classes: Sequence[str]) -> str | None:
    if name == "weighted_recall":
        return "equals accuracy by definition; shown only for parity with the reference notebook"
    if name == "macro_f1":
        missing = [c for c, v in zip(classes, point["f1"], strict=True) if not np.isfinite(v)]
        if missing and len(missing) < len(classes):
            return (f"averaged over {len(classes) - len(missing)} of {len(classes)} classes; "
                    f"F1 undefined for: {', '.join(missing)}")
    return None


def confusion_block(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Counts and row-normalised confusion matrix (rows: truth); empty rows are null."""
    rows = cm.sum(1)
    norm = [[_round(v) for v in row / total] if total else None
            for row, total in zip(cm, rows, strict=True)]
    return {
        "labels": list(classes),
        "counts": cm.astype(int).tolist(),
        "row_normalised": norm,
        "empty_rows": [c for c, total in zip(classes, rows, strict=True) if not total],
    }


# ---------------------------------------------------------------- threshold-free metrics


def _grouped_weights(positive: np.ndarray, score: np.ndarray, weights: np.ndarray,
                     descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positive weight and total weight per group of tied scores, groups in score order.

    Returns two ``(B, G)`` arrays; sorting happens once for all weight rows.
    """
    score = np.asarray(score, float)
    order = np.argsort(-score if descending else score, kind="mergesort")
    s = score[order]
    posf = np.asarray(positive, bool)[order].astype(float)
    total = np.atleast_2d(weights)[:, order]
    pos_w = total * posf
    tied = s[1:] == s[:-1]
    if tied.any():
        starts = np.flatnonzero(np.r_[True, ~tied])
        pos_w = np.add.reduceat(pos_w, starts, axis=1)
        total = np.add.reduceat(total, starts, axis=1)
    return pos_w, total


def weighted_roc_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC (Mann-Whitney, ties count 1/2) for every weight row; NaN where a side is empty.

    Equals ``sklearn.metrics.roc_auc_score(positive, score, sample_weight=w)`` per row, but
    sorts once for all resamples.
    """
    w = np.atleast_2d(weights)
    if w.shape[1] == 0:
        return np.full(w.shape[0], np.nan)
    pos_g, total = _grouped_weights(positive, score, w, descending=False)
    neg_g = total - pos_g
    neg_upto = np.cumsum(neg_g, axis=1)  # negatives scoring <= each group
    # each positive beats the negatives below it and ties half of those in its own group
    num = np.einsum("ij,ij->i", pos_g, neg_upto) - 0.5 * np.einsum("ij,ij->i", pos_g, neg_g)
    return _div(num, pos_g.sum(1) * neg_upto[:, -1])


def weighted_average_precision(positive: np.ndarray, score: np.ndarray,
                               weights: np.ndarray) -> np.ndarray:
    """Average precision, sum over thresholds of (recall step) x precision, per weight row.

    Equals ``sklearn.metrics.average_precision_score(positive, score, sample_weight=w)``.
    The recall step at a threshold is (positives there) / P, so AP = sum(pos_g x prec) / P.
    """
    w = np.atleast_2d(weights)
    if w.shape[1] == 0:
        return np.full(w.shape[0], np.nan)
    pos_g, total = _grouped_weights(positive, score, w, descending=True)
    tps = np.cumsum(pos_g, axis=1)
    predicted = np.cumsum(total, axis=1)
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted > 0)
    return _div(np.einsum("ij,ij->i", pos_g, precision), tps[:, -1])


def _sklearn_or_nan(fn: Any, positive: np.ndarray, score: np.ndarray) -> float:
    if positive.all() or not positive.any():
        return float("nan")
    return float(fn(positive, score))


def ranking_block(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    weights: np.ndarray | None = None,
    average_precision: bool = True,
) -> dict[str, Any]:
    """One-vs-rest ROC-AUC and average precision (unless turned off) per class, macro ROC-AUC."""
    y_true, proba = np.asarray(y_true), np.asarray(proba, float)
    per_class: dict[str, Any] = {}
    aucs, auc_boot = [], []
    for j, cls in enumerate(classes):
        positive = y_true == j
        reason = (f"no {cls} cases in the set" if not positive.any() else
                  f"every case in the set is {cls} (no negatives)" if positive.all() else None)
        auc = _sklearn_or_nan(roc_auc_score, positive, proba[:, j])
        ap = (float(average_precision_score(positive, proba[:, j]))
              if positive.any() and average_precision else float("nan"))
        ap_reason = f"no {cls} cases in the set" if not positive.any() else None
        b_auc = b_ap = None  # resampled only where the point estimate is defined
        if weights is not None and np.isfinite(auc):
            b_auc = weighted_roc_auc(positive, proba[:, j], weights)
        if weights is not None and np.isfinite(ap):
            b_ap = weighted_average_precision(positive, proba[:, j], weights)
        per_class[cls] = {"roc_auc": make_metric(auc, b_auc, reason).to_json()}
        if average_precision:
            per_class[cls]["average_precision"] = make_metric(ap, b_ap, ap_reason).to_json()
        aucs.append(auc)
        auc_boot.append(b_auc)
    return {"per_class": per_class, "macro_roc_auc": _macro_auc(classes, aucs, auc_boot)}


def _macro_auc(classes: Sequence[str], aucs: list[float],
               boots: list[np.ndarray | None]) -> dict[str, Any]:
    defined = np.isfinite(aucs)
    if not defined.any():
        return Metric(None, None, "ROC-AUC is undefined for every class").to_json()
    value = float(np.mean(np.asarray(aucs)[defined]))
    samples = None
    defined_boots = [b for b, d in zip(boots, defined, strict=True) if d and b is not None]
    if defined_boots:
        stack = np.stack(defined_boots, axis=1)
        samples = _mean_defined(stack, np.isfinite(stack))
    missing = [c for c, d in zip(classes, defined, strict=True) if not d]
    note = (f"averaged over {int(defined.sum())} of {len(classes)} classes; ROC-AUC undefined "
            f"for: {', '.join(missing)}") if missing else None
    return make_metric(value, samples, None, note).to_json()


def curves(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """ROC and precision-recall curve points per class (scikit-learn), for plotting.

    Thresholds of +inf (scikit-learn's "predict nothing" point) are stored as null.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba, float)
    roc: dict[str, Any] = {}
    pr: dict[str, Any] = {}
    for j, cls in enumerate(classes):
        positive = y_true == j
        if positive.all() or not positive.any():
            roc[cls] = None
        else:
            fpr, tpr, thr = roc_curve(positive, proba[:, j], drop_intermediate=True)
            roc[cls] = {"fpr": _list(fpr), "tpr": _list(tpr), "thresholds": _list(thr)}
        if not positive.any():
            pr[cls] = None
        else:
            prec, rec, thr = precision_recall_curve(positive, proba[:, j], drop_intermediate=True)
            pr[cls] = {"precision": _list(prec), "recall": _list(rec), "thresholds": _list(thr)}
    return {"roc": roc, "pr": pr}


def _list(a: np.ndarray) -> list[float | None]:
    return [_round(float(v)) for v in a]


# ---------------------------------------------------------------- calibration


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, float) / float(temperature), axis=1)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T)."""
    lp = log_softmax(np.asarray(logits, float) / float(temperature), axis=1)
    return float(-lp[np.arange(len(y_true)), np.asarray(y_true)].mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017).

    Hand-written (a 1-D bounded search on log T with SciPy): scikit-learn's temperature
    calibration wraps a fitted estimator, while here we only have stored logits.
    """
    if len(y_true) == 0:
        return 1.0
    res = minimize_scalar(lambda lt: nll(logits, y_true, math.exp(lt)),
                          bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


def _ece_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin b holds confidences in [b/n_bins, (b+1)/n_bins); 1.0 goes in the last bin."""
    return np.minimum((np.asarray(conf) * n_bins).astype(int), n_bins - 1)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = DEFAULT_ECE_BINS,
                               weights: np.ndarray | None = None) -> np.ndarray:
    """Top-label ECE: sum over equal-width bins of |bin share| x |accuracy - confidence|.

    Hand-written (scikit-learn has calibration_curve for one class, no multi-class ECE);
    vectorised over bootstrap weight rows. Returns shape ``(B,)`` (``(1,)`` without weights).
    """
    proba = np.asarray(proba, float)
    conf = proba.max(1)
    gap = (proba.argmax(1) == np.asarray(y_true)).astype(float) - conf
    onehot = np.zeros((len(conf), n_bins))
    onehot[np.arange(len(conf)), _ece_bins(conf, n_bins)] = 1.0
    w = np.ones((1, len(conf))) if weights is None else np.atleast_2d(weights)
    per_bin = w @ (onehot * gap[:, None])
    return _div(np.abs(per_bin).sum(1), w.sum(1))


def reliability_diagram(y_true: np.ndarray, proba: np.ndarray,
                        n_bins: int = DEFAULT_ECE_BINS) -> list[dict[str, Any]]:
    """Per bin: edges, count, mean confidence and accuracy (null for empty bins)."""
    proba = np.asarray(proba, float)
    conf = proba.max(1)
    correct = proba.argmax(1) == np.asarray(y_true)
    bins = _ece_bins(conf, n_bins)
    out = []
    for b in range(n_bins):
        sel = bins == b
        n = int(sel.sum())
        out.append({
            "lower": _round(b / n_bins), "upper": _round((b + 1) / n_bins), "count": n,
            "mean_confidence": _round(float(conf[sel].mean())) if n else None,
            "accuracy": _round(float(correct[sel].mean())) if n else None,
        })
    return out


def ece_metric(plug_in: float, samples: np.ndarray | None) -> Metric:
    """ECE with a bootstrap bias correction, and the interval moved with it.

    The plug-in ECE (a sum of absolute gaps) is biased upwards by noise, ``b``, and a
    resample's ECE stacks its own noise on top: resamples centre near ``plug_in + b``,
    i.e. near ``true + 2b``. So the plain percentile interval sits above the plug-in value
    and can exclude it (the report showed "0.046 [0.049, 0.129]"). Here ``b`` is estimated as
    ``median(resamples) - plug_in``; the reported value is ``plug_in - b`` and the interval
    is the percentile interval moved down by ``2b`` (its width kept), both floored at 0. As
    the median lies between the 2.5 % and 97.5 % quantiles, the value always lies inside its
    interval. The plug-in value (what the reliability diagram adds up to) is in the note.
    """
    if samples is None or not np.isfinite(plug_in):
        return make_metric(plug_in, samples, "the set is empty")
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    ci = percentile_ci(s)
    if ci is None:
        return make_metric(plug_in, samples, "the set is empty")
    bias = float(np.median(s)) - float(plug_in)
    value = max(0.0, float(plug_in) - bias)
    note = (f"bootstrap bias-corrected (plug-in ECE {plug_in:.4f}, estimated bias {bias:+.4f}; "
            "interval: the resamples' percentile interval moved down by twice that bias)")
    return Metric(value, (max(0.0, ci[0] - 2 * bias), max(0.0, ci[1] - 2 * bias)), None, note)


def calibration_block(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str],
                      weights: np.ndarray | None = None,
                      n_bins: int = DEFAULT_ECE_BINS) -> dict[str, Any]:
    """ECE (with CI), NLL, multi-class Brier score and reliability-diagram data."""
    y_true, proba = np.asarray(y_true), np.asarray(proba, float)
    labels = list(range(len(classes)))
    empty = len(y_true) == 0
    ece = float("nan") if empty else float(expected_calibration_error(y_true, proba, n_bins)[0])
    boot = None if weights is None or empty else expected_calibration_error(y_true, proba, n_bins, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when a class is absent from y_true
        nll_v = None if empty else float(log_loss(y_true, np.clip(proba, 1e-15, 1), labels=labels))
        brier = None if empty else float(brier_score_loss(y_true, proba, labels=labels,
                                                          scale_by_half=False))
    return {
        "ece": ece_metric(ece, boot).to_json(),
        "nll": _round(nll_v),
        "brier": _round(brier),
        "reliability": reliability_diagram(y_true, proba, n_bins) if not empty else [],
    }


# ---------------------------------------------------------------- operating point


def threshold_for_sensitivity(score: np.ndarray, positive: np.ndarray,
                              target: float) -> tuple[float, float]:
    """Highest threshold t with sensitivity(score >= t) >= target; returns (t, sensitivity).

    The k-th highest positive score, k = ceil(target x positives): at least k positives
    reach it (ties only add more), and no higher threshold does.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
    pos_scores = np.sort(np.asarray(score, float)[np.asarray(positive, bool)])[::-1]
    if pos_scores.size == 0:
        raise ValueError("no positive cases: cannot choose a threshold for a target sensitivity")
    k = max(1, math.ceil(target * pos_scores.size - 1e-9))
    thr = float(pos_scores[k - 1])
    return thr, float((pos_scores >= thr).mean())


def predict_at_threshold(proba: np.ndarray, screen: int, threshold: float) -> np.ndarray:
    """The screening class where its probability reaches ``threshold``, else the most
    probable of the other classes."""
    proba = np.asarray(proba, float)
    others = proba.copy()
    others[:, screen] = -np.inf
    return np.where(proba[:, screen] >= threshold, screen, others.argmax(1))
