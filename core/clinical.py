"""Uploaded X-rays -> what the Clinical Predictions page shows (no Streamlit here).

:func:`analyse` takes one upload's bytes (in memory: nothing is written to disk), decodes it
through the safe intake (``core.imaging.decode``), runs one ``Predictor.explain`` pass
(prediction, Grad-CAM, lung mask, lung focus) and keeps a display-sized copy of the image,
heatmap and lung mask, so that moving the opacity slider re-blends
(:func:`overlay_image`, ``core.gradcam.overlay``) without running the network again.

Privacy: of a DICOM file only :data:`SAFE_DICOM_FIELDS` are read (``pydicom``'s
``specific_tags``: no other element is even parsed); no patient field is shown or kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd

from core import gradcam, lungs
from core.errors import InvalidImageError
from core.imaging import decode
from core.preview import DISPLAY_CONTRASTS, display_contrast

log = logging.getLogger(__name__)

DISPLAY_MAX_SIDE = 1024
"""Images, heatmaps and lung masks are kept at most this many pixels on their longer side."""
SAFE_DICOM_FIELDS = {"Modality": "Modality", "ViewPosition": "View position"}
"""The only DICOM elements read for display (keyword -> label); bit depth and photometric
interpretation come from the decoder."""
LOW_LUNG_FOCUS = 1.0
"""Lung focus below this: the heatmap puts less energy on the lungs than a uniform map."""
CSV_NAME = "cxr-predictions.csv"


@dataclass(frozen=True, eq=False)
class Analysis:
    """One upload's result. ``gray`` (uint8), ``heatmap`` (float32 [0, 1]) and ``lung_mask``
    (bool or None) share one display-sized grid; ``header``: safe fields for display."""

    name: str
    key: str
    prediction: Any  # core.inference.Prediction
    gray: np.ndarray
    heatmap: np.ndarray
    lung_mask: np.ndarray | None
    lung_focus: float
    header: dict[str, str]
    notes: tuple[str, ...]
    seconds: float


def content_key(data: bytes) -> str:
    """The upload's identity for caching: the SHA-256 of its bytes (never its name)."""
    return hashlib.sha256(data).hexdigest()


def dicom_header(data: bytes) -> dict[str, str]:
    """The :data:`SAFE_DICOM_FIELDS` of a DICOM file (label -> value; absent ones omitted).

    Only these elements are parsed (``specific_tags``), the pixel data is not read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=list(SAFE_DICOM_FIELDS))
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return {}
    out = {}
    for keyword, label in SAFE_DICOM_FIELDS.items():
        value = ds.get(keyword, None)
        if value is not None and str(value).strip():
            out[label] = str(value).strip()
    return out


def _display_size(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    scale = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _fit(arr: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if arr.shape[:2] == size:
        return arr
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(arr, (size[1], size[0]), interpolation=interp)


def analyse(predictor: Any, name: str, data: bytes, method: str = "gradcam",
            target_layer: str = "layer4", target: str | None = None) -> Analysis:
    """Decode, predict and explain one image's bytes (``core.inference.Predictor.explain`` on
    the decoded image: the same model input as ``predictor.predict(data, name=name)``).
    ``method``, ``target_layer``, ``target``: as ``Predictor.explain`` (``target`` None: the
    predicted class).

    Raises :class:`~core.errors.InvalidImageError` for a file that cannot be used.
    """
    start = time.perf_counter()
    decoded = decode(data, name=name)
    exp = predictor.explain(decoded.gray, method, target, target_layer=target_layer,
                            lung_focus=True)
    header: dict[str, str] = {}
    if decoded.format == "DICOM":
        header = {**dicom_header(data), "Bit depth": f"{decoded.bit_depth}-bit",
                  "Photometric interpretation": decoded.mode}
    size = _display_size(decoded.original_size)
    gray = _fit(display_contrast(decoded.gray), size)
    heat = np.clip(_fit(exp.heatmap, size), 0.0, 1.0).astype(np.float32)
    mask = None
    if exp.lung_mask is not None:
        mask = _fit(exp.lung_mask.astype(np.uint8), size, nearest=True).astype(bool)
    notes = tuple(dict.fromkeys((*exp.prediction.notes, *decoded.notes)))
    return Analysis(name=name, key=content_key(data), prediction=exp.prediction, gray=gray,
                    heatmap=heat, lung_mask=mask, lung_focus=float(exp.lung_focus),
                    header=header, notes=notes, seconds=time.perf_counter() - start)


def overlay_image(result: Analysis, alpha: float, contour: bool = False,
                  contrast: str = DISPLAY_CONTRASTS[0]) -> np.ndarray:
    """The Grad-CAM overlay at opacity ``alpha`` from the stored heatmap (no network run),
    on the image under a display ``contrast``, with the lung outline when ``contour``."""
    over = gradcam.overlay(display_contrast(result.gray, contrast), result.heatmap, alpha=alpha)
    if contour and result.lung_mask is not None:
        over = lungs.draw_lung_contour(over, result.lung_mask,
                                       thickness=max(2, max(over.shape[:2]) // 300))
    return over


def flag_messages(result: Analysis) -> list[tuple[str, str]]:
    """The result's flags in plain words, as (level, text); level is ``warning`` or ``info``."""
    p = result.prediction
    out: list[tuple[str, str]] = []
    if p.ood:
        out.append(("warning", "Unusual image: it does not look like the chest X-rays this model "
                    f"was trained on (distance {p.ood_score:.1f} above the cut-off "
                    f"{p.ood_threshold:.1f} that 95% of validation X-rays stay under). The "
                    "result may be meaningless: check that this is a frontal chest X-ray."))
    elif not p.ood_available:
        out.append(("info", "The unusual-image check is not available for this model."))
    if p.low_confidence:
        out.append(("warning", f"Low confidence: the top probability ({p.confidence:.0%}) is "
                    f"below {p.low_confidence_threshold:.0%}, a level 95% of validation X-rays "
                    "reach. Treat this result as uncertain."))
    elif not p.low_confidence_available:
        out.append(("info", "The low-confidence check is not available for this model."))
    if math.isnan(result.lung_focus):
        out.append(("info", "Lung focus not scored: no plausible lung field was found."))
    elif result.lung_focus < LOW_LUNG_FOCUS:
        out.append(("warning", f"Low lung focus ({result.lung_focus:.2f}): the heatmap puts less "
                    "weight on the lungs than an even spread would. The model may be reading "
                    "something other than the lungs (markers, borders, devices)."))
    return out


def lung_focus_text(value: float) -> str:
    if math.isnan(value):
        return "not scored"
    return f"{value:.2f}"


def results_table(results: Sequence[tuple[str, Analysis | InvalidImageError]],
                  classes: Sequence[str]) -> pd.DataFrame:
    """One row per file: ``file, predicted_class, decision, prob_<class>..., low_confidence,
    ood, lung_focus, error`` (an invalid file has only ``file`` and ``error``)."""
    columns = ["file", "predicted_class", "decision", *[f"prob_{c}" for c in classes],
               "low_confidence", "ood", "lung_focus", "error"]
    rows = []
    for name, r in results:
        if isinstance(r, Analysis):
            p = r.prediction
            rows.append({"file": name, "predicted_class": p.label, "decision": p.decision,
                         **{f"prob_{c}": round(float(p.probabilities[c]), 6) for c in classes},
                         "low_confidence": bool(p.low_confidence), "ood": bool(p.ood),
                         "lung_focus": None if math.isnan(r.lung_focus) else round(r.lung_focus, 4),
                         "error": ""})
        else:
            rows.append({"file": name, "error": str(r)})
    return pd.DataFrame(rows, columns=columns)


def results_csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False).encode("utf-8")
