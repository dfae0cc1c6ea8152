"""One image through the preprocessing contract, step by step, and display-only contrast.

:func:`preprocessing_steps` shows what ``core.preprocess`` does to an image, calling the
contract's own functions (``lung_view``, ``prepare``): the last model-input step is exactly
``core.preprocess.prepare(gray, cfg)``, the array the network sees before normalisation.

:func:`display_contrast` changes how an image is *shown* (the Clinical Predictions page's
contrast control); it is never applied to a model input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from core import preprocess
from core.config import PreprocessConfig, from_dict

DISPLAY_CONTRASTS = ("As decoded", "Auto-stretch", "Local equalisation")
"""Display-only contrast options: the decoded image; its 1st-99th percentiles stretched to
black-white; CLAHE (the contract's own, ``core.preprocess.clahe``)."""


@dataclass(frozen=True, eq=False)
class Step:
    """One stage of the preprocessing contract: ``image`` is uint8 gray (H x W) or RGB
    (H x W x 3, for the lung-field outline); ``caption`` says what happened."""

    name: str
    image: np.ndarray
    caption: str


def preprocess_config(run: Any) -> PreprocessConfig:
    """The run's preprocessing contract (``run.json``'s, else ``config.json``'s)."""
    pre = ((run.summary or {}).get("preprocess") or (run.config or {}).get("preprocess")
           or {})
    return from_dict(PreprocessConfig, dict(pre))


def preprocessing_steps(gray: np.ndarray, cfg: PreprocessConfig,
                        lung_mask: np.ndarray | None = None) -> list[Step]:
    """Original, lung view (runs that use one), letterbox (or stretch), CLAHE (= the model
    input) and, for runs without a lung view, the lung field the shipped segmenter finds
    (what the lung-focus score is measured against).

    ``gray``: float32 in [0, 1] (``core.imaging.decode`` or ``core.preprocess.load_gray``);
    ``lung_mask``: an optional reference lung mask at ``gray``'s resolution (else the
    shipped segmenter's).
    """
    h, w = gray.shape
    steps = [Step("Original", preprocess.to_uint8(gray), f"{w} x {h} px, as decoded")]
    view = preprocess.lung_view(gray, cfg, lung_mask)
    if view is not None:
        caption = (f"'{cfg.lung_view}' fell back to the whole image: {view.reason}"
                   if view.fallback else f"'{cfg.lung_view}': {view.reason}")
        steps.append(Step("Lung view", preprocess.to_uint8(view.image), caption))
    plain = dataclasses.replace(cfg, clahe=False, lung_view="none")
    sized = preprocess.prepare(view.image if view is not None else gray, plain)
    how = ("longer side scaled, shorter side padded with black (aspect ratio kept)"
           if cfg.resize_mode == "letterbox" else "stretched (aspect ratio not kept)")
    steps.append(Step("Letterbox" if cfg.resize_mode == "letterbox" else "Resize", sized,
                      f"{cfg.img_size} x {cfg.img_size} px, {how}"))
    model_input = preprocess.prepare(gray, cfg, view=view)
    if cfg.clahe:
        steps.append(Step("CLAHE", model_input,
                          f"local contrast equalisation, clip {cfg.clahe_clip:g}, "
                          f"{cfg.clahe_tiles} x {cfg.clahe_tiles} tiles; the model input"))
    else:
        steps[-1] = dataclasses.replace(steps[-1], caption=steps[-1].caption + "; the model input")
    if view is None:
        steps.append(_lung_field_step(gray, cfg, model_input, lung_mask))
    return steps


def _lung_field_step(gray: np.ndarray, cfg: PreprocessConfig, model_input: np.ndarray,
                     lung_mask: np.ndarray | None) -> Step:
    from core import lungs  # local import: the segmenter loads only when this step is shown

    mask = lung_mask if lung_mask is not None else lungs.default_segmenter().segment(gray)
    why = lungs.implausible(mask)
    if why:
        return Step("Lung field", np.repeat(model_input[:, :, None], 3, axis=2),
                    f"no plausible lung field found ({why})")
    outlined = lungs.draw_lung_contour(model_input, preprocess.mask_to_input(mask, cfg),
                                       thickness=1)
    return Step("Lung field", outlined,
                "the shipped segmenter's outline on the model input, what lung focus is "
                "measured against (this run's model sees the whole image)")


def display_contrast(image: np.ndarray, mode: str = DISPLAY_CONTRASTS[0]) -> np.ndarray:
    """A uint8 gray image for display under one of :data:`DISPLAY_CONTRASTS`."""
    if mode not in DISPLAY_CONTRASTS:
        raise ValueError(f"contrast {mode!r} is not one of {DISPLAY_CONTRASTS}")
    u8 = image if image.dtype == np.uint8 else preprocess.to_uint8(image)
    if mode == "Auto-stretch":
        lo, hi = np.percentile(u8, (1, 99))
        if hi <= lo:
            return u8.copy()
        scaled = (u8.astype(np.float32) - lo) / float(hi - lo)
        return preprocess.to_uint8(np.clip(scaled, 0.0, 1.0))
    if mode == "Local equalisation":
        return preprocess.clahe(u8)
    return u8
