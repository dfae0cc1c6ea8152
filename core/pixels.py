"""Decoding and pixel operations of the preprocessing contract (see :mod:`core.preprocess`).

The contract's first step (any 8/16-bit grayscale, RGB, RGBA, LA or palette image -> float32
in [0, 1], 16-bit data scaled by its bit depth, never clipped) and the primitives later
steps use: 8-bit rounding, letterbox/stretch resizing and CLAHE. No torch and no lung view
here, so :mod:`core.lungs` (the segmenter) builds on these and :mod:`core.preprocess` (which
applies the lung view) builds on both: the dependencies run one way.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.errors import InvalidImageError


def to_gray(img: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or array to a float32 grayscale array in [0, 1]."""
    if isinstance(img, Image.Image):
        return _pil_to_gray(img)
    return _array_to_gray(np.asarray(img))


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        return _scale_int(arr)
    if mode == "F":
        return _array_to_gray(np.asarray(img, dtype=np.float32))
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    if mode == "LA":
        return np.asarray(img.getchannel("L"), dtype=np.float32) / 255.0
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    # RGB, RGBA, P, PA, CMYK, YCbCr, ...: palette and colour go through RGB, alpha dropped.
    rgb = img.convert("RGB")
    return np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0


def _scale_int(arr: np.ndarray) -> np.ndarray:
    """Integer data of unknown depth: scale by the smallest bit depth that holds it."""
    lo = float(arr.min()) if arr.size else 0.0
    if lo < 0:
        arr = arr - lo
    hi = float(arr.max()) if arr.size else 0.0
    depth = 8 if hi <= 255 else 12 if hi <= 4095 else 16 if hi <= 65535 else 32
    return (arr / float(2**depth - 1)).astype(np.float32)


def _array_to_gray(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:
        if arr.shape[2] == 4:  # RGBA -> RGB
            arr = arr[:, :, :3]
        if arr.shape[2] == 3:
            # ITU-R 601-2 luma, as Pillow's convert("L").
            arr = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            if np.issubdtype(arr.dtype, np.floating) and arr.max() > 1.0:
                arr = arr / (65535.0 if arr.max() > 255 else 255.0)
            return np.clip(arr, 0, 1).astype(np.float32)
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        else:
            raise InvalidImageError(
                f"Unsupported array shape {arr.shape}: expected HxW, HxWx1, HxWx3 or HxWx4."
            )
    if arr.ndim != 2:
        raise InvalidImageError(f"Unsupported array shape {arr.shape}: expected a 2-D image.")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_):
        return _scale_int(arr.astype(np.float64))
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InvalidImageError("The image contains NaN or infinite values.")
    if arr.min() >= 0.0 and arr.max() <= 1.0:
        return arr
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)


def load_gray(path: str | Path) -> np.ndarray:
    """Read an image file from a trusted dataset folder as grayscale float32 [0, 1].

    Uploads go through :func:`core.imaging.decode` instead, which enforces limits.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_gray(img)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"Cannot read image {path}: {exc}") from exc


def load_gray_bytes(data: bytes) -> np.ndarray:
    return load_gray(io.BytesIO(data))  # type: ignore[arg-type]


def to_uint8(gray: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)


def resize(gray: np.ndarray, size: int, mode: str = "letterbox") -> np.ndarray:
    """Resize a 2-D image to ``size`` x ``size`` (see module doc for the modes)."""
    h, w = gray.shape[:2]
    if mode == "stretch":
        interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
        return cv2.resize(gray, (size, size), interpolation=interp)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(gray, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else gray
    if nh == size and nw == size:
        return small
    out = np.zeros((size, size), dtype=gray.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def letterbox_box(shape: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image content inside a letterboxed square."""
    h, w = shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def clahe(u8: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    # A new CLAHE object per call: OpenCV algorithm objects are not safe to share across threads.
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(u8)
