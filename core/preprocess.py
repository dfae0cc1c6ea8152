"""The one preprocessing contract used by training, evaluation and inference.

Pipeline (all steps configured by :class:`core.config.PreprocessConfig`, which travels in
every checkpoint):

1. ``to_gray``: any 8/16-bit grayscale, RGB, RGBA, LA or palette image -> float32 in
   [0, 1]. 16-bit data is divided by 65535 (its bit depth), never clipped as Pillow's
   ``convert("L")`` would. Alpha is dropped (X-rays carry no transparency).
2. optional lung view (``crop``/``mask``, see ``core.lungs``) on the full-resolution image.
3. ``resize``: ``letterbox`` keeps the aspect ratio, scales the long side to ``img_size``
   and pads the short side with black, centred (no anatomy is cut or distorted);
   ``stretch`` ignores the aspect ratio.
4. CLAHE (OpenCV, clip 2.0, 8x8 tiles by default) on the *resized* 8-bit image, so a tile
   covers the same anatomy whatever the source resolution. Deterministic.
5. training only: albumentations augmentation (small rotation, brightness/contrast,
   optional horizontal flip).
6. scale to [0, 1], replicate to 3 identical channels and normalise with ImageNet's
   mean/std, so torchvision's ImageNet stem is used unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from core.config import AugmentConfig, PreprocessConfig
from core.errors import InvalidImageError

ImageLike = Any  # bytes | str | Path | PIL.Image.Image | np.ndarray


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


def mask_to_input(mask: np.ndarray, cfg: PreprocessConfig,
                  box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A full-resolution mask (e.g. the lungs) -> bool ``img_size`` x ``img_size`` on the model
    input's pixel grid: cropped to the lung view's ``box`` (top, left, bottom, right) when
    given, then resized exactly as the image (``resize_mode``; padding is False)."""
    m = np.asarray(mask).astype(np.float32)
    if box is not None:
        top, left, bottom, right = box
        m = m[top:bottom, left:right]
    return resize(m, cfg.img_size, cfg.resize_mode) >= 0.5


def clahe(u8: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    # A new CLAHE object per call: OpenCV algorithm objects are not safe to share across threads.
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(u8)


def lung_view(gray: np.ndarray, cfg: PreprocessConfig, lung_mask: np.ndarray | None = None) -> Any:
    """The contract's lung-view step: a ``core.lungs.LungView``, or None for ``lung_view="none"``."""
    if cfg.lung_view == "none":
        return None
    from core import lungs  # local import: only lung-view runs need the segmenter

    return lungs.apply_lung_view(gray, cfg, mask=lung_mask)


def prepare(gray: np.ndarray, cfg: PreprocessConfig, lung_mask: np.ndarray | None = None,
            view: Any = None) -> np.ndarray:
    """Deterministic part of the contract: grayscale [0,1] -> resized, CLAHE'd uint8 image.

    ``view``: an already computed :func:`lung_view` of ``gray`` (avoids segmenting twice).
    """
    if cfg.lung_view != "none":
        gray = (view if view is not None else lung_view(gray, cfg, lung_mask)).image
    u8 = to_uint8(resize(gray.astype(np.float32), cfg.img_size, cfg.resize_mode))
    if cfg.clahe:
        u8 = clahe(u8, cfg.clahe_clip, cfg.clahe_tiles)
    return u8


def normalize(u8: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 HxW -> float tensor CxHxW, normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).float().div_(255.0)
    if cfg.channels == 1:
        return ((x - cfg.mean[0]) / cfg.std[0]).unsqueeze(0)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (x.unsqueeze(0) - mean) / std


def denormalize(x: torch.Tensor, cfg: PreprocessConfig) -> np.ndarray:
    """First channel of a normalised tensor back to a uint8 image (for display)."""
    g = x[0].float() * cfg.std[0] + cfg.mean[0]
    return to_uint8(g.clamp(0, 1).cpu().numpy())


def build_augment(aug: AugmentConfig, seed: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """albumentations pipeline on the prepared uint8 image (training only)."""
    import albumentations as A

    # Shift and zoom only when asked: passing zero ranges would still change the random
    # draws, i.e. the augmentations a seed gives.
    geometry: dict[str, Any] = {}
    if aug.translate > 0:
        geometry["translate_percent"] = (-aug.translate, aug.translate)
    if aug.scale > 0:
        geometry["scale"] = (1.0 - aug.scale, 1.0 + aug.scale)
    ops: list[Any] = [
        A.Affine(
            rotate=(-aug.rotate_deg, aug.rotate_deg),
            **geometry,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=aug.p,
        ),
        A.RandomBrightnessContrast(
            brightness_limit=aug.brightness, contrast_limit=aug.contrast, p=aug.p
        ),
    ]
    if aug.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    compose = A.Compose(ops, seed=seed)

    def run(u8: np.ndarray) -> np.ndarray:
        return compose(image=u8)["image"]

    run.compose = compose  # type: ignore[attr-defined]  (lets DataLoader workers reseed it)
    return run


class Transform:
    """Callable grayscale [0,1] array -> normalised CxHxW tensor, built by :func:`build_transform`."""

    def __init__(
        self,
        cfg: PreprocessConfig,
        train: bool = False,
        augment: AugmentConfig | None = None,
        seed: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.train = train
        aug = augment or AugmentConfig()
        self.augment = build_augment(aug, seed) if train and aug.p > 0 else None

    def __call__(self, gray: np.ndarray, lung_mask: np.ndarray | None = None) -> torch.Tensor:
        return self.with_view(gray, lung_mask)[0]

    def with_view(self, gray: np.ndarray, lung_mask: np.ndarray | None = None) -> tuple[torch.Tensor, Any]:
        """The model input and the lung view it was cut from (None for ``lung_view="none"``)."""
        view = lung_view(gray, self.cfg, lung_mask)
        u8 = prepare(gray, self.cfg, view=view)
        if self.augment is not None:
            u8 = self.augment(u8)
        return normalize(u8, self.cfg), view

    def reseed(self, seed: int) -> None:
        if self.augment is not None:
            self.augment.compose.set_random_seed(seed)  # type: ignore[attr-defined]


def build_transform(
    cfg: PreprocessConfig,
    train: bool = False,
    augment: AugmentConfig | None = None,
    seed: int | None = None,
) -> Transform:
    """The single entry point that training, evaluation and inference use."""
    return Transform(cfg, train=train, augment=augment, seed=seed)


def preprocess_image(image: ImageLike, cfg: PreprocessConfig) -> torch.Tensor:
    """Convenience: any image-like (path, bytes, PIL, array) -> model input tensor."""
    if isinstance(image, bytes | bytearray):
        gray = load_gray_bytes(bytes(image))
    elif isinstance(image, str | Path):
        gray = load_gray(image)
    else:
        gray = to_gray(image)
    return build_transform(cfg)(gray)
