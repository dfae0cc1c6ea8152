"""The one preprocessing contract used by training, evaluation and inference.

Pipeline (all steps configured by :class:`core.config.PreprocessConfig`, which travels in
every checkpoint):

1. ``to_gray`` (:mod:`core.pixels`): any 8/16-bit grayscale, RGB, RGBA, LA or palette image -> float32 in
   [0, 1]. 16-bit data is divided by 65535 (its bit depth), never clipped as Pillow's
   ``convert("L")`` would. Alpha is dropped (X-rays carry no transparency).
2. optional lung view (``crop``/``mask``/``soft``, see ``core.lungs``) on the full-resolution image.
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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from core import lungs
from core.config import AugmentConfig, PreprocessConfig
from core.pixels import clahe as clahe
from core.pixels import letterbox_box as letterbox_box
from core.pixels import load_gray as load_gray
from core.pixels import load_gray_bytes as load_gray_bytes
from core.pixels import resize as resize
from core.pixels import to_gray as to_gray
from core.pixels import to_uint8 as to_uint8

ImageLike = Any  # bytes | str | Path | PIL.Image.Image | np.ndarray


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


def lung_view(gray: np.ndarray, cfg: PreprocessConfig, lung_mask: np.ndarray | None = None) -> Any:
    """The contract's lung-view step: a ``core.lungs.LungView``, or None for ``lung_view="none"``."""
    if cfg.lung_view == "none":
        return None
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
    """uint8 HxW -> float tensor CxHxW, normalised per channel: ``(u8 / 255 - mean) / std``
    in float32.

    In NumPy, not torch: the same IEEE float32 operations (a test checks the result is
    bit-identical to torch's), but single-threaded. Torch splits a 3 x 224 x 224 operation
    over its OpenMP threads, which then spin-wait, and on a 2-core CPU that slowed the
    network call right after it by about 3 ms (ONNX Runtime, ResNet50 at 224 px: 24.3 ms
    right after a torch normalisation against 21.2 ms back to back; 21.1 ms after this one)."""
    x = np.asarray(u8, dtype=np.float32) / np.float32(255.0)
    n = 1 if cfg.channels == 1 else 3
    mean = np.asarray(cfg.mean[:n], dtype=np.float32).reshape(n, 1, 1)
    std = np.asarray(cfg.std[:n], dtype=np.float32).reshape(n, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((x[None] - mean) / std))


def denormalize(x: torch.Tensor, cfg: PreprocessConfig) -> np.ndarray:
    """First channel of a normalised tensor back to a uint8 image (for display)."""
    g = x[0].float() * cfg.std[0] + cfg.mean[0]
    return to_uint8(g.clamp(0, 1).cpu().numpy())


def build_augment(aug: AugmentConfig, seed: int | None = None,
                  img_size: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """albumentations pipeline on the prepared uint8 image (training only).

    Order: random resized crop (``crop_scale``; on a lung view the prepared image is the
    lung box, so the crop lies inside it), rotation/shift/zoom, brightness/contrast, gamma,
    blur, noise, then erasing of border bands (``erase_periphery``). Each optional step is
    added only when it is on: a zero range would still change the random draws, i.e. the
    augmentations an older config's seed gives.
    """
    import albumentations as A

    geometry: dict[str, Any] = {}
    if aug.translate > 0:
        geometry["translate_percent"] = (-aug.translate, aug.translate)
    if aug.scale > 0:
        geometry["scale"] = (1.0 - aug.scale, 1.0 + aug.scale)
    ops: list[Any] = []
    if aug.crop_scale > 0:
        if img_size is None:
            raise ValueError("build_augment: crop_scale needs img_size")
        ops.append(A.RandomResizedCrop(size=(img_size, img_size), scale=(aug.crop_scale, 1.0),
                                       ratio=(0.8, 1.25), p=aug.p))
    ops += [
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
    if aug.gamma > 0:
        ops.append(A.RandomGamma(gamma_limit=(100 * (1 - aug.gamma), 100 * (1 + aug.gamma)),
                                 p=aug.p))
    if aug.blur > 0:
        ops.append(A.GaussianBlur(blur_limit=0, sigma_limit=(0.5, 1.5), p=aug.blur))
    if aug.noise > 0:
        ops.append(A.GaussNoise(std_range=(0.0, aug.noise), per_channel=False, p=aug.p))
    if aug.erase_periphery > 0:
        ops.append(_erase_periphery(A, p=aug.erase_periphery))
    if aug.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    compose = A.Compose(ops, seed=seed)

    def run(u8: np.ndarray) -> np.ndarray:
        return compose(image=u8)["image"]

    run.compose = compose  # type: ignore[attr-defined]  (lets DataLoader workers reseed it)
    return run


ERASE_MAX_BAND = 0.15  # erase_periphery: a band is up to 15 % of the side


def _erase_periphery(A: Any, p: float) -> Any:
    """An albumentations transform that blanks (to 0) a band of random width, up to
    ``ERASE_MAX_BAND`` of the side, along each border with probability 1/2 per border.

    Written here because albumentations has no border-band eraser (``CoarseDropout`` and
    ``Erasing`` place boxes anywhere). Its random draws come from the transform's own seeded
    generator, so a Compose seed still fixes them.
    """

    class ErasePeriphery(A.ImageOnlyTransform):  # type: ignore[name-defined,misc]
        def get_params_dependent_on_data(self, params: dict[str, Any],
                                         data: dict[str, Any]) -> dict[str, Any]:
            rnd = self.py_random
            return {"bands": [rnd.uniform(0, ERASE_MAX_BAND) if rnd.random() < 0.5 else 0.0
                              for _ in range(4)]}

        def apply(self, img: np.ndarray, bands: list[float] = (), **params: Any) -> np.ndarray:
            out = img.copy()
            h, w = out.shape[:2]
            top, bottom, left, right = (round(b * (h if i < 2 else w)) for i, b in enumerate(bands))
            out[:top] = 0
            out[h - bottom:] = 0
            out[:, :left] = 0
            out[:, w - right:] = 0
            return out

    return ErasePeriphery(p=p)


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
        self.augment = (build_augment(aug, seed, cfg.img_size)
                        if train and aug.p > 0 else None)

    def __call__(self, gray: np.ndarray, lung_mask: np.ndarray | None = None) -> torch.Tensor:
        return self.with_view(gray, lung_mask)[0]

    def with_view(self, gray: np.ndarray, lung_mask: np.ndarray | None = None) -> tuple[torch.Tensor, Any]:
        """The model input and the lung view it was cut from (None for ``lung_view="none"``)."""
        u8, view = self.prepared(gray, lung_mask)
        return self.finish(u8), view

    def prepared(self, gray: np.ndarray,
                 lung_mask: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        """The deterministic steps (lung view, resize, CLAHE) -> uint8 S x S, and the view:
        what a dataset may cache between epochs."""
        view = lung_view(gray, self.cfg, lung_mask)
        return prepare(gray, self.cfg, view=view), view

    def finish(self, u8: np.ndarray) -> torch.Tensor:
        """The steps that change per call: augmentation (training only), normalisation."""
        if self.augment is not None:
            u8 = self.augment(u8)
        return normalize(u8, self.cfg)

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
