"""Class activation maps for the ResNet classifier: Grad-CAM, Grad-CAM++, EigenCAM; overlays.

Why a library, and what is hand-written
---------------------------------------
The CAM methods come from pytorch-grad-cam (``pytorch_grad_cam``), the reference
implementation that most papers and tools compare against: its hooks live in one place and
are removed by a context manager, and its targets are small callables. Only one thing is
written here by hand, the **fast default path** (:func:`forward_with_cam`):

At ``layer4`` of a ResNet, which is followed by global average pooling and a linear head,
``logit_c = sum_k w_ck * mean_ij A_k(i, j) + b_c``, so the gradient of the logit with
respect to the activation ``A_k(i, j)`` is ``w_ck / (H * W)``, constant over space.
Grad-CAM's channel weight is the spatial mean of that gradient, ``w_ck / (H * W)``, and
its map ``ReLU(sum_k w_ck * A_k) / (H * W)``: the class activation map (Zhou et al. 2016)
up to a positive scale, which the min-max normalisation removes. So the map comes out of the
forward pass alone: no hooks and no backward pass. That makes it thread-safe on a model
shared by many threads, and it works under ``torch.inference_mode`` and bf16 autocast.
``tests/test_gradcam.py`` checks that it equals pytorch-grad-cam's ``GradCAM``.

Every other method or layer goes through the library, in fp32 (the library runs a backward
pass, which does not work under inference mode, and it is not meant for bf16 autocast).

Library calls and threads
-------------------------
pytorch-grad-cam registers forward hooks on the target layer, calls ``model.eval()`` and
runs a backward pass that writes ``.grad`` into the parameters. On a model that several
threads share (one Predictor for a whole Streamlit server) hooks on the shared model
would collect the activations of every forward pass that runs meanwhile, from any thread,
and mix them up. So the library never sees the shared model: it works on a *shadow* copy
whose modules are new objects (hooks and the train/eval flag stay on the copy) but whose
parameters alias the shared tensors without copying them (``requires_grad=False``, so no
``.grad`` is written; the input carries the gradient instead). A module-level
:data:`_LIBRARY_LOCK` also runs the library calls one at a time, because each one holds
a whole autograd graph (peak memory) and uses every CPU thread; the hook-free fast path
never takes it.

Outputs
-------
Heatmaps are float32 in [0, 1], normalised per image (an all-zero map stays zero), at the
model input's resolution: every method's map is computed at its layer's resolution and
resized by :func:`upsample` (bicubic; see there why not the library's bilinear). Use
:func:`to_original` to map one back onto the original image (undoing the letterbox) and
:func:`overlay` to draw it.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from core.errors import ConfigError
from core.pixels import letterbox_box

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++", "eigencam")
STAGES = ("layer1", "layer2", "layer3", "layer4")
RANDOMIZE_CASCADE = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")
COLORMAPS = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "plasma": cv2.COLORMAP_PLASMA,
    "hot": cv2.COLORMAP_HOT,
    "bone": cv2.COLORMAP_BONE,
}

# Serialises pytorch-grad-cam calls (each holds a full autograd graph and all CPU threads);
# see the module docstring. The fast path does not take it.
_LIBRARY_LOCK = threading.Lock()

Target = int | Sequence[int] | torch.Tensor | None


# ---------------------------------------------------------------- model structure


def _require_resnet(model: nn.Module) -> None:
    needed = ("conv1", "bn1", "relu", "maxpool", *STAGES, "avgpool", "fc")
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ConfigError(f"CAMs need a torchvision ResNet; this model lacks {missing}")


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The linear layer that produces the logits (``fc`` or the last Linear inside it)."""
    fc = model.fc
    if isinstance(fc, nn.Linear):
        return fc
    linears = [m for m in fc.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("the model's fc head has no Linear layer")
    return linears[-1]


def layer_names(model: nn.Module) -> list[str]:
    """Valid ``target_layer`` names: the stages (``layer4`` = its last block) and blocks."""
    _require_resnet(model)
    names: list[str] = []
    for stage in STAGES:
        names.append(stage)
        names.extend(f"{stage}.{i}" for i in range(len(getattr(model, stage))))
    return names


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module a dotted ``target_layer`` name means (``"layer4"`` -> ``model.layer4[-1]``)."""
    valid = layer_names(model)
    if name not in valid:
        raise ConfigError(f"target_layer={name!r} is not valid; choose one of: {', '.join(valid)}")
    stage, _, index = name.partition(".")
    blocks = getattr(model, stage)
    return blocks[int(index)] if index else blocks[-1]


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not valid; choose one of: {', '.join(METHODS)}")
    return method


def _uses_fast_path(model: nn.Module, method: str, layer: nn.Module) -> bool:
    return (method == "gradcam" and layer is model.layer4[-1]
            and isinstance(model.avgpool, nn.AdaptiveAvgPool2d))


def _target_indices(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample class indices: argmax of the logits when ``target`` is None."""
    n, c = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    idx = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(n)
    if idx.numel() != n:
        raise ConfigError(f"got {idx.numel()} targets for a batch of {n} images")
    if bool(((idx < 0) | (idx >= c)).any()):
        raise ConfigError(f"target {idx.tolist()} out of range; classes are 0..{c - 1}")
    return idx


# ---------------------------------------------------------------- the fast path


def _normalise(cams: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; a constant map becomes all zeros."""
    flat = cams.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1) - lo
    return torch.where(span > 0, (cams - lo) / span.clamp_min(1e-30), torch.zeros_like(cams))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ResNet trunk up to layer4. ``forward`` is called directly on the stem modules and
    on every block, so hooks registered on them (e.g. by a library CAM) never fire here."""
    x = model.maxpool.forward(model.relu.forward(model.bn1.forward(model.conv1.forward(x))))
    for stage in STAGES:
        for block in getattr(model, stage):
            x = block.forward(x)
    return x


def forward_with_cam(model: nn.Module, x: torch.Tensor,
                     target: Target = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (logits [N, C], Grad-CAM at layer4 [N, h, w] float32 in [0, 1]).

    The logits are exactly what ``model(x)`` returns (same operations, same dtype under
    autocast). ``target``: a class index for every image, one per image, or None for each
    image's top class. Hook-free and backward-free (see the module docstring), so it is
    safe to call from many threads on one model, under ``torch.inference_mode`` and autocast.
    """
    _require_resnet(model)
    feats = _features(model, x)
    logits = model.fc(torch.flatten(model.avgpool(feats), 1))
    idx = _target_indices(target, logits)
    weight = classifier_layer(model).weight
    with torch.autocast(device_type=feats.device.type, enabled=False):
        cams = torch.einsum("nk,nkhw->nhw", weight[idx].float(), feats.float())
        cams = _normalise(torch.relu(cams))
    return logits, cams


# ---------------------------------------------------------------- resizing


def upsample(cams: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w] maps at a layer's resolution -> [N, H, W] float32 in [0, 1], for every
    method alike: bicubic (OpenCV), negatives from its overshoot cut (a CAM is a ReLU), then
    divided by the maximum.

    Why bicubic and not bilinear (pytorch-grad-cam's ``cv2.resize`` default): a bilinear
    map's maximum always sits on the centre of a cell of the layer's grid (32 px apart at
    ``layer4``, 224 px input), whatever its neighbours say; bicubic lets two strong
    neighbouring cells move the peak between them. On phantoms with known lesions this took
    ``layer4``'s pointing game from 0.78 to 0.90-0.93 for the same models
    (tests/test_gradcam.py).
    """
    arr = cams.detach().float().cpu().numpy() if isinstance(cams, torch.Tensor) else cams
    out = np.empty((arr.shape[0], *size), np.float32)
    for i, cam in enumerate(np.asarray(arr, np.float32)):
        up = np.maximum(cv2.resize(cam, (size[1], size[0]), interpolation=cv2.INTER_CUBIC), 0.0)
        peak = float(up.max())
        out[i] = up / peak if peak > 0 else 0.0
    return out


# ---------------------------------------------------------------- the library path


def _shadow(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` that aliases its parameters and buffers (no copies of
    the weights) with ``requires_grad=False``: hooks, ``eval()`` and autograd on the shadow
    leave the shared model untouched."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo).eval()


def _library_class(method: str) -> type:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}[method]


def _library_cam(model: nn.Module, x: torch.Tensor, method: str, target: Target,
                 target_layer: str) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _library_class(method)
    n = x.shape[0]
    if target is not None:
        num_classes = classifier_layer(model).out_features
        idx = _target_indices(target, torch.zeros(n, num_classes)).tolist()
        targets: list[Any] | None = [ClassifierOutputTarget(int(t)) for t in idx]
    else:
        targets = None
    result: np.ndarray | None = None
    with _LIBRARY_LOCK, torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device_type=x.device.type, enabled=False):
        shadow = _shadow(model)
        layer = resolve_layer(shadow, target_layer)
        # A normal (non-inference) fp32 tensor that carries the gradient: the shadow's
        # parameters do not require grad.
        inp = x.detach().float().clone().requires_grad_(True)
        with _at_layer_resolution(cls)(model=shadow, target_layers=[layer]) as cam:
            result = cam(input_tensor=inp, targets=targets)
    if result is None:  # the library's __exit__ swallows IndexError
        raise RuntimeError(f"pytorch-grad-cam {cls.__name__} returned no map")
    return np.asarray(result, np.float32)


def _at_layer_resolution(cls: type) -> type:
    """The library's CAM class with its maps left at the layer's resolution (no target size:
    its ``scale_cam_image`` then only normalises), so that :func:`upsample` resizes every
    method's maps the same way."""
    return type(f"{cls.__name__}AtLayer", (cls,), {"get_target_width_height": lambda self, x: None})


# ---------------------------------------------------------------- public API


def explain(model: nn.Module, x: torch.Tensor, method: str = "gradcam", target: Target = None,
            target_layer: str = "layer4") -> np.ndarray:
    """Heatmaps [N, H, W] float32 in [0, 1] at the input's resolution for a batch [N, 3, H, W].

    ``method``: ``gradcam`` (at ``layer4`` the hook-free fast path), ``gradcam++`` or
    ``eigencam`` (gradient-free and class-agnostic: the first principal component of the
    activations; ``target`` does not change it). ``target``: one class index for all, one
    per image, or None for each image's top class. ``target_layer``: see :func:`layer_names`.
    """
    _check_method(method)
    layer = resolve_layer(model, target_layer)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if _uses_fast_path(model, method, layer):
        with torch.inference_mode():
            _, cams = forward_with_cam(model, x, target)
        return upsample(cams, (x.shape[-2], x.shape[-1]))
    return upsample(_library_cam(model, x, method, target, target_layer), (x.shape[-2], x.shape[-1]))


def explain_batch(model: nn.Module, xs: torch.Tensor | Sequence[torch.Tensor],
                  method: str = "gradcam", targets: Target = None,
                  target_layer: str = "layer4", batch_size: int = 16) -> np.ndarray:
    """:func:`explain` over many images (a tensor [N, 3, H, W] or a list of [3, H, W]) in
    chunks of ``batch_size``, for galleries; returns [N, H, W]."""
    x = xs if isinstance(xs, torch.Tensor) else torch.stack(list(xs))
    n = x.shape[0]
    per_image: list[int] | None = None
    if targets is not None:
        per_image = torch.as_tensor(targets, dtype=torch.long).reshape(-1).tolist()
        if len(per_image) == 1:
            per_image = per_image * n
        if len(per_image) != n:
            raise ConfigError(f"got {len(per_image)} targets for {n} images")
    out = []
    for start in range(0, n, max(1, batch_size)):
        chunk_t = None if per_image is None else per_image[start : start + batch_size]
        out.append(explain(model, x[start : start + batch_size], method, chunk_t, target_layer))
    return np.concatenate(out) if out else np.zeros((0, *x.shape[-2:]), np.float32)


def to_original(heatmap: np.ndarray, original_shape: tuple[int, int], img_size: int,
                resize_mode: str) -> np.ndarray:
    """Map a heatmap at model-input resolution back onto the original image (H, W).

    ``letterbox``: crop the content area (:func:`core.preprocess.letterbox_box`), then
    resize; ``stretch``: resize. Returns float32 with the heatmap's range.
    """
    if resize_mode not in ("letterbox", "stretch"):
        raise ConfigError(f"resize_mode={resize_mode!r} is not valid; choose letterbox or stretch")
    if heatmap.shape != (img_size, img_size):
        raise ValueError(f"heatmap shape {heatmap.shape} is not the model input "
                         f"({img_size}, {img_size})")
    h, w = int(original_shape[0]), int(original_shape[1])
    hm = heatmap.astype(np.float32)
    if resize_mode == "letterbox":
        top, left, nh, nw = letterbox_box((h, w), img_size)
        hm = hm[top : top + nh, left : left + nw]
    if hm.shape == (h, w):
        return hm.copy()
    return cv2.resize(hm, (w, h), interpolation=cv2.INTER_LINEAR)


def _as_rgb_u8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise ValueError(f"overlay needs a HxW gray or HxWx3 RGB image, got shape {img.shape}")


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """A [0, 1] heatmap -> RGB uint8 through an OpenCV colormap."""
    if colormap not in COLORMAPS:
        raise ConfigError(f"colormap={colormap!r} is not valid; choose one of: "
                          f"{', '.join(COLORMAPS)}")
    u8 = np.clip(np.rint(np.nan_to_num(heatmap.astype(np.float32)) * 255.0), 0, 255)
    bgr = cv2.applyColorMap(u8.astype(np.uint8), COLORMAPS[colormap])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(gray_or_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            colormap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heatmap onto an image -> RGB uint8 HxWx3.

    The image: gray float in [0, 1], gray uint8, or RGB uint8; the heatmap: HxW in [0, 1]
    of the same size (see :func:`to_original`). ``alpha`` is the heatmap's weight.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} must lie in [0, 1]")
    base = _as_rgb_u8(gray_or_rgb)
    if heatmap.shape != base.shape[:2]:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from the image's "
                         f"{base.shape[:2]}; map it with to_original first")
    color = colorize(heatmap, colormap)
    return cv2.addWeighted(base, 1.0 - alpha, color, alpha, 0.0)


def overlays(images: Sequence[np.ndarray], heatmaps: Sequence[np.ndarray] | np.ndarray,
             alpha: float = 0.4, colormap: str = "jet") -> list[np.ndarray]:
    """:func:`overlay` for a gallery: one RGB uint8 image per (image, heatmap) pair."""
    if len(images) != len(heatmaps):
        raise ValueError(f"{len(images)} images but {len(heatmaps)} heatmaps")
    return [overlay(img, hm, alpha, colormap) for img, hm in zip(images, heatmaps, strict=True)]


# ---------------------------------------------------------------- sanity checks


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, column) of a heatmap's maximum (the first one in raster order on ties)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(y), int(x)


def pointing_game(heatmaps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  tolerance: float = 0.0) -> float:
    """Fraction of heatmaps whose peak falls inside the matching boolean lesion mask, or
    within ``tolerance`` pixels of it (Zhang et al. 2016 use 15 px at 224 px); each pair must
    share a shape."""
    if len(heatmaps) != len(masks) or not len(masks):
        raise ValueError(f"need as many masks as heatmaps (got {len(heatmaps)}, {len(masks)})")
    hits = []
    for hm, m in zip(heatmaps, masks, strict=True):
        if hm.shape != m.shape:
            raise ValueError(f"heatmap {hm.shape} and mask {m.shape} differ; use to_original")
        y, x = peak(hm)
        if tolerance > 0 and not m[y, x]:
            dist = cv2.distanceTransform((~m.astype(bool)).astype(np.uint8), cv2.DIST_L2, 5)
            hits.append(bool(dist[y, x] <= tolerance))
        else:
            hits.append(bool(m[y, x]))
    return float(np.mean(hits))


def cam_change(a: np.ndarray, b: np.ndarray) -> float:
    """How much two heatmaps differ: 1 - Spearman rank correlation (0 = same ranking,
    1 = unrelated, 2 = reversed). Two constant maps: 0 if equal, else 1."""
    from scipy.stats import spearmanr

    fa, fb = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if fa.shape != fb.shape:
        raise ValueError(f"heatmap shapes differ: {np.shape(a)} vs {np.shape(b)}")
    if np.ptp(fa) == 0 or np.ptp(fb) == 0:
        return 0.0 if np.array_equal(fa, fb) else 1.0
    rho = spearmanr(fa, fb).statistic
    return float(1.0 - rho)


def randomize_weights(model: nn.Module, seed: int = 0, down_to: str = "layer4") -> nn.Module:
    """A deep copy with the top layers re-initialised (Adebayo et al. 2018, cascading
    model-randomisation test): ``fc``, then ``layer4``, ... down to ``down_to`` inclusive
    (one of ``fc, layer4, layer3, layer2, layer1, stem``). The original is not touched."""
    if down_to not in RANDOMIZE_CASCADE:
        raise ConfigError(f"down_to={down_to!r} is not valid; choose one of: "
                          f"{', '.join(RANDOMIZE_CASCADE)}")
    _require_resnet(model)
    clone = copy.deepcopy(model)
    parts = RANDOMIZE_CASCADE[: RANDOMIZE_CASCADE.index(down_to) + 1]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for part in parts:
            names = ("conv1", "bn1") if part == "stem" else (part,)
            for name in names:
                for m in getattr(clone, name).modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
    log.debug("Re-initialised %s of a %s copy", ", ".join(parts), type(model).__name__)
    return clone
