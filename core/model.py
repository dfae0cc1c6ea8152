"""Model construction and checkpoints.

A torchvision ResNet (ResNet50 by default) with a ``Dropout -> Linear`` head over the
discovered classes. Checkpoints are plain dicts of tensors and Python types, written
atomically and read with ``torch.load(..., weights_only=True)``; like torchxrayvision's
weights they carry their classes, preprocessing contract and decision thresholds.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from core.config import ARCHS, PreprocessConfig, from_dict
from core.errors import CheckpointError, ConfigError, CXRError, WeightsUnavailableError
from core.files import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cxr-insight-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "arch", "classes", "preprocess", "state_dict")
INT8_WEIGHT_FORMAT = "int8-weight-only"
"""``ckpt["weight_format"]`` of a checkpoint whose conv and linear weights are stored as int8
with one fp32 scale per output channel (``ckpt["weight_scales"]``); :func:`load_checkpoint`
dequantises them (:func:`dequantize_state_dict`). The shipped demo model uses it."""

_WEIGHTS = {
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
}


def _imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_weight(_WEIGHTS[arch])


def build_model(
    num_classes: int,
    weights: str = "imagenet",
    arch: str = "resnet50",
    dropout: float = 0.3,
) -> nn.Module:
    """A torchvision ResNet with a dropout + linear head.

    ``weights``: ``"imagenet"`` (torchvision's weights API; downloads once into
    ``$TORCH_HOME``), ``"none"`` (random initialisation), or a path to a local state dict
    (a torchvision ``.pth`` file, for offline machines). The classifier layer of a local
    file is ignored when its shape differs.
    """
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not valid; choose one of: {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    ctor = getattr(torchvision.models, arch)
    if weights == "imagenet":
        w = _imagenet_weights(arch)
        try:
            model = ctor(weights=w)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise WeightsUnavailableError(
                f"Could not download the ImageNet weights {w} ({exc}). To work offline: "
                f"download {w.url} on a connected machine and pass --weights /path/to/that.pth, "
                "or copy it into $TORCH_HOME/hub/checkpoints/; or train from scratch with "
                "--weights none."
            ) from exc
    else:
        model = ctor(weights=None)
        if weights not in ("none", "", None):
            state = torch_load_file(weights, WeightsUnavailableError, "weights file",
                                    "Pass --weights imagenet, none, or an existing .pth "
                                    "state dict.")
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            own = model.state_dict()
            state = {k: v for k, v in state.items() if not (k.startswith("fc.") and
                     (k not in own or own[k].shape != v.shape))}
            missing, unexpected = model.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("fc.")]
            if bad or unexpected:
                raise WeightsUnavailableError(
                    f"{weights} does not match torchvision {arch}: missing {bad[:5]}, "
                    f"unexpected {list(unexpected)[:5]}"
                )
    in_features = model.fc.in_features
    model.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_features, num_classes))
    return model


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("fc.")]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.fc.parameters())


def library_versions() -> dict[str, str]:
    import numpy

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(numpy.__version__),
    }


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def torch_load_file(path: str | Path, error: type[CXRError], what: str, hint: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a missing or unreadable file raises
    ``error`` ("<what> not found: <path>. <hint>" / "Cannot load <what> <path>: ...")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what[0].upper()}{what[1:]} not found: {path}. {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and tensor errors all land here
        raise error(f"Cannot load {what} {path}: {exc}") from exc


def quantize_state_dict(state: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weight-only int8 of a state dict: every floating tensor of two or more dimensions (the
    conv and linear weights) becomes int8, symmetric, with one fp32 scale per output channel
    (``max |w| / 127`` over the channel; 1 for an all-zero channel); everything else (biases,
    BatchNorm weights and statistics, counters) is kept as it is, floating tensors as fp32.

    Returns ``(state, scales)``: the state dict with int8 tensors in place of the quantised
    weights, and ``{name: scales}`` for those. Round to nearest, so each dequantised weight
    lies within half a step (``scale / 2``) of the original."""
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        t = value.detach().cpu()
        if t.is_floating_point() and t.dim() >= 2:
            w = t.float()
            amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            view = (-1,) + (1,) * (w.dim() - 1)
            out[name] = torch.round(w / scale.view(view)).clamp_(-127, 127).to(torch.int8)
            scales[name] = scale.contiguous()
        else:
            out[name] = t.float().contiguous() if t.is_floating_point() else t.contiguous()
    return out, scales


def dequantize_state_dict(state: dict[str, torch.Tensor],
                          scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 state dict of :func:`quantize_state_dict`'s output: ``q * scale`` per output
    channel for each tensor named in ``scales``, the rest unchanged. Deterministic: the same
    file always gives the same weights."""
    missing = [k for k in scales if k not in state]
    if missing:
        raise CheckpointError(f"int8 weight scales name tensors the state dict lacks: {missing[:5]}")
    out = {}
    for name, value in state.items():
        if name in scales:
            if value.dtype != torch.int8:
                raise CheckpointError(f"{name} has scales but is {value.dtype}, not int8")
            scale = scales[name].float()
            if scale.dim() != 1 or scale.numel() != value.shape[0]:
                raise CheckpointError(f"{name}: {scale.numel()} scales for "
                                      f"{value.shape[0]} output channels")
            view = (-1,) + (1,) * (value.dim() - 1)
            out[name] = value.float() * scale.view(view)
        else:
            out[name] = value
    return out


def quantized_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint dict with its weights as weight-only int8
    (:func:`quantize_state_dict`), marked ``weight_format = "int8-weight-only"``; a checkpoint
    that is already int8 is quantised again from its dequantised weights (the same result)."""
    state, scales = quantize_state_dict(ckpt["state_dict"])
    return {**ckpt, "state_dict": state, "weight_scales": scales,
            "weight_format": INT8_WEIGHT_FORMAT}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check that it is ours. A weight-only
    int8 checkpoint (``weight_format``) is returned with its weights dequantised to fp32
    (``ckpt["weight_format"]`` still says what the file holds)."""
    path = Path(path)
    ckpt = torch_load_file(path, CheckpointError, "checkpoint",
                           "Train one with `python -m core.train --output models/<run>` or pick "
                           "an existing models/<run>/best.pt.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a CXR Insight checkpoint.")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"Checkpoint {path} lacks {missing}; it is damaged or too old.")
    if int(ckpt["version"]) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {ckpt['version']}; this code reads up to "
            f"{CHECKPOINT_VERSION}. Upgrade CXR Insight."
        )
    fmt = ckpt.get("weight_format")
    if fmt == INT8_WEIGHT_FORMAT:
        if not isinstance(ckpt.get("weight_scales"), dict):
            raise CheckpointError(f"Checkpoint {path} is int8 but holds no weight_scales.")
        ckpt["state_dict"] = dequantize_state_dict(ckpt["state_dict"], ckpt.pop("weight_scales"))
    elif fmt not in (None, "fp32"):
        raise CheckpointError(f"Checkpoint {path} stores its weights as {fmt!r}, which this "
                              f"version cannot read (it reads fp32 and {INT8_WEIGHT_FORMAT}).")
    return ckpt


def preprocess_config_of(ckpt: dict[str, Any]) -> PreprocessConfig:
    return from_dict(PreprocessConfig, ckpt["preprocess"])


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the network of a loaded checkpoint (eval mode, CPU)."""
    model = build_model(len(ckpt["classes"]), weights="none", arch=ckpt["arch"],
                        dropout=float(ckpt.get("dropout", 0.0)))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint weights do not fit {ckpt['arch']}: {exc}") from exc
    return model.eval()
