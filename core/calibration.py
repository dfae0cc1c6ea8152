"""Calibration and operating point, fitted on a run's validation split.

Fit a temperature on the validation logits, then choose the operating point on the
calibrated validation probabilities: the highest threshold on the screening class (COVID by
default) whose validation sensitivity reaches the target (0.95 by default). Both go into the
run's ``best.calibration.json`` (:mod:`core.sidecars`), stamped with the hash of the weights
they were fitted on; ``best.pt`` is never rewritten.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core import metrics as M
from core import sidecars
from core.data import run_split_rows
from core.errors import CheckpointError, ConfigError
from core.files import file_sha256
from core.model import load_checkpoint, model_from_checkpoint, preprocess_config_of
from core.scoring import Predictions, loader_settings, predict_rows

log = logging.getLogger(__name__)

DEFAULT_SCREENING_CLASS = "COVID"
DEFAULT_TARGET_SENSITIVITY = 0.95


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
    allow_manifest_change: bool = False,
) -> dict[str, Any]:
    """Fit temperature and operating point on the validation split; write them to the run's
    ``best.calibration.json`` (:func:`core.sidecars.write_calibration`), stamped with the
    hash of ``checkpoint``, which is not modified.

    Returns ``{"temperature": float, "operating_point": {class, threshold,
    target_sensitivity, achieved_val_sensitivity} or None}``. ``batch_size`` and ``workers``
    default to the run's training settings; see :func:`core.data.run_split_rows` for
    ``allow_manifest_change``.
    """
    checkpoint = Path(checkpoint)
    sha = file_sha256(checkpoint)  # the stamp is of the weights fitted on: hash, then load
    ckpt = load_checkpoint(checkpoint)
    batch_size, workers = loader_settings(ckpt, batch_size, workers)
    rows = run_split_rows(checkpoint.parent, data_dir, ckpt, ("val",),
                          allow_manifest_change=allow_manifest_change)[0]["val"]
    val = predict_rows(model_from_checkpoint(ckpt), data_dir, rows, ckpt["classes"],
                       preprocess_config_of(ckpt), device=device, batch_size=batch_size,
                       workers=workers, progress=progress, desc="val")
    temperature, op = fit_calibration(val, screening_class, target_sensitivity)
    path = sidecars.write_calibration(
        checkpoint, temperature, op, weights_sha256=sha,
        fitted_on={"split": "val", "n_images": len(val.y_true),
                   "manifest_sha256": ckpt.get("manifest_sha256")})
    log.info("Calibrated %s on %d validation images: temperature %.3f, NLL %.4f -> %.4f%s; "
             "wrote %s", checkpoint, len(val.y_true), temperature, M.nll(val.logits, val.y_true),
             M.nll(val.logits, val.y_true, temperature),
             "" if op is None else f"; {op['class']} threshold {op['threshold']:.4f} "
             f"(val sensitivity {op['achieved_val_sensitivity']:.3f})", path.name)
    return {"temperature": temperature, "operating_point": op}


def stored_calibration(ckpt: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Temperature (1.0 when absent) and operating point of a run's checkpoint, as
    :func:`core.sidecars.load_run_checkpoint` gives it."""
    raw = ckpt.get("temperature")
    t = 1.0 if raw is None else float(raw)
    if not np.isfinite(t) or t <= 0:
        raise CheckpointError(f"Checkpoint temperature {t} is not a positive number.")
    op = ckpt.get("operating_point")
    if op is not None and op.get("class") not in ckpt["classes"]:
        raise CheckpointError(f"Operating point class {op.get('class')!r} is not a checkpoint class.")
    return t, op

