"""Evaluation: calibration, operating point, clinical metrics report and shortcut checks.

``python -m core.evaluate --checkpoint models/<run>/best.pt --data-dir D --split test``
writes ``metrics.json`` (schema ``core/schemas/metrics.schema.json``, documented in
``docs/METRICS.md``) and ``predictions.csv`` into ``models/<run>/report/``. The dashboard
reads that report; it never recomputes metrics.

Flow

1. Calibration (validation split only, :func:`recalibrate_checkpoint`): fit a temperature on
   the validation logits, then choose the operating point on the calibrated validation
   probabilities: the highest threshold on the screening class (COVID by default) whose
   validation sensitivity reaches the target (0.95 by default). Both are written into the
   checkpoint (atomically). Training does this at its end (:func:`finalize_run`);
   ``--calibrate`` redoes it for an older run.
2. Evaluation (:func:`evaluate`): predictions on a split of the run's manifest (and on an
   optional external folder), then every metric with stratified-bootstrap 95% intervals,
   at argmax and at the operating point, calibration before/after temperature scaling,
   curve points, an occlusion probe for shortcuts and, where the dataset has
   ``<Class>.metadata.xlsx``, the image sources per class. Evaluation never writes a
   checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from core import metrics as M
from core import ood
from core.config import PreprocessConfig, default_data_dir
from core.data import CXRDataset, discover, load_manifest
from core.devices import resolve_device
from core.errors import CheckpointError, ConfigError, CXRError, DatasetError
from core.model import (
    library_versions,
    load_checkpoint,
    model_from_checkpoint,
    preprocess_config_of,
    save_checkpoint,
)
from core.preprocess import build_transform
from core.runs import SEVERITIES, file_sha256, write_json

log = logging.getLogger(__name__)

SCHEMA_NAME = "cxr-insight-metrics"
SCHEMA_VERSION = 2  # 2: findings are {id, severity, text} records
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "metrics.schema.json"

DEFAULT_SCREENING_CLASS = "COVID"
DEFAULT_TARGET_SENSITIVITY = 0.95
OCCLUSION_BOX = 0.70  # the central box covers 70% of the input's width and height
PROBES = ("periphery", "centre")
PROBE_LABELS = {
    "periphery": "periphery only (central 70% box filled with the image mean)",
    "centre": "centre only (everything outside the central 70% box filled with the image mean)",
}


# ---------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """Model outputs on a list of images (logits before any temperature)."""

    paths: list[str]
    y_true: np.ndarray  # (n,) int class indices
    logits: np.ndarray  # (n, K) float64
    classes: list[str]
    probe_logits: dict[str, np.ndarray] = field(default_factory=dict)  # occlusion probes
    # per image: Grad-CAM lung-focus ratio (nan: no lung mask) and whether its mask came
    # from the dataset (else from the segmenter); None when not measured
    lung_focus: np.ndarray | None = None
    mask_from_dataset: np.ndarray | None = None
    # per image: pooled activations of each ResNet stage (``core.ood.pooled_layer_features``)
    # for the OOD score; None when not computed
    pooled: dict[str, np.ndarray] | None = None

    def proba(self, temperature: float = 1.0, probe: str | None = None) -> np.ndarray:
        logits = self.logits if probe is None else self.probe_logits[probe]
        return M.softmax_t(logits, temperature)


def central_box(h: int, w: int, frac: float = OCCLUSION_BOX) -> tuple[slice, slice]:
    """Row and column slices of the centred box covering ``frac`` of height and width."""
    bh, bw = round(h * frac), round(w * frac)
    top, left = (h - bh) // 2, (w - bw) // 2
    return slice(top, top + bh), slice(left, left + bw)


def occlude(x: torch.Tensor, keep: str, frac: float = OCCLUSION_BOX) -> torch.Tensor:
    """Occlusion probe on a preprocessed batch ``(B, C, H, W)``.

    ``keep="periphery"``: the central box is filled with each input's per-channel mean;
    ``keep="centre"``: everything outside the box is filled instead.
    """
    rows, cols = central_box(x.shape[-2], x.shape[-1], frac)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    if keep == "periphery":
        out = x.clone()
        out[..., rows, cols] = mean.expand_as(out[..., rows, cols])
        return out
    if keep == "centre":
        out = mean.expand_as(x).clone()
        out[..., rows, cols] = x[..., rows, cols]
        return out
    raise ValueError(f"keep must be one of {PROBES}, got {keep!r}")


def evaluation_dataset(root: str | Path, rows: Sequence[dict[str, str]], classes: Sequence[str],
                       pcfg: PreprocessConfig, lung_masks: bool = False) -> CXRDataset:
    """The images of ``rows`` as evaluation sees them (the checkpoint's contract, no
    augmentation); see :class:`core.data.CXRDataset` for ``lung_masks``."""
    return CXRDataset(root, rows, classes, build_transform(pcfg), lung_masks=lung_masks)


def predict_rows(
    model: nn.Module,
    root: str | Path,
    rows: Sequence[dict[str, str]],
    classes: Sequence[str],
    pcfg: PreprocessConfig,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    workers: int = 0,
    occlusion: bool = False,
    lung_focus: bool = False,
    features: bool = False,
    progress: bool = True,
    desc: str = "predict",
) -> Predictions:
    """Batched inference (eval mode, ``torch.inference_mode``, fp32) over manifest-style rows.

    ``rows``: dicts with ``path`` (relative to ``root``) and ``class``. With ``occlusion``
    the periphery-only and centre-only probes run on the same preprocessed batches. With
    ``lung_focus`` the same forward pass also gives each image's Grad-CAM (layer4, predicted
    class; ``core.gradcam.forward_with_cam``): its energy share on the lungs (on the model
    input's grid, padding excluded) over the lungs' share of the original image, as
    ``core.lungs.lung_focus_ratio`` of the map placed back on the original image. With
    ``features`` each image's pooled stage activations (``core.ood.pooled_layer_features``,
    what the OOD score reads) are kept too; without ``lung_focus`` the logits then come from
    the same pass (the head on ``layer4``'s pooled activations, as ``core.ood`` computes them).
    """
    if not rows:
        raise DatasetError(f"No images to evaluate ({desc}).")
    dev = resolve_device(str(device))
    ds = evaluation_dataset(root, rows, classes, pcfg, lung_masks=lung_focus)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    model = model.to(dev).eval()
    outs: dict[str, list[torch.Tensor]] = {"full": [], **{p: [] for p in PROBES}}
    focus: list[float] = []
    from_dataset: list[bool] = []
    pooled: dict[str, list[torch.Tensor]] = {n: [] for n in ood.LAYERS}
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
            x = batch[0].to(dev, non_blocking=True).float()
            if lung_focus:
                from core import gradcam, lungs

                logits, cams = gradcam.forward_with_cam(model, x)
                heat = gradcam.upsample(cams, tuple(x.shape[-2:]))
                focus.extend(
                    lungs.lung_energy_share(h, g == 2, region=g > 0) / float(frac)
                    if (g == 2).any() else float("nan")
                    for h, g, frac in zip(heat, batch[2].numpy(), batch[4], strict=True))
                from_dataset.extend(bool(v) for v in batch[3])
            if features:
                stages = ood.pooled_layer_features(model, x)
                for n in ood.LAYERS:
                    pooled[n].append(stages[n].cpu())
                if not lung_focus:
                    logits = model.fc(stages["layer4"])
            elif not lung_focus:
                logits = model(x)
            outs["full"].append(logits.float().cpu())
            if occlusion:
                for probe in PROBES:
                    outs[probe].append(model(occlude(x, probe)).float().cpu())
    logits = torch.cat(outs["full"]).numpy().astype(np.float64)
    probes = {p: torch.cat(outs[p]).numpy().astype(np.float64) for p in PROBES if outs[p]}
    return Predictions(paths=[r["path"] for r in rows], y_true=np.asarray(ds.targets),
                       logits=logits, classes=list(classes), probe_logits=probes,
                       lung_focus=np.asarray(focus, np.float64) if lung_focus else None,
                       mask_from_dataset=np.asarray(from_dataset, bool) if lung_focus else None,
                       pooled={n: torch.cat(v).numpy() for n, v in pooled.items()}
                       if features else None)


def load_split_rows(run_dir: Path, data_dir: str | Path, split: str,
                    ckpt: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of ``split`` from the run's ``manifest.csv``, checked against the checkpoint.

    Returns (rows, warnings). Raises CheckpointError when the run folder lacks its manifest
    and DatasetError when images are missing under ``data_dir``.
    """
    path = Path(run_dir) / "manifest.csv"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: evaluation needs the run's split manifest beside the "
            "checkpoint (written by core.train)."
        )
    notes: list[str] = []
    expected = ckpt.get("manifest_sha256")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected and expected != actual:
        notes.append(f"{path.name} differs from the manifest the checkpoint was trained on "
                     "(sha256 mismatch): the evaluated split may overlap its training data.")
    manifest = load_manifest(path, data_dir)
    rows = manifest.split(split)
    unknown = sorted({r["class"] for r in rows} - set(ckpt["classes"]))
    if unknown:
        raise CheckpointError(f"Manifest classes {unknown} are not classes of the checkpoint "
                              f"({ckpt['classes']}).")
    if not rows:
        raise DatasetError(f"The manifest {path} has no {split!r} images.")
    missing = [r["path"] for r in rows if not (Path(data_dir) / r["path"]).is_file()]
    if missing:
        trained_on = (ckpt.get("data_config") or {}).get("data_dir", "?")
        raise DatasetError(
            f"{len(missing)} of {len(rows)} {split} images are missing under {data_dir} "
            f"(e.g. {missing[0]}). Manifest paths are relative to the dataset root; pass the "
            f"--data-dir the run was trained on (the checkpoint says {trained_on})."
        )
    return rows, notes


def predict_split(
    checkpoint: str | Path,
    data_dir: str | Path,
    split: str = "test",
    *,
    device: str = "cpu",
    batch_size: int = 32,
    workers: int = 0,
    occlusion: bool = False,
    progress: bool = True,
) -> Predictions:
    """Load ``checkpoint`` and predict one split of its run's manifest (raw logits)."""
    ckpt = load_checkpoint(checkpoint)
    rows, notes = load_split_rows(Path(checkpoint).parent, data_dir, split, ckpt)
    for note in notes:
        log.warning(note)
    return predict_rows(model_from_checkpoint(ckpt), data_dir, rows, ckpt["classes"],
                        preprocess_config_of(ckpt), device=device, batch_size=batch_size,
                        workers=workers, occlusion=occlusion, progress=progress, desc=split)


# ---------------------------------------------------------------- calibration and operating point


def resolve_screening_class(classes: Sequence[str], name: str = DEFAULT_SCREENING_CLASS) -> str:
    """``name`` (case-insensitive) among ``classes``.

    When the default (COVID) is absent the first class is used, with a warning; a name the
    user gave that is absent is a ConfigError.
    """
    for c in classes:
        if c.lower() == name.lower():
            return c
    if name == DEFAULT_SCREENING_CLASS:
        log.warning("No %s class in %s; screening for %r instead", name, list(classes), classes[0])
        return classes[0]
    raise ConfigError(f"screening class {name!r} is not one of the classes: {', '.join(classes)}")


def fit_calibration(
    val: Predictions,
    screening_class: str = DEFAULT_SCREENING_CLASS,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
) -> tuple[float, dict[str, Any] | None]:
    """(temperature, operating point) fitted on validation predictions.

    The operating point is chosen on the calibrated probabilities; it is None (with a
    warning) when validation holds no case of the screening class.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError(f"target sensitivity must lie in (0, 1], got {target_sensitivity}")
    temperature = M.fit_temperature(val.logits, val.y_true)
    cls = resolve_screening_class(val.classes, screening_class)
    j = val.classes.index(cls)
    positive = val.y_true == j
    if not positive.any():
        log.warning("Validation has no %s images: no operating point can be chosen", cls)
        return temperature, None
    thr, achieved = M.threshold_for_sensitivity(val.proba(temperature)[:, j], positive,
                                                target_sensitivity)
    op = {"class": cls, "threshold": thr, "target_sensitivity": float(target_sensitivity),
          "achieved_val_sensitivity": achieved}
    return temperature, op


def recalibrate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    *,
    screening_class: str = DEFAULT_SCREENING_CLASS,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit temperature and operating point on the validation split; store both in the checkpoint.

    The checkpoint is rewritten atomically with ``temperature`` (float) and
    ``operating_point`` ({class, threshold, target_sensitivity, achieved_val_sensitivity}
    or None). Returns ``{"temperature": ..., "operating_point": ...}``. ``batch_size`` and
    ``workers`` default to the run's training settings.
    """
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    batch_size, workers = loader_settings(ckpt, batch_size, workers)
    rows, notes = load_split_rows(checkpoint.parent, data_dir, "val", ckpt)
    for note in notes:
        log.warning(note)
    val = predict_rows(model_from_checkpoint(ckpt), data_dir, rows, ckpt["classes"],
                       preprocess_config_of(ckpt), device=device, batch_size=batch_size,
                       workers=workers, progress=progress, desc="val")
    temperature, op = fit_calibration(val, screening_class, target_sensitivity)
    ckpt["temperature"] = temperature
    ckpt["operating_point"] = op
    save_checkpoint(ckpt, checkpoint)
    log.info("Calibrated %s on %d validation images: temperature %.3f, NLL %.4f -> %.4f%s",
             checkpoint, len(val.y_true), temperature, M.nll(val.logits, val.y_true),
             M.nll(val.logits, val.y_true, temperature),
             "" if op is None else f"; {op['class']} threshold {op['threshold']:.4f} "
             f"(val sensitivity {op['achieved_val_sensitivity']:.3f})")
    return {"temperature": temperature, "operating_point": op}


def loader_settings(ckpt: dict[str, Any], batch_size: int | None,
                    workers: int | None) -> tuple[int, int]:
    """Batch size and DataLoader workers: as given, else as the run was trained (32, 0)."""
    tc = ckpt.get("train_config") or {}
    bs = batch_size if batch_size is not None else int(tc.get("batch_size", 32) or 32)
    nw = workers if workers is not None else int(tc.get("workers", 0) or 0)
    return bs, nw


def stored_calibration(ckpt: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Temperature (1.0 when absent) and operating point stored in a checkpoint."""
    raw = ckpt.get("temperature")
    t = 1.0 if raw is None else float(raw)
    if not np.isfinite(t) or t <= 0:
        raise CheckpointError(f"Checkpoint temperature {t} is not a positive number.")
    op = ckpt.get("operating_point")
    if op is not None and op.get("class") not in ckpt["classes"]:
        raise CheckpointError(f"Operating point class {op.get('class')!r} is not a checkpoint class.")
    return t, op


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


# ---------------------------------------------------------------- sources (metadata.xlsx)


def _column(df: Any, *names: str) -> str | None:
    norm = {re.sub(r"[^a-z]", "", str(c).lower()): c for c in df.columns}
    for n in names:
        if n in norm:
            return norm[n]
    return None


def source_report(data_dir: str | Path, classes: Sequence[str],
                  preds: Predictions | None = None) -> dict[str, Any]:
    """Image sources per class from ``<Class>.metadata.xlsx`` (grouped by URL/source).

    With ``preds`` also the evaluated images per source and the accuracy on them (joined
    on the file name). Never raises: problems become ``available: false`` with a reason.
    """
    root = Path(data_dir)
    files = {c: root / f"{c}.metadata.xlsx" for c in classes}
    files = {c: p for c, p in files.items() if p.is_file()}
    if not files:
        return {"available": False, "reason": f"no <Class>.metadata.xlsx files in {root}",
                "per_class": {}}
    try:
        import pandas as pd

        source_of: dict[str, str] = {}
        per_class: dict[str, Any] = {}
        for cls, path in files.items():
            df = pd.read_excel(path)
            src = _column(df, "url", "source", "sources")
            name = _column(df, "filename", "file", "name")
            if src is None:
                per_class[cls] = {"n_listed": len(df), "sources": [],
                                  "note": f"{path.name} has no URL/source column"}
                continue
            values = df[src].fillna("unknown").astype(str).str.strip()
            counts = values.value_counts()
            per_class[cls] = {"n_listed": len(df), "sources": [
                {"source": s, "count": int(n)} for s, n in counts.items()]}
            if name is not None:
                for f, s in zip(df[name].astype(str), values, strict=True):
                    source_of[Path(f.strip()).stem.lower()] = s
    except Exception as exc:  # unreadable spreadsheet, missing openpyxl, ...: report, don't fail
        return {"available": False, "reason": f"cannot read metadata: {type(exc).__name__}: {exc}",
                "per_class": {}}
    out: dict[str, Any] = {"available": True, "reason": None, "per_class": per_class,
                           "confounded": _confounded(per_class)}
    if preds is not None and source_of:
        out["evaluated_by_source"] = _by_source(preds, source_of)
    return out


def _confounded(per_class: dict[str, Any]) -> bool:
    """True when no source contributes images to more than one class."""
    seen: dict[str, int] = {}
    for entry in per_class.values():
        for s in {x["source"] for x in entry["sources"]}:
            seen[s] = seen.get(s, 0) + 1
    return bool(seen) and max(seen.values()) == 1


def _by_source(preds: Predictions, source_of: dict[str, str]) -> list[dict[str, Any]]:
    pred = preds.logits.argmax(1)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(preds.paths):
        groups.setdefault(source_of.get(Path(p).stem.lower(), "unknown"), []).append(i)
    rows = []
    for s, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ix = np.asarray(idx)
        rows.append({
            "source": s, "n": len(idx),
            "classes": {c: int((preds.y_true[ix] == j).sum()) for j, c in enumerate(preds.classes)
                        if (preds.y_true[ix] == j).any()},
            "accuracy": round(float((pred[ix] == preds.y_true[ix]).mean()), 6),
        })
    return rows


# ---------------------------------------------------------------- external validation


def parse_class_map(text: str | None) -> dict[str, str]:
    """``"old=new,old2=new2"`` -> dict; ``old=`` (empty) drops that external class."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"--class-map entry {part!r} is not old=new (e.g. "
                              "'covid=COVID,normal=Normal,Lung_Opacity=')")
        old, new = (s.strip() for s in part.split("=", 1))
        out[old] = new
    return out


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def map_external_classes(external: Sequence[str], model_classes: Sequence[str],
                         class_map: dict[str, str] | None = None) -> dict[str, str | None]:
    """External class -> model class (None: dropped), by ``class_map`` first, then by name."""
    class_map = class_map or {}
    by_name = {_norm(c): c for c in model_classes}
    out: dict[str, str | None] = {}
    unmapped = []
    for c in external:
        if c in class_map:
            target = class_map[c] or None
            if target is not None and target not in model_classes:
                raise ConfigError(f"--class-map maps {c!r} to {target!r}, which is not a model "
                                  f"class ({', '.join(model_classes)})")
            out[c] = target
        elif _norm(c) in by_name:
            out[c] = by_name[_norm(c)]
        else:
            unmapped.append(c)
    if unmapped:
        raise DatasetError(
            f"External classes {unmapped} match no model class ({', '.join(model_classes)}). "
            "Map them with --class-map old=new,... (old= drops a class).")
    for c in set(class_map) - set(external):
        log.warning("--class-map names %r, which is not a class folder of the external set", c)
    return out


def external_rows(external_dir: str | Path, model_classes: Sequence[str],
                  class_map: dict[str, str] | None) -> tuple[list[dict[str, str]], dict[str, str | None]]:
    """Rows (path relative to ``external_dir``, mapped class) of every external image."""
    ds = discover(external_dir)
    mapping = map_external_classes(ds.classes, model_classes, class_map)
    rows = []
    for p, c in ds.items:
        target = mapping[c]
        if target is not None:
            rows.append({"path": p, "class": target})
    if not rows:
        raise DatasetError(f"No external images left in {external_dir} after class mapping.")
    return rows, mapping


def _overlap_with_manifest(external_dir: Path, rows: list[dict[str, str]], run_dir: Path) -> int:
    """External images byte-identical to an image of the run's manifest (any split)."""
    path = run_dir / "manifest.csv"
    if not path.is_file():
        return 0
    with path.open(newline="") as fh:
        known = {r["sha1"] for r in csv.DictReader(fh)}
    return sum(hashlib.sha1((external_dir / r["path"]).read_bytes()).hexdigest() in known
               for r in rows)


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


# ---------------------------------------------------------------- the report


def parse_prevalence(value: str | float | dict[str, float] | None,
                     classes: Sequence[str]) -> dict[str, float] | None:
    """``0.05`` (every class, one-vs-rest) or ``"COVID=0.05,Normal=0.8"`` -> class -> p."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        out = {str(k): float(v) for k, v in value.items()}
    elif isinstance(value, int | float) or re.fullmatch(r"\s*[0-9.eE+-]+\s*", str(value)):
        out = dict.fromkeys(classes, float(value))
    else:
        out = {}
        for part in str(value).split(","):
            if "=" not in part:
                raise ConfigError(f"--prevalence {value!r}: use a number or Class=p,Class=p")
            k, v = part.split("=", 1)
            out[k.strip()] = float(v)
    bad = [k for k in out if k not in classes]
    if bad:
        raise ConfigError(f"--prevalence names unknown class(es) {bad}; classes: {list(classes)}")
    if any(not 0.0 < p < 1.0 for p in out.values()):
        raise ConfigError("--prevalence values must lie strictly between 0 and 1")
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


def evaluate(
    checkpoint: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    output: str | Path | None = None,
    *,
    external_dir: str | Path | None = None,
    class_map: dict[str, str] | None = None,
    n_resamples: int = M.DEFAULT_RESAMPLES,
    seed: int = 0,
    prevalence: str | float | dict[str, float] | None = None,
    calibrate: bool = False,
    screening_class: str = DEFAULT_SCREENING_CLASS,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    occlusion: bool = True,
    lung_focus: bool = True,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the report for ``split`` of the checkpoint's run; returns the metrics.json path.

    Only ``calibrate=True`` writes the checkpoint, and only from the validation split.
    ``batch_size`` and ``workers`` default to the run's training settings.
    """
    checkpoint = Path(checkpoint)
    data_dir = Path(data_dir or default_data_dir())
    out_dir = Path(output) if output else checkpoint.parent / "report"
    if n_resamples < 0:
        raise ConfigError("--bootstrap must be 0 (no intervals) or more")
    calibration_source = "checkpoint"
    if calibrate:
        recalibrate_checkpoint(checkpoint, data_dir, screening_class=screening_class,
                               target_sensitivity=target_sensitivity, device=device,
                               batch_size=batch_size, workers=workers, progress=progress)
        calibration_source = "refit"
    ckpt = load_checkpoint(checkpoint)
    batch_size, workers = loader_settings(ckpt, batch_size, workers)
    if "temperature" not in ckpt:
        calibration_source = "none"
    prev = parse_prevalence(prevalence, ckpt["classes"])
    rows, notes = load_split_rows(checkpoint.parent, data_dir, split, ckpt)
    if split == "val" and "temperature" in ckpt:
        notes.append("These are validation figures: the temperature and operating point were "
                     "fitted on this split, so they are optimistic.")
    model = model_from_checkpoint(ckpt)
    pcfg = preprocess_config_of(ckpt)
    has_ood = ckpt.get("ood") is not None  # per-image OOD scores need the stage features
    preds = predict_rows(model, data_dir, rows, ckpt["classes"], pcfg, device=device,
                         batch_size=batch_size, workers=workers, occlusion=occlusion,
                         lung_focus=lung_focus, features=has_ood, progress=progress, desc=split)
    log.info("Scoring %d %s predictions (%d bootstrap resamples)", len(rows), split, n_resamples)
    doc = build_document(ckpt, checkpoint, preds, data_dir=data_dir, split=split,
                         n_resamples=n_resamples, seed=seed, prevalence=prev,
                         calibration_source=calibration_source, notes=notes)
    doc["sources"] = source_report(data_dir, ckpt["classes"], preds)
    doc["lung_focus"] = lung_focus_block(preds, pcfg.lung_view)
    temperature, op = stored_calibration(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    ext_preds = None
    doc["external"] = None
    if external_dir is not None:
        ext_dir = Path(external_dir)
        ext_rows, mapping = external_rows(ext_dir, ckpt["classes"], class_map)
        ext_preds = predict_rows(model, ext_dir, ext_rows, ckpt["classes"], pcfg, device=device,
                                 batch_size=batch_size, workers=workers, features=has_ood,
                                 progress=progress, desc="external")
        ext = score_predictions(ext_preds, temperature=temperature, operating_point=op,
                                n_resamples=n_resamples, seed=seed, prevalence=prev)
        doc["external"] = {
            "data_dir": str(ext_dir), "class_map": mapping,
            "overlap_with_manifest": _overlap_with_manifest(ext_dir, ext_rows, checkpoint.parent),
            **ext, "drop": drop_block(doc, ext),
        }
        write_predictions_csv(out_dir / "predictions_external.csv", ext_preds, temperature, op,
                              ckpt)
    doc["findings"] = findings(doc)
    validate_document(doc)
    write_json(out_dir / "metrics.json", doc)
    write_predictions_csv(out_dir / "predictions.csv", preds, temperature, op, ckpt)
    _log_summary(doc, out_dir)
    return out_dir / "metrics.json"


def _fmt(m: dict[str, Any]) -> str:
    if m["value"] is None:
        return f"undefined ({m['undefined_reason']})"
    ci = f" [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else ""
    return f"{m['value']:.3f}{ci}"


def _log_summary(doc: dict[str, Any], out_dir: Path) -> None:
    o = doc["at_argmax"]["overall"]
    log.info("%s (n=%d): accuracy %s, macro F1 %s, macro ROC-AUC %s, ECE %s -> %s (T=%.3f)",
             doc["run"]["split"], doc["n"], _fmt(o["accuracy"]), _fmt(o["macro_f1"]),
             _fmt(doc["threshold_free"]["macro_roc_auc"]),
             _fmt(doc["calibration"]["before"]["ece"]), _fmt(doc["calibration"]["after"]["ece"]),
             doc["calibration"]["temperature"])
    for f in doc["findings"]:
        log.warning("[%s] %s", f["severity"], f["text"])
    log.info("Report written to %s", out_dir)


def finalize_run(run_dir: str | Path, data_dir: str | Path, device: str = "cpu",
                 progress: bool = True, *, export: bool = False) -> Path:
    """End of training, in this order (each step rewrites ``best.pt`` atomically):

    1. temperature and operating point on the validation split (:func:`recalibrate_checkpoint`);
    2. OOD statistics and the OOD and low-confidence cut-offs on the validation split
       (:func:`core.ood.calibrate_run_ood`, which uses the temperature of step 1);
    3. with ``export``, the serving graph beside ``best.pt`` and the check of which reduced
       precisions may serve (:func:`core.export.finish_run`; nothing passes: fp32 serves);
    4. the test report, whose per-image records carry each image's OOD score and flags under
       the cut-offs of step 2 and whose ``checkpoint_sha256`` is that of the final ``best.pt``.

    Returns the path of ``run_dir/report/metrics.json``.
    """
    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    recalibrate_checkpoint(best, data_dir, device=device, progress=progress)
    ood.calibrate_run_ood(run_dir, data_dir, device=device, progress=progress)
    if export:
        from core import export as export_lib

        export_lib.finish_run(run_dir, data_dir)
    return evaluate(best, data_dir, "test", run_dir / "report", device=device, progress=progress)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.evaluate",
        description="Evaluate a trained run: metrics with bootstrap CIs, calibration, operating "
                    "point, occlusion shortcut probe, optional external validation. Writes "
                    "metrics.json and predictions.csv (see docs/METRICS.md).",
    )
    g = p.add_argument_group("input")
    g.add_argument("--checkpoint", required=True, help="models/<run>/best.pt")
    g.add_argument("--data-dir", default=default_data_dir(),
                   help="dataset root the run was trained on (default: %(default)s, from "
                        "$CXR_DATA_DIR or data/COVID-19_Radiography_Dataset)")
    g.add_argument("--split", default="test", choices=("test", "val"),
                   help="manifest split to evaluate (default: test)")
    g = p.add_argument_group("external validation")
    g.add_argument("--external-dir", default=None,
                   help="another labelled folder (<Class>/images/*.png or <Class>/*.png)")
    g.add_argument("--class-map", default=None,
                   help="map external classes: old=new,... (old= drops a class); "
                        "unmapped classes are matched by name")
    g = p.add_argument_group("metrics")
    g.add_argument("--bootstrap", type=int, default=M.DEFAULT_RESAMPLES,
                   help="bootstrap resamples for the 95%% CIs (0 = none; default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    g.add_argument("--prevalence", default=None,
                   help="assumed prevalence for PPV/NPV: a number (every class) or "
                        "Class=p,Class=p")
    g.add_argument("--no-occlusion", dest="occlusion", action="store_false",
                   help="skip the occlusion shortcut probe (it triples inference time)")
    g.add_argument("--no-lung-focus", dest="lung_focus", action="store_false",
                   help="skip the Grad-CAM lung-focus score (it segments every image unless "
                        "the dataset has <Class>/masks/)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calibrate", action="store_true",
                   help="refit temperature and operating point on the validation split and "
                        "store them in the checkpoint before evaluating")
    g.add_argument("--screening-class", default=DEFAULT_SCREENING_CLASS,
                   help="class of the operating point (default %(default)s)")
    g.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="validation sensitivity the threshold must reach (default %(default)s)")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--output", default=None, help="report folder (default: <run>/report/)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="inference batch size (default: the run's training batch size)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: the run's training setting)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar")
    g.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = evaluate(
            args.checkpoint, args.data_dir, args.split, args.output,
            external_dir=args.external_dir, class_map=parse_class_map(args.class_map),
            n_resamples=args.bootstrap, seed=args.seed, prevalence=args.prevalence,
            calibrate=args.calibrate, screening_class=args.screening_class,
            target_sensitivity=args.target_sensitivity, occlusion=args.occlusion,
            lung_focus=args.lung_focus, device=args.device, batch_size=args.batch_size, workers=args.workers,
            progress=args.progress,
        )
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    log.info("metrics: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
