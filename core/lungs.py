"""Lung-field segmentation: a small U-Net shipped trained, lung crop/mask views, lung focus.

Architecture
    A compact, hand-written U-Net (:class:`UNet`; ``arch = "unet"``): 5 down-sampling levels
    with 8-16-32-64-128-256 channels, two 3x3 conv-BN-ReLU per encoder level, transposed-
    convolution up-sampling, skip concatenation and one 3x3 conv-BN-ReLU per decoder level,
    about 1.75 M parameters (7 MB fp32), on a 1-channel 128 x 128 input. Why not
    torchvision's LRASPP-MobileNetV3: no ImageNet weights can be downloaded here, LRASPP leans
    on a pretrained backbone and predicts at 1/8 resolution (coarse lung borders), whereas a
    small U-Net trains from scratch in minutes on a CPU and keeps full-resolution skips for
    sharp borders. Why this width: a 16-channel U-Net took ~40 ms per 128 px image on the
    shared 2-core CPU; 8 base channels and a single-conv decoder cut the compute ~4x to
    0.19 GMAC (13-17 ms of CPU time per image on one thread, see ``bench``), and the fifth
    level (4 x 4 bottleneck, cheap) gives a receptive field spanning the whole chest, which
    keeps the two lungs coherent. For single images on shared cores one torch thread is
    fastest: several OpenMP threads wait on each other when other jobs hold the cores.

Preprocessing (stored in the weights file under ``"preprocess"`` and read back from it)
    grayscale [0, 1] -> letterbox resize to ``img_size`` (aspect ratio kept, black padding,
    as :func:`core.preprocess.resize`) -> 8-bit -> CLAHE (clip 2.0, 8 x 8 tiles) ->
    ``(x / 255 - 0.5) / 0.25``. The network's logits are cut back to the letterbox content,
    resized (bilinear) to the input's resolution, thresholded at 0.5 probability, and only
    the two largest connected components (the two lungs) are kept.

Lung views (``PreprocessConfig.lung_view``), see :func:`apply_lung_view`
    ``crop``: the lungs' bounding box plus ``lung_margin`` x the image side on each side;
    ``mask``: the same crop with everything outside the dilated lung field set to 0.
    Implausible segmentations (no lung, or under 5 % / over 80 % of the image) fall back to
    the full image and say why.

Command line::

    python -m core.lungs train --data-dir ../shared/data/lung-masks --output assets/lung_segmenter.pt
    python -m core.lungs bench --data-dir ../shared/data/lung-masks

Research use only: not a medical device.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import hashlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import PreprocessConfig
from core.devices import release_free_memory
from core.errors import CheckpointError, DatasetError, InvalidImageError
from core.model import torch_load_file
from core.preprocess import clahe, letterbox_box, load_gray, resize, to_gray, to_uint8

log = logging.getLogger(__name__)

DEFAULT_SEGMENTER_PATH = Path(__file__).resolve().parent.parent / "assets" / "lung_segmenter.pt"
DEFAULT_DATA_DIR = "../shared/data/lung-masks"
SEGMENTER_FORMAT = "cxr-insight-lung-segmenter"
SEGMENTER_VERSION = 1
ARCH_NAME = "unet"

MIN_LUNG_FRACTION = 0.05  # below this share of the image, the segmentation is implausible
MAX_LUNG_FRACTION = 0.80  # above this share, too
MASK_DILATION = 0.03  # "mask" view: grow the lung field by 3 % of the image's longer side
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
HOLDOUT_SPLITS = ("val", "valid", "validation", "test", "holdout")

DEFAULT_PREPROCESS: dict[str, Any] = {
    "resize_mode": "letterbox",
    "clahe": True,
    "clahe_clip": 2.0,
    "clahe_tiles": 8,
    "mean": 0.5,
    "std": 0.25,
}


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A compact U-Net: ``depth`` poolings, channels ``base * 2**level``, one logit map out.

    Encoder levels have two 3x3 conv-BN-ReLU blocks; decoder levels (transposed-conv
    up-sampling, skip concatenation) have ``decoder_convs`` of them. The input side must be
    divisible by ``2**depth``.
    """

    def __init__(
        self, base: int = 8, depth: int = 5, decoder_convs: int = 1, in_channels: int = 1
    ) -> None:
        super().__init__()
        chs = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList(
            [_DoubleConv(in_channels, chs[0])]
            + [_DoubleConv(chs[i - 1], chs[i]) for i in range(1, depth + 1)]
        )
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(chs[i], chs[i - 1], 2, stride=2) for i in range(depth, 0, -1)]
        )
        dec = _DoubleConv if decoder_convs == 2 else _ConvBNReLU
        if decoder_convs not in (1, 2):
            raise ValueError("decoder_convs must be 1 or 2")
        self.decoders = nn.ModuleList([dec(2 * chs[i - 1], chs[i - 1]) for i in range(depth, 0, -1)])
        self.head = nn.Conv2d(chs[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


DEFAULT_ARCH_PARAMS: dict[str, int] = {"base": 8, "depth": 5, "decoder_convs": 1}


def build_segmenter_model(arch_params: dict[str, Any] | None = None) -> UNet:
    """The U-Net of a weights file's ``arch_params`` (defaults: :data:`DEFAULT_ARCH_PARAMS`)."""
    p = {**DEFAULT_ARCH_PARAMS, **(arch_params or {})}
    return UNet(base=int(p["base"]), depth=int(p["depth"]), decoder_convs=int(p["decoder_convs"]))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks of the same shape (both empty: 1.0, 1.0)."""
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    inter = float(np.logical_and(p, t).sum())
    total = float(p.sum() + t.sum())
    union = total - inter
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / union


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


class LungSegmenter:
    """A trained lung-field segmenter. Build with :meth:`load`; thread-safe for inference."""

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
        x = torch.from_numpy(_model_input(g, self.img_size, self.preprocess))[None, None]
        with torch.inference_mode():
            out = self.model(x)[0, 0].float().numpy()
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
    if cfg.lung_view == "mask":
        field = dilate_mask(lung, MASK_DILATION * max(h, w))[top:bottom, left:right]
        image[~field] = 0.0
        reason = f"lung field ({frac:.1%} of the image), dilated {MASK_DILATION:.0%}, cropped"
    else:
        reason = f"lung bounding box ({frac:.1%} of the image) + {cfg.lung_margin:.0%} margin"
    return LungView(image, out_mask, (top, left, bottom, right), False, reason)


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


# --------------------------------------------------------------------------------------------
# Data (training and evaluation)
# --------------------------------------------------------------------------------------------


def list_pairs(data_dir: str | Path) -> list[str]:
    """Sorted file names present in both ``<data_dir>/images`` and ``<data_dir>/masks``."""
    root = Path(data_dir)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetError(
            f"{root} must hold images/ and masks/ folders (images/<name>.png and "
            "masks/<name>.png, 0 = background, 255 = lung)."
        )
    names = sorted(
        p.name for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
    )
    missing = [n for n in names if not (mask_dir / n).is_file()]
    if missing:
        log.warning("%d images have no mask and are skipped (e.g. %s)", len(missing), missing[0])
    pairs = [n for n in names if (mask_dir / n).is_file()]
    if len(pairs) < 10:
        raise DatasetError(f"{root}: only {len(pairs)} image/mask pairs; need at least 10.")
    return pairs


def choose_holdout(data_dir: str | Path, names: Sequence[str], every: int = 10) -> tuple[list[str], str]:
    """The fixed held-out files: the MANIFEST.csv's validation split if it has one (a
    ``split`` or ``original_split`` column), else every ``every``-th file of the sorted list."""
    manifest = Path(data_dir) / "MANIFEST.csv"
    known = set(names)
    if manifest.is_file():
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        for col in ("split", "original_split"):
            if rows and "file" in rows[0] and col in rows[0]:
                held = sorted(
                    r["file"] for r in rows
                    if r[col].strip().lower() in HOLDOUT_SPLITS and r["file"] in known
                )
                if 0 < len(held) < len(names):
                    return held, f"MANIFEST.csv column {col!r} in {HOLDOUT_SPLITS}"
    return [n for i, n in enumerate(names) if i % every == 0], f"every {every}th sorted file"


def read_holdout(path: str | Path) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def load_mask(path: str | Path) -> np.ndarray:
    """A mask file as bool (non-zero = lung)."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise InvalidImageError(f"Cannot read mask {path}")
    return m > 127


def _prepare_pair(
    data_dir: Path, name: str, img_size: int, prep: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(CLAHE'd uint8 image, float32 soft mask) at img_size, letterboxed like inference."""
    gray = load_gray(data_dir / "images" / name)
    mask = load_mask(data_dir / "masks" / name)
    if mask.shape != gray.shape:
        mask = _resize_mask(mask, gray.shape)
    u8 = to_uint8(resize(gray, img_size, prep["resize_mode"]))
    if prep["clahe"]:
        u8 = clahe(u8, prep["clahe_clip"], prep["clahe_tiles"])
    soft = resize(mask.astype(np.float32), img_size, prep["resize_mode"])
    return u8, soft.astype(np.float32)


class _PairDataset(torch.utils.data.Dataset):
    """Pre-loaded image/mask pairs with light, seeded augmentation (cv2)."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        prep: dict[str, Any],
        augment: bool,
        seed: int = 0,
        rotate: float = 10.0,
        scale: float = 0.10,
        shift: float = 0.05,
        brightness: float = 0.10,
        contrast: float = 0.15,
    ) -> None:
        self.images, self.masks, self.prep = images, masks, prep
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.rotate, self.scale, self.shift = rotate, scale, shift
        self.brightness, self.contrast = brightness, contrast

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, m = self.images[i], self.masks[i]
        if self.augment:
            img, m = self._augment(img, m)
        x = _normalise_u8(img, self.prep)
        return torch.from_numpy(x)[None], torch.from_numpy(np.ascontiguousarray(m))[None]

    def _augment(self, img: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self.rng
        s = img.shape[0]
        if r.random() < 0.8:
            angle = r.uniform(-self.rotate, self.rotate)
            sc = r.uniform(1 - self.scale, 1 + self.scale)
            mat = cv2.getRotationMatrix2D((s / 2 - 0.5, s / 2 - 0.5), angle, sc)
            mat[:, 2] += r.uniform(-self.shift, self.shift, size=2) * s
            img = cv2.warpAffine(img, mat, (s, s), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            m = cv2.warpAffine(m, mat, (s, s), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if r.random() < 0.8:
            f = img.astype(np.float32)
            c = r.uniform(1 - self.contrast, 1 + self.contrast)
            b = r.uniform(-self.brightness, self.brightness) * 255.0
            f = (f - f.mean()) * c + f.mean() + b
            img = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        return img, m


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (per image, averaged)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return bce + (1 - dice).mean()


def evaluate_dir(
    segmenter: LungSegmenter, data_dir: str | Path, names: Sequence[str], progress: bool = True
) -> dict[str, float]:
    """Mean per-image Dice/IoU of ``segmenter.segment`` at each mask's native resolution."""
    from tqdm import tqdm

    root = Path(data_dir)
    dices, ious = [], []
    for name in tqdm(names, desc="held-out", unit="img", disable=not progress, leave=False):
        gray = load_gray(root / "images" / name)
        target = _resize_mask(load_mask(root / "masks" / name), gray.shape)
        d, j = dice_iou(segmenter.segment(gray), target)
        dices.append(d)
        ious.append(j)
    return {
        "dice": float(np.mean(dices)),
        "iou": float(np.mean(ious)),
        "dice_min": float(np.min(dices)),
        "dice_p05": float(np.percentile(dices, 5)),
        "n": len(names),
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from core.model import library_versions, save_checkpoint

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.img_size % 2**args.depth:
        raise SystemExit(f"--img-size must be divisible by {2**args.depth} (2**depth)")
    data_dir = Path(args.data_dir)
    output = Path(args.output)
    names = list_pairs(data_dir)
    if args.holdout_list:
        holdout = read_holdout(args.holdout_list)
        holdout_rule = f"read from {args.holdout_list}"
    else:
        holdout, holdout_rule = choose_holdout(data_dir, names, args.holdout_every)
    unknown = sorted(set(holdout) - set(names))
    if unknown:
        raise DatasetError(f"Held-out files missing from {data_dir}: {unknown[:5]}")
    held = set(holdout)
    train_names = [n for n in names if n not in held]
    holdout_path = output.with_name(output.stem + "_holdout.txt")
    holdout_path.parent.mkdir(parents=True, exist_ok=True)
    holdout_path.write_text(
        f"# Held-out files of the lung segmenter ({holdout_rule}); never trained on.\n"
        + "\n".join(holdout) + "\n"
    )
    log.info("%d pairs: %d train, %d held out (%s) -> %s", len(names), len(train_names),
             len(holdout), holdout_rule, holdout_path)

    prep = dict(DEFAULT_PREPROCESS)
    prep["clahe"] = not args.no_clahe
    imgs, masks = [], []
    for n in tqdm(train_names, desc="loading", unit="img", leave=False):
        u8, m = _prepare_pair(data_dir, n, args.img_size, prep)
        imgs.append(u8)
        masks.append(m)
    ds = _PairDataset(np.stack(imgs), np.stack(masks), prep, augment=not args.no_augment,
                      seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, generator=gen, num_workers=0)
    arch_params = {"base": args.base, "depth": args.depth, "decoder_convs": args.decoder_convs}
    model = build_segmenter_model(arch_params).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("U-Net base %d depth %d: %.2f M parameters", args.base, args.depth, n_params / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * len(loader), pct_start=0.1
    )
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False)
        for x, y in bar:
            loss = _loss(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        msg = f"epoch {epoch}/{args.epochs}: loss {total / count:.4f}, {time.perf_counter() - start:.0f} s"
        if args.eval_every and (epoch % args.eval_every == 0) and epoch < args.epochs:
            # Monitoring only: the shipped weights are the last epoch's, never picked on this.
            seg = LungSegmenter(model, args.img_size, prep)
            m = evaluate_dir(seg, data_dir, holdout)
            msg += f", held-out Dice {m['dice']:.4f}"
        log.info(msg)

    model.eval()
    seg = LungSegmenter(model, args.img_size, prep)
    metrics = evaluate_dir(seg, data_dir, holdout)
    minutes = (time.perf_counter() - start) / 60
    payload = {
        "format": SEGMENTER_FORMAT,
        "version": SEGMENTER_VERSION,
        "arch": ARCH_NAME,
        "arch_params": arch_params,
        "n_params": int(n_params),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "img_size": int(args.img_size),
        "preprocess": prep,
        "threshold": 0.5,
        "postprocess": "keep the 2 largest 8-connected components",
        "holdout_dice": metrics["dice"],
        "holdout_iou": metrics["iou"],
        "holdout": {**metrics, "rule": holdout_rule, "list": holdout_path.name},
        "train": {
            "data_dir": str(data_dir),
            "n_train": len(train_names),
            "epochs": int(args.epochs),
            "batch_size": int(args.batch_size),
            "lr": float(args.lr),
            "weight_decay": float(args.weight_decay),
            "augment": not args.no_augment,
            "loss": "BCE + soft Dice",
            "seed": int(args.seed),
            "minutes": round(minutes, 1),
            "threads": int(args.threads),
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(),
    }
    save_checkpoint(payload, output)
    log.info(
        "held-out (%d images, native resolution): Dice %.4f, IoU %.4f (min Dice %.4f); "
        "%.1f min; saved %s (sha256 %s)",
        metrics["n"], metrics["dice"], metrics["iou"], metrics["dice_min"], minutes, output,
        file_sha256(output),
    )
    return metrics


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    seg = LungSegmenter.load(args.weights)
    data_dir = Path(args.data_dir)
    names = list_pairs(data_dir)
    holdout_file = Path(args.holdout_list) if args.holdout_list else Path(args.weights).with_name(
        Path(args.weights).stem + "_holdout.txt")
    holdout = read_holdout(holdout_file) if holdout_file.is_file() else choose_holdout(data_dir, names)[0]
    sample = holdout[: args.n]
    grays = [load_gray(data_dir / "images" / n) for n in sample]
    for g in grays[:5]:  # warm-up
        seg.segment(g)
    seg_ms, net_ms, cpu_ms = [], [], []
    x = torch.from_numpy(_model_input(grays[0], seg.img_size, seg.preprocess))[None, None]
    for g in grays:
        t0, c0 = time.perf_counter(), time.process_time()
        seg.segment(g)
        seg_ms.append((time.perf_counter() - t0) * 1000)
        cpu_ms.append((time.process_time() - c0) * 1000)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seg.model(x)
        net_ms.append((time.perf_counter() - t0) * 1000)
    metrics = evaluate_dir(seg, data_dir, holdout, progress=False)
    shape = "x".join(str(v) for v in grays[0].shape)
    out = {
        "segment_p50_ms": float(np.percentile(seg_ms, 50)),
        "segment_p90_ms": float(np.percentile(seg_ms, 90)),
        "segment_cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
        "network_p50_ms": float(np.percentile(net_ms, 50)),
        "network_p90_ms": float(np.percentile(net_ms, 90)),
        **{f"holdout_{k}": v for k, v in metrics.items()},
    }
    print(f"weights      {seg.path} (sha256 {seg.sha256[:16]}...)")
    print(f"threads      {torch.get_num_threads()}, fp32, inference_mode, batch 1")
    print(f"segment()    {len(seg_ms)} images {shape}: p50 {out['segment_p50_ms']:.1f} ms, "
          f"p90 {out['segment_p90_ms']:.1f} ms (preprocess + network + resize + components)")
    print(f"segment() CPU time p50 {out['segment_cpu_p50_ms']:.1f} ms, all threads (wall time "
          f"above it means other processes share the cores); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"network      {seg.img_size}x{seg.img_size}: p50 {out['network_p50_ms']:.1f} ms, "
          f"p90 {out['network_p90_ms']:.1f} ms")
    print(f"held-out     {metrics['n']} images ({holdout_file.name if holdout_file.is_file() else 'derived'}): "
          f"Dice {metrics['dice']:.4f}, IoU {metrics['iou']:.4f}, min Dice {metrics['dice_min']:.4f}")
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.lungs",
        description="Train or benchmark the lung-field segmenter (research use only).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the U-Net on a folder with images/ and masks/",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = t.add_argument_group("data")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="folder with images/<name> and masks/<name> (255 = lung)")
    g.add_argument("--holdout-list", default="",
                   help="text file of held-out names (default: MANIFEST.csv's val split, "
                        "else every --holdout-every-th sorted file)")
    g.add_argument("--holdout-every", type=int, default=10)
    g = t.add_argument_group("output")
    g.add_argument("--output", default=str(DEFAULT_SEGMENTER_PATH),
                   help="weights file; the held-out list is written beside it as <stem>_holdout.txt")
    g = t.add_argument_group("model and preprocessing")
    g.add_argument("--img-size", type=int, default=128)
    g.add_argument("--base", type=int, default=DEFAULT_ARCH_PARAMS["base"],
                   help="U-Net channels at full resolution (doubled per level)")
    g.add_argument("--depth", type=int, default=DEFAULT_ARCH_PARAMS["depth"],
                   help="U-Net poolings (--img-size must be divisible by 2**depth)")
    g.add_argument("--decoder-convs", type=int, choices=(1, 2),
                   default=DEFAULT_ARCH_PARAMS["decoder_convs"], help="3x3 convs per decoder level")
    g.add_argument("--no-clahe", action="store_true", help="skip CLAHE in preprocessing")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--no-augment", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=5,
                   help="log held-out Dice every N epochs (monitoring only; 0 = off)")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads")

    b = sub.add_parser("bench", help="segmentation latency and the held-out Dice of a weights file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = b.add_argument_group("inputs")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    g.add_argument("--weights", default=str(DEFAULT_SEGMENTER_PATH))
    g.add_argument("--holdout-list", default="",
                   help="default: <weights stem>_holdout.txt beside the weights")
    g = b.add_argument_group("timing")
    g.add_argument("-n", type=int, default=50, help="images to time")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for one small image when other jobs "
                        "share the cores (several OpenMP threads then wait on each other); "
                        "0 = torch's default")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            train(args)
        else:
            bench(args)
    except (DatasetError, CheckpointError, InvalidImageError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
