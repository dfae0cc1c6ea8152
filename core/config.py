"""Typed configuration: frozen dataclasses, saved as JSON next to every run.

Only plain Python types are used so that configs can be stored inside checkpoints that
load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.errors import ConfigError

DEFAULT_DATA_DIR = "data/COVID-19_Radiography_Dataset"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("letterbox", "stretch")
LUNG_VIEWS = ("none", "crop", "mask", "soft")
MODES = ("head", "finetune", "staged")
ARCHS = ("resnet50", "resnet34", "resnet18")
OPTIMIZERS = ("adamw", "adam")
SCHEDULERS = ("plateau", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")


def default_data_dir() -> str:
    """``$CXR_DATA_DIR`` if set, else ``data/COVID-19_Radiography_Dataset``."""
    return os.environ.get("CXR_DATA_DIR") or DEFAULT_DATA_DIR


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing contract, stored in every checkpoint.

    Decode to grayscale (16-bit scaled by bit depth) -> optional lung view -> resize to
    ``img_size`` (``letterbox``: keep the aspect ratio and pad the short side with black,
    centred; ``stretch``: ignore the aspect ratio) -> CLAHE on the resized image ->
    scale to [0, 1] -> replicate to ``channels`` identical channels -> normalise with
    ``mean``/``std`` (ImageNet's, so ImageNet weights see familiar statistics).
    """

    img_size: int = 224
    resize_mode: str = "letterbox"
    clahe: bool = True
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    channels: int = 3
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    lung_view: str = "none"
    lung_margin: float = 0.05
    segmenter_sha256: str = ""

    def __post_init__(self) -> None:
        if self.img_size < 32:
            raise ConfigError(f"img_size={self.img_size} is too small; use 32 or more (224 default)")
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        _check_choice("lung_view", self.lung_view, LUNG_VIEWS)
        if self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels} is not valid; choose 1 or 3")
        # JSON round trips turn tuples into lists; keep them hashable tuples.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation (albumentations), applied after CLAHE."""

    rotate_deg: float = 10.0
    translate: float = 0.0  # max shift, fraction of the side (0 = none)
    scale: float = 0.0  # max zoom in or out, fraction (0 = none)
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = False
    p: float = 0.8
    # Stronger augmentation for training from scratch (each 0 = off, the default, so that
    # older configs and seeds give the same augmentations):
    crop_scale: float = 0.0  # random resized crop keeping >= this share of the area (0 = off)
    gamma: float = 0.0  # random gamma in [1 - g, 1 + g]
    blur: float = 0.0  # probability of a Gaussian blur (sigma 0.5-1.5 px)
    noise: float = 0.0  # Gaussian noise, std as a fraction of the range (applied with p)
    erase_periphery: float = 0.0  # probability of blanking a random band along each border

    def __post_init__(self) -> None:
        if not (0.0 <= self.translate < 0.5 and 0.0 <= self.scale < 0.5):
            raise ConfigError("augment translate and scale must lie in [0, 0.5)")
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError("augment p must lie in [0, 1]")
        if not (self.crop_scale == 0.0 or 0.2 <= self.crop_scale < 1.0):
            raise ConfigError("augment crop_scale must be 0 (off) or lie in [0.2, 1)")
        if not (0.0 <= self.gamma < 1.0 and 0.0 <= self.noise < 0.5):
            raise ConfigError("augment gamma must lie in [0, 1) and noise in [0, 0.5)")
        if not (0.0 <= self.blur <= 1.0 and 0.0 <= self.erase_periphery <= 1.0):
            raise ConfigError("augment blur and erase_periphery are probabilities in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = field(default_factory=default_data_dir)
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 42
    near_dup_distance: int = 24  # bits of a 256-bit pHash
    max_per_class: int = 0  # 0 = all images; >0 takes a seeded subset per class

    def __post_init__(self) -> None:
        if not (0 < self.val_frac < 0.5 and 0 < self.test_frac < 0.5):
            raise ConfigError("val_frac and test_frac must each lie in (0, 0.5)")
        if not 0 <= self.near_dup_distance <= 64:
            raise ConfigError("near_dup_distance must lie in 0..64 (bits of a 256-bit pHash)")


@dataclass(frozen=True)
class TrainConfig:
    output: str = "models/run"
    arch: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | path to a local state dict
    mode: str = "finetune"
    epochs: int = 50
    head_epochs: int = 5  # staged mode: epochs with the backbone frozen first
    batch_size: int = 32
    lr: float = 1e-3
    # None: 0.1 with pretrained weights (keep their features), 1.0 from scratch (weights
    # "none": a random backbone must learn at the head's pace); resolved in __post_init__
    backbone_lr_mult: float | None = None
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "plateau"
    dropout: float = 0.3
    freeze_bn: bool = False  # BatchNorm in eval mode while training (small batches, CPU DDP)
    class_weighted_loss: bool = True
    weighted_sampler: bool = False
    early_stop_patience: int = 8
    # Exponential moving average of the weights (and BatchNorm statistics), per optimiser step,
    # as torchvision's reference recipe's --model-ema: validation, best.pt and serving use the
    # average. 0 = off; 0.98 averages over roughly the last 50 steps.
    ema_decay: float = 0.0
    feature_cache_views: int = 1  # head mode: 1 = un-augmented features; >1 adds augmented views
    workers: int = 0
    cache_images: bool = True  # keep each image's deterministic preparation between epochs
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    seed: int = 42
    resume: bool = False
    evaluate: bool = True
    export: bool = True  # after evaluation: export the serving graph and check reduced precisions (core.export)
    max_steps_per_epoch: int = 0  # 0 = full epochs (a debugging/benchmark aid)

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError("dropout must lie in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay must lie in [0, 1) (0 = no weight averaging)")
        if self.backbone_lr_mult is None:
            object.__setattr__(self, "backbone_lr_mult", default_backbone_lr_mult(self.weights))
        elif self.backbone_lr_mult <= 0:
            raise ConfigError("backbone_lr_mult must be positive")


def default_backbone_lr_mult(weights: str) -> float:
    """The backbone's learning rate as a multiple of the head's when the user sets none:
    1.0 for random initial weights (``none``), 0.1 for pretrained ones."""
    return 1.0 if weights == "none" else 0.1


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saved as ``config.json`` beside the run."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Named training recipes: ``python -m core.train --preset NAME`` takes these as its defaults
# (keys are the CLI's argument names, dashes as underscores); any flag given on the command
# line still wins. ``cpu-lungs`` is the recipe chosen by ``python -m core.bench recipes``
# (docs/ARCHITECTURE.md, "Training recipe"): from scratch, on a CPU, looking at the lungs.
DEFAULT_PRESET = "cpu-lungs"  # the Training page's recipe
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-lungs": {  # = core.recipes.recipe_settings(core.recipes.CHOSEN) (a test checks it)
        "weights": "none", "mode": "finetune", "arch": "resnet50", "img_size": 128,
        "lung_view": "soft", "epochs": 24, "scheduler": "cosine", "lr": 1e-3,
        "early_stop_patience": 24, "crop_scale": 0.7, "gamma": 0.2, "blur": 0.2,
        "noise": 0.03, "erase_periphery": 0.5, "translate": 0.05, "scale": 0.1,
        "ema_decay": 0.99,
    },
}


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain JSON/`weights_only`-safe types (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (possibly nested) config dataclass; unknown keys are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    hints = {
        "data": DataConfig,
        "preprocess": PreprocessConfig,
        "augment": AugmentConfig,
        "train": TrainConfig,
    }
    for key, value in data.items():
        if cls is RunConfig and key in hints and isinstance(value, dict):
            kwargs[key] = from_dict(hints[key], value)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_run_config(path: str | Path) -> RunConfig:
    data = json.loads(Path(path).read_text())
    if "int8" in data.get("train", {}):  # runs of earlier versions: int8 became the export
        data["train"]["export"] = data["train"].pop("int8")
    return from_dict(RunConfig, data)
