"""The evaluation report: metric sections, the shortcut probe's verdict, lung focus,
plain-language findings, the ``metrics.json`` document and the per-image records.

Pure computation on :class:`core.scoring.Predictions` (no model, no dataset), except
:func:`write_predictions_csv`. Schema: ``core/schemas/metrics.schema.json``, documented in
``docs/METRICS.md``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from core import metrics as M
from core import ood
from core.calibration import stored_calibration
from core.files import file_sha256
from core.model import library_versions, preprocess_config_of
from core.runs import SEVERITIES
from core.scoring import OCCLUSION_BOX, PROBE_LABELS, PROBES, Predictions

log = logging.getLogger(__name__)

SCHEMA_NAME = "cxr-insight-metrics"
SCHEMA_VERSION = 2  # 2: findings are {id, severity, text} records
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "metrics.schema.json"


# ---------------------------------------------------------------- metric sections (no I/O)


def score_predictions(
    preds: Predictions,
    *,
    temperature: float = 1.0,
    operating_point: dict[str, Any] | None = None,
    n_resamples: int = M.DEFAULT_RESAMPLES,
    seed: int = 0,
    prevalence: dict[str, float] | None = None,
    ece_bins: int = M.DEFAULT_ECE_BINS,
) -> dict[str, Any]:
    """Every metric section of the report for one set of predictions (pure computation).

    All figures use the calibrated probabilities softmax(logits / temperature); every CI
    comes from one shared stratified bootstrap (paired across sections).
    """
    y, classes = preds.y_true, preds.classes
    weights = M.bootstrap_weights(y, n_resamples, seed) if n_resamples > 0 else None
    proba = preds.proba(temperature)
    out: dict[str, Any] = {
        "n": len(y),
        "class_counts": {c: int((y == j).sum()) for j, c in enumerate(classes)},
        "calibration": {
            "temperature": float(temperature),
            "before": M.calibration_block(y, preds.proba(1.0), classes, weights, ece_bins),
            "after": M.calibration_block(y, proba, classes, weights, ece_bins),
        },
        "threshold_free": M.ranking_block(y, proba, classes, weights),
        "at_argmax": M.classification_block(y, proba.argmax(1), classes, weights, prevalence),
        "at_operating_point": None,
    }
    if operating_point is not None:
        j = classes.index(operating_point["class"])
        y_op = M.predict_at_threshold(proba, j, float(operating_point["threshold"]))
        out["at_operating_point"] = M.classification_block(y, y_op, classes, weights, prevalence)
    out["curves"] = M.curves(y, proba, classes)
    if preds.probe_logits:
        out["shortcut"] = shortcut_block(preds, temperature, weights)
    return out


def _probe_scores(y: np.ndarray, proba: np.ndarray, classes: list[str],
                  weights: np.ndarray | None) -> dict[str, Any]:
    cls = M.classification_block(y, proba.argmax(1), classes, weights)
    return {"accuracy": cls["overall"]["accuracy"], "macro_f1": cls["overall"]["macro_f1"],
            "macro_roc_auc": M.ranking_block(y, proba, classes, weights,
                                             average_precision=False)["macro_roc_auc"]}


def shortcut_block(preds: Predictions, temperature: float,
                   weights: np.ndarray | None) -> dict[str, Any]:
    """Occlusion probe figures beside chance, with a plain-language verdict."""
    y, classes = preds.y_true, preds.classes
    chance = float(np.bincount(y, minlength=len(classes)).max() / len(y))
    conditions = {"full": _probe_scores(y, preds.proba(temperature), classes, weights)}
    for probe in PROBES:
        conditions[probe] = _probe_scores(y, preds.proba(temperature, probe), classes, weights)
    level, verdict = shortcut_verdict(conditions, chance)
    return {
        "box_fraction": OCCLUSION_BOX,
        "fill": "per-image, per-channel mean of the preprocessed input",
        "chance_accuracy": round(chance, 6),
        "chance_accuracy_definition": "share of the most frequent class (always predicting it)",
        "chance_roc_auc": 0.5,
        "conditions": {k: {"description": PROBE_LABELS.get(k, "unmodified input"), **v}
                       for k, v in conditions.items()},
        "risk": level,
        "verdict": verdict,
    }


def shortcut_verdict(conditions: dict[str, dict[str, Any]], chance: float) -> tuple[str, str]:
    """(risk level, plain-language verdict) from the probe accuracies.

    ``high``: with the lungs hidden the model stays clearly above chance (95% CI above it)
    and keeps at least half of its above-chance accuracy; ``moderate``: clearly above chance
    but less; ``low``: not clearly above chance; ``inconclusive``: the model itself is not
    clearly above chance.
    """
    full, peri, centre = (conditions[k]["accuracy"] for k in ("full", *PROBES))
    if full["value"] is None or peri["value"] is None:
        return "inconclusive", "The probe could not be scored (accuracy undefined)."
    acc, p_acc = full["value"], peri["value"]
    p_lo = peri["ci95"][0] if peri["ci95"] else p_acc
    f_lo = full["ci95"][0] if full["ci95"] else acc
    centre_txt = (f" With only the centre kept, accuracy is {centre['value']:.0%}."
                  if centre["value"] is not None else "")
    pct = f"an accuracy of {p_acc:.0%}" + (
        f" (95% CI {peri['ci95'][0]:.0%}-{peri['ci95'][1]:.0%})" if peri["ci95"] else "")
    if f_lo <= chance:
        return "inconclusive", (
            f"The model itself is not clearly above chance (accuracy {acc:.0%}, chance "
            f"{chance:.0%}), so the occlusion probe cannot tell what it relies on.{centre_txt}")
    retained = (p_acc - chance) / (acc - chance)
    if p_lo > chance and retained >= 0.5:
        return "high", (
            f"SHORTCUT LIKELY. With the central {OCCLUSION_BOX:.0%} of every image blanked out "
            f"(lungs hidden) the model still reaches {pct} against {chance:.0%} chance, "
            f"keeping {retained:.0%} of its above-chance accuracy ({acc:.0%} on full images). "
            "It is reading the image source (text markers, borders, exposure, patient "
            "population), not the lungs: its accuracy is not evidence that it detects disease. "
            f"Validate it on an independent hospital's images (--external-dir).{centre_txt}")
    if p_lo > chance:
        return "moderate", (
            f"SHORTCUT POSSIBLE. With the lungs blanked out the model still reaches {pct}, "
            f"above {chance:.0%} chance (it keeps {retained:.0%} of its above-chance "
            f"accuracy): part of its decisions rest on the image periphery, i.e. on the "
            f"source rather than the lungs.{centre_txt}")
    return "low", (
        f"No shortcut signal from this probe: with the lungs blanked out the model falls to "
        f"{pct}, not clearly above {chance:.0%} chance. This does not rule out other "
        f"shortcuts inside the lung field; check external validation too.{centre_txt}")


# ---------------------------------------------------------------- lung focus


LUNG_FOCUS_DEFINITION = (
    "share of the Grad-CAM energy (layer4, predicted class) inside the lung mask, divided by "
    "the lungs' share of the original image (a lung view's map is zero outside its crop): "
    "1 = no preference, higher = on the lungs, 0 = entirely outside"
)


def _focus_stats(values: np.ndarray) -> dict[str, Any]:
    if not len(values):
        return {"n": 0, "mean": None, "median": None, "share_above_1": None}
    return {"n": int(len(values)), "mean": round(float(values.mean()), 6),
            "median": round(float(np.median(values)), 6),
            "share_above_1": round(float((values > 1.0).mean()), 6)}


def lung_focus_block(preds: Predictions, lung_view: str) -> dict[str, Any] | None:
    """Mean lung focus overall and per true class (images without a lung mask are left out
    and counted); None when it was not measured."""
    if preds.lung_focus is None or preds.mask_from_dataset is None:
        return None
    f = preds.lung_focus
    ok = np.isfinite(f)
    return {
        "definition": LUNG_FOCUS_DEFINITION,
        "lung_view": lung_view,
        "mask_source": {"dataset": int((preds.mask_from_dataset & ok).sum()),
                        "segmenter": int((~preds.mask_from_dataset & ok).sum())},
        "n_unscored": int((~ok).sum()),
        "overall": _focus_stats(f[ok]),
        "per_class": {c: _focus_stats(f[ok & (preds.y_true == k)])
                      for k, c in enumerate(preds.classes)},
    }


def drop_block(internal: dict[str, Any], external: dict[str, Any]) -> dict[str, Any]:
    """Internal minus external for the headline figures (positive = worse externally)."""

    def pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        va, vb = a["value"], b["value"]
        return {"internal": va, "external": vb,
                "drop": None if va is None or vb is None else round(va - vb, 6)}

    out = {
        "accuracy": pair(internal["at_argmax"]["overall"]["accuracy"],
                         external["at_argmax"]["overall"]["accuracy"]),
        "macro_f1": pair(internal["at_argmax"]["overall"]["macro_f1"],
                         external["at_argmax"]["overall"]["macro_f1"]),
        "macro_roc_auc": pair(internal["threshold_free"]["macro_roc_auc"],
                              external["threshold_free"]["macro_roc_auc"]),
        "per_class_roc_auc": {
            c: pair(v["roc_auc"], external["threshold_free"]["per_class"][c]["roc_auc"])
            for c, v in internal["threshold_free"]["per_class"].items()},
    }
    return out



EXTERNAL_DROP_HIGH = 0.10
EXTERNAL_DROP_MEDIUM = 0.03
"""Macro ROC-AUC drop (internal minus external) from which ``external-drop`` is high/medium."""


def _finding(id_: str, severity: str, text: str) -> dict[str, str]:
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} is not one of {SEVERITIES}")
    return {"id": id_, "severity": severity, "text": text}


def findings(doc: dict[str, Any]) -> list[dict[str, str]]:
    """Plain-language findings the dashboard shows first, as records ``{id, severity, text}``
    (in the report's order: shortcut, external, lungs, sources, calibration, operating point,
    run warnings). Ids and severities are listed in docs/METRICS.md."""
    out: list[dict[str, str]] = []
    sc = doc.get("shortcut")
    if sc and sc["risk"] in ("high", "moderate"):
        out.append(_finding("shortcut-risk", "high" if sc["risk"] == "high" else "medium",
                            sc["verdict"]))
    elif sc and sc["risk"] == "inconclusive":
        out.append(_finding("near-chance", "high", sc["verdict"]))
    ext = doc.get("external")
    if ext:
        d = ext["drop"]["macro_roc_auc"]
        if d["drop"] is not None:
            drop = d["drop"]
            severity = ("high" if drop >= EXTERNAL_DROP_HIGH else "medium"
                        if drop >= EXTERNAL_DROP_MEDIUM else "low" if drop > 0 else "info")
            out.append(_finding(
                "external-drop", severity,
                f"External validation ({ext['n']} images): macro ROC-AUC "
                f"{d['internal']:.3f} internally vs {d['external']:.3f} on the external "
                f"set (drop {drop:+.3f})."))
        if ext.get("overlap_with_manifest"):
            out.append(_finding(
                "external-overlap", "high",
                f"{ext['overlap_with_manifest']} external images are byte-identical to "
                "images of this run's dataset: the external set is not independent."))
    lf = (doc.get("lung_focus") or {}).get("overall") or {}
    if lf.get("mean") is not None and lf["mean"] < 1.0:
        out.append(_finding(
            "low-lung-focus", "medium",
            f"Grad-CAM puts less of its energy on the lungs than a uniform map would "
            f"(mean lung-focus ratio {lf['mean']:.2f} < 1 over {lf['n']} images): the "
            "model looks mostly outside the lungs."))
    src = doc.get("sources") or {}
    if src.get("confounded"):
        out.append(_finding(
            "confounded-sources", "high",
            "Every image source contributes to a single class: source and class are "
            "confounded, so the model can separate classes by source alone."))
    cal = doc["calibration"]
    if not cal["fitted"]:
        out.append(_finding("uncalibrated", "medium",
                            "Probabilities are not calibrated (the checkpoint has no "
                            "temperature); rerun with --calibrate."))
    op = doc.get("operating_point")
    if op is None:
        out.append(_finding("no-operating-point", "low",
                            "No operating point is stored in the checkpoint: only argmax "
                            "metrics are reported (rerun with --calibrate)."))
    elif doc.get("at_operating_point"):
        sens = doc["at_operating_point"]["per_class"][op["class"]]["sensitivity"]
        if sens["value"] is not None and sens["value"] < op["target_sensitivity"]:
            out.append(_finding(
                "op-sensitivity-drop", "medium",
                f"At the operating point {op['class']} sensitivity is {sens['value']:.3f} "
                f"on this set, below the {op['target_sensitivity']:.2f} target reached on "
                "validation."))
    for i, text in enumerate(doc["run"].get("warnings", [])):
        out.append(_finding(f"run-warning-{i + 1}", "medium", text))
    return out


def build_document(
    ckpt: dict[str, Any],
    checkpoint: Path,
    preds: Predictions,
    *,
    data_dir: str | Path,
    split: str,
    n_resamples: int,
    seed: int,
    prevalence: dict[str, float] | None,
    calibration_source: str,
    notes: list[str],
) -> dict[str, Any]:
    temperature, op = stored_calibration(ckpt)
    scores = score_predictions(preds, temperature=temperature, operating_point=op,
                               n_resamples=n_resamples, seed=seed, prevalence=prevalence)
    scores["calibration"]["fitted"] = "temperature" in ckpt
    scores["calibration"]["source"] = calibration_source
    if op is not None:
        op = {**op, "rule": (f"{op['class']} when its calibrated probability >= "
                             f"{op['threshold']:.6g}, otherwise the most probable other class")}
    doc: dict[str, Any] = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint),
            "arch": ckpt.get("arch"),
            "epoch": ckpt.get("epoch"),
            "manifest_sha256": ckpt.get("manifest_sha256"),
            "data_dir": str(data_dir),
            "split": split,
            "lung_view": preprocess_config_of(ckpt).lung_view,
            "classes": list(preds.classes),
            "versions": library_versions(),
            "warnings": list(notes),
        },
        "settings": {
            "bootstrap": {"resamples": n_resamples, "seed": seed, "stratified": True,
                          "method": "percentile", "ci_level": M.CI_LEVEL},
            "prevalence": prevalence or {},
            "ece_bins": M.DEFAULT_ECE_BINS,
        },
        "operating_point": op,
        # the headline figures (as the reference notebook reported them), at argmax
        "overall": {**scores["at_argmax"]["overall"],
                    "macro_roc_auc": scores["threshold_free"]["macro_roc_auc"]},
        **scores,
    }
    doc["shortcut"] = doc.get("shortcut")
    return doc


RECORD_COLUMNS = ("path", "true_class", "predicted_class", "predicted_class_at_operating_point",
                  "prob_<class>", "correct", "periphery_pred", "centre_pred", "lung_focus",
                  "ood_score", "ood", "low_confidence")
"""The columns of ``predictions.csv`` (``prob_<class>``: one per class), docs/METRICS.md."""


def image_records(preds: Predictions, temperature: float, op: dict[str, Any] | None,
                  ckpt: dict[str, Any] | None = None) -> list[list[Any]]:
    """The per-image records (header first) of ``predictions.csv``; see ``RECORD_COLUMNS``.

    Empty cells: ``predicted_class_at_operating_point`` without an operating point, the probe
    columns without the occlusion probe, ``lung_focus`` where it was not scored, and
    ``ood_score``/``ood``/``low_confidence`` where the checkpoint (``ckpt``) has no OOD
    statistics or low-confidence cut-off (:func:`core.ood.image_flags`).
    """
    classes = preds.classes
    proba = preds.proba(temperature)
    pred = proba.argmax(1)
    y_op = (M.predict_at_threshold(proba, classes.index(op["class"]), op["threshold"])
            if op else None)
    probe = {k: preds.proba(temperature, k).argmax(1) for k in PROBES if k in preds.probe_logits}
    flags = ood.image_flags(ckpt or {}, preds.pooled, proba)

    def cell(arr: np.ndarray | None, i: int, fmt: str = "") -> str:
        if arr is None:
            return ""
        v = arr[i]
        if isinstance(v, np.bool_ | bool):
            return str(bool(v))
        return f"{float(v):{fmt}}" if np.isfinite(v) else ""

    rows: list[list[Any]] = [[*RECORD_COLUMNS[:4], *[f"prob_{c}" for c in classes],
                              *RECORD_COLUMNS[5:]]]
    for i, p in enumerate(preds.paths):
        rows.append([
            p, classes[preds.y_true[i]], classes[int(pred[i])],
            "" if y_op is None else classes[int(y_op[i])],
            *[f"{v:.6f}" for v in proba[i]],
            str(bool(pred[i] == preds.y_true[i])),
            *[classes[int(probe[k][i])] if k in probe else "" for k in PROBES],
            cell(preds.lung_focus, i, ".6f"),
            cell(flags["ood_score"], i, ".10g"), cell(flags["ood"], i),
            cell(flags["low_confidence"], i),
        ])
    return rows


def write_predictions_csv(path: Path, preds: Predictions, temperature: float,
                          op: dict[str, Any] | None, ckpt: dict[str, Any] | None = None) -> None:
    """Write :func:`image_records` atomically."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(image_records(preds, temperature, op, ckpt))
    tmp.replace(path)


def validate_document(doc: dict[str, Any]) -> None:
    """Validate against ``core/schemas/metrics.schema.json`` (skipped without jsonschema)."""
    try:
        import jsonschema
    except ImportError:  # optional at run time; the tests always validate
        log.debug("jsonschema not installed; metrics.json not validated")
        return
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(doc, schema)

