"""Lung-field segmentation: a small U-Net shipped trained, lung crop/mask views, lung focus.

Network
    :mod:`core.unet` (a compact U-Net, 1-channel 128 x 128 input; why this design is there).

Preprocessing (stored in the weights file under ``"preprocess"`` and read back from it)
    grayscale [0, 1] -> letterbox resize to ``img_size`` (aspect ratio kept, black padding,
    as :func:`core.preprocess.resize`) -> 8-bit -> CLAHE (clip 2.0, 8 x 8 tiles) ->
    ``(x / 255 - 0.5) / 0.25``. The network's logits are cut back to the letterbox content,
    resized (bilinear) to the input's resolution, thresholded at 0.5 probability, and only
    the two largest connected components (the two lungs) are kept.

Lung views (``PreprocessConfig.lung_view``), see :func:`apply_lung_view`
    ``crop``: the lungs' bounding box plus ``lung_margin`` x the image side on each side;
    ``mask``: the same crop with everything outside the dilated lung field set to 0;
    ``soft``: the same crop with the lungs kept and everything outside the dilated lung
    field blurred and dimmed (not blanked: the anatomy around the lungs stays readable, the
    fine texture of borders, text and markers does not), with a feathered edge.
    Implausible segmentations (no lung, or under 5 % / over 80 % of the image) fall back to
    the full image and say why.

Training and benchmark: :mod:`core.lungs_train` (``python -m core.lungs train|bench ...``
forwards there).

Research use only: not a medical device.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import runpy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from core.config import PreprocessConfig
from core.devices import release_free_memory
from core.errors import CheckpointError, InvalidImageError
from core.files import file_sha256
from core.model import torch_load_file
from core.pixels import clahe, letterbox_box, resize, to_gray, to_uint8
from core.unet import build_segmenter_model

log = logging.getLogger(__name__)

DEFAULT_SEGMENTER_PATH = Path(__file__).resolve().parent.parent / "assets" / "lung_segmenter.pt"
SEGMENTER_FORMAT = "cxr-insight-lung-segmenter"
SEGMENTER_VERSION = 1
ARCH_NAME = "unet"

MIN_LUNG_FRACTION = 0.05  # below this share of the image, the segmentation is implausible
MAX_LUNG_FRACTION = 0.80  # above this share, too
MASK_DILATION = 0.03  # "mask" view: grow the lung field by 3 % of the image's longer side
SOFT_DIM = 0.35  # "soft" view: brightness kept outside the lung field
SOFT_BLUR = 0.02  # "soft" view: Gaussian sigma outside the lung field, share of the longer side

DEFAULT_PREPROCESS: dict[str, Any] = {
    "resize_mode": "letterbox",
    "clahe": True,
    "clahe_clip": 2.0,
    "clahe_tiles": 8,
    "mean": 0.5,
    "std": 0.25,
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _as_gray(gray: np.ndarray) -> np.ndarray:
    """Any 2-D (or HxWxC) image array -> float32 [0, 1], via core.preprocess.to_gray."""
    arr = np.asarray(gray)
    if arr.ndim not in (2, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidImageError(f"Expected a 2-D grayscale image, got shape {arr.shape}.")
    return to_gray(arr)


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized (nearest) to ``shape`` = (height, width)."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape == tuple(shape):
        return mask
    if mask.ndim != 2:
        raise ValueError(f"A mask must be 2-D, got shape {mask.shape}.")
    out = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return out.astype(bool)


def keep_largest_components(mask: np.ndarray, n: int = 2) -> np.ndarray:
    """Keep the ``n`` largest 8-connected components of a binary mask (bool out)."""
    m = np.asarray(mask).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if count - 1 <= n:  # background + at most n components: nothing to drop
        return m.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.argsort(areas)[::-1][:n] + 1
    lut = np.zeros(count, dtype=bool)
    lut[keep] = True
    return lut[labels]


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def _model_input(gray: np.ndarray, img_size: int, prep: dict[str, Any]) -> np.ndarray:
    """float32 [0, 1] image -> the network's normalised ``img_size`` square (float32 HxW)."""
    u8 = to_uint8(resize(gray, img_size, prep.get("resize_mode", "letterbox")))
    if prep.get("clahe", True):
        u8 = clahe(u8, float(prep.get("clahe_clip", 2.0)), int(prep.get("clahe_tiles", 8)))
    return _normalise_u8(u8, prep)


def _normalise_u8(u8: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    x = u8.astype(np.float32) / 255.0
    return (x - float(prep.get("mean", 0.5))) / float(prep.get("std", 0.25))


Forward = Callable[[np.ndarray], np.ndarray]
"""The network as a function: the normalised input [1, 1, S, S] float32 -> logits [S, S]."""


class LungSegmenter:
    """A trained lung-field segmenter. Build with :meth:`load`; thread-safe for inference.

    The network runs as eager torch (``runtime = "torch-fp32"``) unless :meth:`on_runtime`
    gave a copy whose network is an exported graph (:func:`core.serving.open_segmenter`):
    the pre- and post-processing here are the same for both.
    """

    runtime = "torch-fp32"

    def __init__(
        self,
        model: nn.Module,
        img_size: int = 128,
        preprocess: dict[str, Any] | None = None,
        threshold: float = 0.5,
        sha256: str = "",
        path: Path | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval().to(memory_format=torch.channels_last)  # faster on CPU
        self.img_size = int(img_size)
        self.preprocess = {**DEFAULT_PREPROCESS, **(preprocess or {})}
        self.threshold = float(threshold)
        self.sha256 = sha256
        self.path = path
        self.meta = meta or {}
        # Logit threshold equivalent to the probability threshold.
        t = min(max(self.threshold, 1e-6), 1 - 1e-6)
        self._logit_threshold = math.log(t / (1 - t))
        self._forward: Forward = self._torch_forward

    def _torch_forward(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(x))[0, 0].float().numpy()

    def on_runtime(self, forward: Forward, runtime: str) -> LungSegmenter:
        """A copy of this segmenter (same weights' hash, pre- and post-processing) whose
        network is ``forward`` instead of the torch module, e.g. the exported graph on ONNX
        Runtime; ``runtime`` names it (``onnx-fp32``)."""
        seg = copy.copy(self)
        seg._forward, seg.runtime = forward, runtime
        return seg

    @classmethod
    def load(cls, path: str | Path = DEFAULT_SEGMENTER_PATH) -> LungSegmenter:
        """Read a weights file written by ``python -m core.lungs train`` (weights_only)."""
        path = Path(path)
        ckpt = torch_load_file(path, CheckpointError, "lung segmenter weights",
                               "Train them with `python -m core.lungs train --data-dir "
                               f"../shared/data/lung-masks --output {path}` or restore "
                               "assets/lung_segmenter.pt.")
        if not isinstance(ckpt, dict) or ckpt.get("format") != SEGMENTER_FORMAT:
            raise CheckpointError(f"{path} is not a CXR Insight lung segmenter weights file.")
        if int(ckpt.get("version", 0)) > SEGMENTER_VERSION:
            raise CheckpointError(
                f"{path} has lung segmenter format version {ckpt['version']}; this code reads "
                f"up to {SEGMENTER_VERSION}. Upgrade CXR Insight."
            )
        if ckpt.get("arch") != ARCH_NAME:
            raise CheckpointError(f"{path}: unknown lung segmenter arch {ckpt.get('arch')!r}.")
        model = build_segmenter_model(ckpt.get("arch_params"))
        try:
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: weights do not fit the U-Net: {exc}") from exc
        meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        return cls(
            model,
            img_size=int(ckpt["img_size"]),
            preprocess=ckpt.get("preprocess"),
            threshold=float(ckpt.get("threshold", 0.5)),
            sha256=file_sha256(path),
            path=path,
            meta=meta,
        )

    def logits(self, gray: np.ndarray) -> np.ndarray:
        """Lung logits at the input image's resolution (float32 HxW)."""
        g = _as_gray(gray)
        h, w = g.shape
        out = self._forward(_model_input(g, self.img_size, self.preprocess)[None, None])
        if self.preprocess.get("resize_mode", "letterbox") == "letterbox":
            top, left, nh, nw = letterbox_box((h, w), self.img_size)
            out = out[top : top + nh, left : left + nw]
        if out.shape != (h, w):
            out = cv2.resize(np.ascontiguousarray(out), (w, h), interpolation=cv2.INTER_LINEAR)
        return out

    def probabilities(self, gray: np.ndarray) -> np.ndarray:
        """Per-pixel lung probability at the input image's resolution (float32 HxW)."""
        return (1.0 / (1.0 + np.exp(-self.logits(gray)))).astype(np.float32)

    def segment(self, gray: np.ndarray) -> np.ndarray:
        """Binary lung mask (bool, the input's height x width): the two largest components."""
        return keep_largest_components(self.logits(gray) > self._logit_threshold, 2)


_DEFAULT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _load_default() -> LungSegmenter:
    segmenter = LungSegmenter.load(DEFAULT_SEGMENTER_PATH)
    release_free_memory()  # the file's tensors, read once per process, are garbage now
    return segmenter


def default_segmenter() -> LungSegmenter:
    """The shipped segmenter (``assets/lung_segmenter.pt``), loaded once per process."""
    with _DEFAULT_LOCK:  # lru_cache alone may run a slow first load twice under a race
        return _load_default()


# --------------------------------------------------------------------------------------------
# Lung views
# --------------------------------------------------------------------------------------------


@dataclass
class LungView:
    """What :func:`apply_lung_view` made of an image.

    ``image``: the view (float32); ``mask``: the lung mask (bool) at ``image``'s resolution,
    all False when no usable segmentation exists (fallback) or ``lung_view`` is ``none``;
    ``box``: (top, left, bottom, right) of ``image`` in the input's pixels (bottom/right
    exclusive); ``fallback``: True when the full image was used because segmentation
    failed; ``reason``: a short explanation.
    """

    image: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int]
    fallback: bool
    reason: str

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The lung mask on the input image's grid (``shape``), or None after a fallback."""
        if self.fallback or not self.mask.any():
            return None
        top, left, bottom, right = self.box
        out = np.zeros(shape, bool)
        out[top:bottom, left:right] = self.mask
        return out


def implausible(lung: np.ndarray) -> str:
    """Why a lung mask cannot be a frontal chest's lung field ("" when it can): nothing
    found, or an area under 5 % or over 80 % of the image."""
    frac = float(lung.mean())
    if not lung.any():
        return "no lung found"
    if frac < MIN_LUNG_FRACTION:
        return f"lung area {frac:.1%} of the image is implausibly small (< {MIN_LUNG_FRACTION:.0%})"
    if frac > MAX_LUNG_FRACTION:
        return f"lung area {frac:.1%} of the image is implausibly large (> {MAX_LUNG_FRACTION:.0%})"
    return ""


def check_segmenter_hash(cfg: PreprocessConfig, segmenter: LungSegmenter) -> None:
    """Refuse a segmenter other than the one the classifier was trained with."""
    want = (cfg.segmenter_sha256 or "").strip().lower()
    if want and want != (segmenter.sha256 or "").lower():
        have = segmenter.sha256[:12] + "..." if segmenter.sha256 else "an unhashed in-memory model"
        raise CheckpointError(
            f"This classifier was trained with another lung segmenter (sha256 {want[:12]}...), "
            f"but the loaded one ({segmenter.path or 'in memory'}) is {have}. Its lung "
            f"'{cfg.lung_view}' view would differ from training: refusing to run. Restore the "
            "segmenter weights the classifier was trained with, or retrain the classifier."
        )


def lung_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right; exclusive) of a mask, grown by ``margin`` x
    the image's height (vertically) and width (horizontally), clipped to the image."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    my, mx = round(margin * h), round(margin * w)
    return (
        max(0, int(rows[0]) - my),
        max(0, int(cols[0]) - mx),
        min(h, int(rows[-1]) + 1 + my),
        min(w, int(cols[-1]) + 1 + mx),
    )


def dilate_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """Grow a mask by ``radius`` pixels (Euclidean; a distance transform, fast at any size)."""
    if radius <= 0:
        return mask.astype(bool)
    dist = cv2.distanceTransform((~mask.astype(bool)).astype(np.uint8), cv2.DIST_L2, 5)
    return dist <= radius


def apply_lung_view(
    gray: np.ndarray,
    cfg: PreprocessConfig,
    mask: np.ndarray | None = None,
    segmenter: LungSegmenter | None = None,
) -> LungView:
    """Crop (``crop``) or crop and mask (``mask``) a full-resolution image to its lungs.

    ``mask`` (any 2-D array; resized to the image, nearest, if needed) replaces the
    segmenter, and then no segmenter is loaded or hash-checked. Otherwise ``segmenter``
    (default: :func:`default_segmenter`) segments the image; if ``cfg.segmenter_sha256`` is
    set and differs from its file's hash, :class:`CheckpointError` is raised. With no lung
    found, or a lung area under 5 % or over 80 % of the image, the full image is returned with
    ``fallback=True`` and the reason.
    """
    g = _as_gray(gray)
    h, w = g.shape
    full = (0, 0, h, w)
    if cfg.lung_view == "none":
        return LungView(g, np.zeros((h, w), bool), full, False, "lung_view is 'none'")
    if mask is None:
        seg = segmenter if segmenter is not None else default_segmenter()
        check_segmenter_hash(cfg, seg)
        lung = seg.segment(g)
    else:
        lung = _resize_mask(mask, (h, w))

    frac = float(lung.mean())
    reason = implausible(lung)
    if reason:
        log.warning("Lung view %r falls back to the full image: %s", cfg.lung_view, reason)
        return LungView(g, np.zeros((h, w), bool), full, True, reason)

    top, left, bottom, right = lung_box(lung, cfg.lung_margin)
    image = g[top:bottom, left:right].copy()
    out_mask = lung[top:bottom, left:right].copy()
    if cfg.lung_view in ("mask", "soft"):
        field = dilate_mask(lung, MASK_DILATION * max(h, w))[top:bottom, left:right]
        if cfg.lung_view == "mask":
            image[~field] = 0.0
            reason = f"lung field ({frac:.1%} of the image), dilated {MASK_DILATION:.0%}, cropped"
        else:
            image = soften_outside(image, field, SOFT_BLUR * max(h, w))
            reason = (f"lung field ({frac:.1%} of the image) kept, the rest blurred and dimmed "
                      f"to {SOFT_DIM:.0%}, cropped")
    else:
        reason = f"lung bounding box ({frac:.1%} of the image) + {cfg.lung_margin:.0%} margin"
    return LungView(image, out_mask, (top, left, bottom, right), False, reason)


def soften_outside(image: np.ndarray, field: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` inside ``field``; outside it, the image Gaussian-blurred (``sigma`` px) and
    dimmed to ``SOFT_DIM``, blended over a feathered edge of about ``sigma`` px."""
    img = image.astype(np.float32, copy=False)
    s = max(float(sigma), 0.5)
    outside = cv2.GaussianBlur(img, (0, 0), s) * SOFT_DIM
    keep = cv2.GaussianBlur(field.astype(np.float32), (0, 0), s / 2)
    return (keep * img + (1.0 - keep) * outside).astype(image.dtype, copy=False)


def dataset_mask_path(image_path: str | Path) -> Path | None:
    """The database layout's lung mask of an image (``<Class>/images/x.png`` ->
    ``<Class>/masks/x.png``), or None when there is none."""
    p = Path(image_path)
    if p.parent.name != "images":
        return None
    cand = p.parent.parent / "masks" / p.name
    return cand if cand.is_file() else None


def reference_lung_mask(gray: np.ndarray, image_path: str | Path | None = None,
                        segmenter: LungSegmenter | None = None) -> tuple[np.ndarray, str]:
    """The lung mask (bool, ``gray``'s resolution) to score a heatmap against, and its source:
    the dataset's own mask when it has one (``"dataset"``), else the shipped segmenter's
    (``"segmenter"``)."""
    g = _as_gray(gray)
    path = dataset_mask_path(image_path) if image_path is not None else None
    if path is not None:
        try:
            return _resize_mask(load_mask(path), g.shape), "dataset"
        except (OSError, ValueError) as exc:
            log.warning("Unreadable lung mask %s (%s); segmenting instead", path, exc)
    seg = segmenter if segmenter is not None else default_segmenter()
    return seg.segment(g), "segmenter"


# --------------------------------------------------------------------------------------------
# Heatmap focus and contours
# --------------------------------------------------------------------------------------------


def _energy_inputs(heatmap: np.ndarray, lung_mask: np.ndarray,
                   region: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    hm = np.asarray(heatmap, dtype=np.float64)
    if hm.ndim != 2:
        raise ValueError(f"A heatmap must be 2-D, got shape {hm.shape}.")
    if not np.isfinite(hm).all():
        raise ValueError("The heatmap contains NaN or infinite values.")
    hm = np.clip(hm, 0.0, None)
    m = _resize_mask(lung_mask, hm.shape)
    if region is not None:  # only the pixels the model saw (e.g. not the letterbox padding)
        r = _resize_mask(region, hm.shape)
        return hm[r], m[r]
    return hm, m


def lung_energy_share(heatmap: np.ndarray, lung_mask: np.ndarray,
                      region: np.ndarray | None = None) -> float:
    """Share of the heatmap's energy (sum of its non-negative values) inside the lung mask.

    In [0, 1]: 1 when all energy lies on the lungs (e.g. a heatmap equal to the mask), 0 when
    none does. The mask is resized (nearest) to the heatmap's shape if they differ; negative
    heatmap values count as 0. ``region`` (bool, optional) limits both to the pixels the model
    saw. Returns nan for an all-zero heatmap or an empty mask.
    """
    hm, m = _energy_inputs(heatmap, lung_mask, region)
    total = float(hm.sum())
    if total <= 0.0 or not m.any():
        return math.nan
    return float(hm[m].sum()) / total


def lung_focus_ratio(heatmap: np.ndarray, lung_mask: np.ndarray) -> float:
    """:func:`lung_energy_share` divided by the lungs' share of the image's area.

    1 = no preference (a uniform heatmap scores exactly 1), higher = concentrated on the lungs
    (at most 1 / area share), 0 = entirely outside. nan for an all-zero heatmap or an empty
    mask.
    """
    share = lung_energy_share(heatmap, lung_mask)
    if math.isnan(share):
        return math.nan
    return share / float(_resize_mask(lung_mask, np.asarray(heatmap).shape).mean())


def draw_lung_contour(
    rgb: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = (0, 255, 0),
    thickness: int = 2,
) -> np.ndarray:
    """A copy of ``rgb`` (HxWx3, or HxW gray made RGB) with the lung mask's outline drawn.

    The mask is resized (nearest) to the image if their shapes differ.
    """
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"Expected an HxWx3 RGB image, got shape {np.asarray(rgb).shape}.")
    out = np.ascontiguousarray(img).copy()
    m = _resize_mask(mask, out.shape[:2]).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        c = tuple(float(v) for v in color) if np.issubdtype(out.dtype, np.floating) else tuple(int(v) for v in color)
        cv2.drawContours(out, contours, -1, c, thickness, lineType=cv2.LINE_AA)
    return out


def load_mask(path: str | Path) -> np.ndarray:
    """A mask file as bool (non-zero = lung)."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise InvalidImageError(f"Cannot read mask {path}")
    return m > 127


if __name__ == "__main__":  # ``python -m core.lungs ...``: the training/benchmark CLI
    runpy.run_module("core.lungs_train", run_name="__main__", alter_sys=True)
