"""Out-of-distribution (OOD) and low-confidence cut-offs, fitted once per run.

Out-of-distribution score
-------------------------
The classifier answers for *any* input, a holiday photo included. To warn when an input is
unlikely to be a frontal chest X-ray like those it was trained on, the image's features are
compared with the training distribution by Mahalanobis distances (Lee et al. 2018, "A
simple unified framework for detecting out-of-distribution and adversarial samples"), at
every stage of the ResNet (the *feature ensemble* of that paper):

1. features: the global average of each stage's activations (``layer1`` .. ``layer4``;
   ``layer4``'s is what the linear head sees);
2. per stage, centre the training features and keep their first ``dim`` principal
   components (64 by default: with ~10^3 training images a 2048 x 2048 covariance is not
   estimable, and PCA keeps the directions along which X-rays actually vary);
3. per stage, class-conditional means in that space and one covariance shared by all
   classes (of the features minus their class mean) with Ledoit-Wolf shrinkage
   (:class:`sklearn.covariance.LedoitWolf`); the stage's distance is the distance to the
   *nearest* class mean, ``min_c sqrt((z - mu_c)^T S^-1 (z - mu_c))``;
4. each stage's distance is divided by its median on the validation split (so that the
   stages are on one scale), and the score is the **largest** of these ratios: an input is
   atypical when any stage finds it so.

Why every stage: a network trained on three X-ray classes keeps in ``layer4`` little
beyond what separates those classes (its pooled features span a handful of directions), so
a photo or a page of text can land near an X-ray class there. The early stages still
describe the image itself (texture, edges, contrast), where photos, documents and noise
differ plainly from radiographs. On the shared real set (64 px ResNet50) ``layer4`` alone
detected under half of the non-X-ray test images, the ensemble all of them at the same
false-alarm rate (``tests/test_inference.py``).

Steps 2-3 fold into one projection per stage: with ``S^-1 = L L^T`` (Cholesky),
``W = P^T L`` maps a feature vector to coordinates in which the distance is Euclidean.
The cut-off is the 95th percentile of the **validation** scores (never the training
images, whose scores are optimistically small), so 95 % of in-distribution images pass and
the expected false-alarm rate on new X-rays is about 5 %.

Everything is stored beside the checkpoint in ``best.ood.safetensors`` (:mod:`core.sidecars`:
the tensors as safetensors, the rest as JSON metadata) and read back as ``ckpt["ood"]`` by
:func:`core.sidecars.load_run_checkpoint`.

Low confidence
--------------
``ckpt["low_confidence"]["threshold"]`` is the 5th percentile of the validation images'
maximum *calibrated* probability (softmax of the logits divided by the run's temperature):
a prediction whose top probability falls below it is less confident than 95 % of the
validation predictions and is flagged.

:func:`calibrate_run_ood` computes both for a finished run (after
``core.calibration.recalibrate_checkpoint``, which stores the temperature; it reads nothing
of the test report, so training fits them before writing it) and writes them to the
sidecar; ``best.pt`` is not modified. :func:`image_flags` applies them to images already
scored (the evaluation report's per-image records).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import CheckpointError

log = logging.getLogger(__name__)

OOD_VERSION = 1
LAYERS = ("layer1", "layer2", "layer3", "layer4")
"""The ResNet stages whose pooled activations are scored (:func:`pooled_layer_features`)."""
SINGLE = "features"
"""Layer name used when :func:`fit_ood` is given one plain feature array."""
DEFAULT_DIM = 64
DEFAULT_PASS_RATE = 0.95
"""Fraction of validation (in-distribution) images that pass the OOD check."""
DEFAULT_LOW_CONFIDENCE_QUANTILE = 0.05
"""Fraction of validation predictions flagged as low-confidence."""

Features = Any  # 2-D array/tensor (images x features), or a mapping layer name -> 2-D array


# ---------------------------------------------------------------- features


def pooled_layer_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Global-average-pooled activations of every stage of a torchvision ResNet (fp32).

    ``layer4``'s entry is the linear head's input. The same operations as the predictor's
    network (``core.inference``), which returns these alongside the logits.
    """
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out: dict[str, torch.Tensor] = {}
    for name in LAYERS:
        h = getattr(model, name)(h)
        out[name] = h.float().mean(dim=(2, 3))
    return out


def _as_2d(features: Any, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        x = features.detach().cpu().double().numpy()
    else:
        x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (images x features), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _as_layers(features: Features, name: str) -> dict[str, np.ndarray]:
    if isinstance(features, Mapping):
        return {str(k): _as_2d(v, f"{name}[{k!r}]") for k, v in features.items()}
    return {SINGLE: _as_2d(features, name)}


# ---------------------------------------------------------------- fitting and scoring


def _fit_layer(xt: np.ndarray, y: np.ndarray, xv: np.ndarray, dim: int) -> dict[str, Any]:
    from sklearn.covariance import LedoitWolf  # local: inference imports this module too

    mean = xt.mean(axis=0)
    centred = xt - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    rank = int((s > s[0] * 1e-7).sum()) if s.size and s[0] > 0 else 0
    k = max(1, min(int(dim), rank, len(xt) - 1))
    components = vt[:k]  # k x D
    z = centred @ components.T
    labels = np.unique(y)
    centers = np.stack([z[y == c].mean(axis=0) for c in labels])  # C x k
    resid = z - centers[np.searchsorted(labels, y)]
    lw = LedoitWolf(assume_centered=True).fit(resid)
    chol = np.linalg.cholesky(lw.precision_)  # precision = L L^T
    layer = {
        "mean": torch.tensor(mean, dtype=torch.float32),
        "projection": torch.tensor(components.T @ chol, dtype=torch.float32),  # D x k
        "centers": torch.tensor(centers @ chol, dtype=torch.float32),  # C x k
        "dim": int(k),
        "shrinkage": float(lw.shrinkage_),
        "explained_variance": float((s[:k] ** 2).sum() / max(float((s**2).sum()), 1e-30)),
        "scale": 1.0,
    }
    val = _layer_distance(layer, xv)
    layer["scale"] = float(max(np.median(val), 1e-12))
    return layer


def _layer_distance(layer: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    mean = np.asarray(layer["mean"], np.float64)
    if x.shape[1] != mean.shape[0]:
        raise ValueError(f"features have {x.shape[1]} columns; the OOD statistics expect "
                         f"{mean.shape[0]}")
    z = (x - mean) @ np.asarray(layer["projection"], np.float64)
    centers = np.asarray(layer["centers"], np.float64)
    d2 = ((z[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    return np.sqrt(d2.min(axis=1))


def fit_ood(
    features_train: Features,
    labels_train: Any,
    features_val: Features,
    *,
    dim: int = DEFAULT_DIM,
    pass_rate: float = DEFAULT_PASS_RATE,
) -> dict[str, Any]:
    """Fit the Mahalanobis OOD statistics on training features; set the cut-off on validation.

    Args:
        features_train: N x D pooled features of the training images, or a mapping
            ``{layer: N x D_layer}`` (see :func:`pooled_layer_features`) for the ensemble.
        labels_train: N class indices.
        features_val: the same for the validation images (in-distribution).
        dim: principal components kept per layer (capped by the data's rank).
        pass_rate: fraction of validation images whose score stays at or under the cut-off.

    Returns a dict of plain types and float32 tensors (``weights_only``-safe): per layer
    ``mean`` (D), ``projection`` (D x k), ``centers`` (C x k) and ``scale``; the overall
    ``threshold``; bookkeeping (sizes, shrinkage, achieved validation pass rate).
    """
    ft, fv = _as_layers(features_train, "features_train"), _as_layers(features_val, "features_val")
    if set(ft) != set(fv):
        raise ValueError(f"training layers {sorted(ft)} differ from validation layers {sorted(fv)}")
    y = np.asarray(labels_train.cpu() if isinstance(labels_train, torch.Tensor) else labels_train,
                   dtype=np.int64).reshape(-1)
    n_train, n_val = len(next(iter(ft.values()))), len(next(iter(fv.values())))
    for name in ft:
        if len(ft[name]) != len(y) or len(fv[name]) != n_val:
            raise ValueError(f"layer {name!r}: {len(ft[name])} training rows for {len(y)} labels, "
                             f"{len(fv[name])} validation rows for {n_val}")
        if ft[name].shape[1] != fv[name].shape[1]:
            raise ValueError(f"layer {name!r}: training features have {ft[name].shape[1]} "
                             f"columns, validation {fv[name].shape[1]}")
    if n_train < 3 or n_val < 1:
        raise ValueError("fit_ood needs at least 3 training and 1 validation images")
    if not 0.5 <= pass_rate < 1.0:
        raise ValueError(f"pass_rate={pass_rate} must lie in [0.5, 1)")
    names = [n for n in LAYERS if n in ft] + sorted(n for n in ft if n not in LAYERS)
    stats: dict[str, Any] = {
        "version": OOD_VERSION,
        "method": "mahalanobis",
        "combine": "max over layers of distance / validation median distance",
        "layer_names": names,
        "layers": {n: _fit_layer(ft[n], y, fv[n], dim) for n in names},
        "pass_rate": float(pass_rate),
        "n_train": n_train,
        "n_val": n_val,
    }
    val_scores = ood_score(stats, fv)
    stats["threshold"] = float(np.quantile(val_scores, pass_rate))
    stats["val_pass_rate"] = float((val_scores <= stats["threshold"]).mean())
    stats["val_score_median"] = float(np.median(val_scores))
    return stats


def check_stats(stats: Any) -> None:
    """Raise CheckpointError when ``stats`` is not a usable ``ckpt["ood"]`` entry."""
    if not isinstance(stats, dict) or stats.get("method") != "mahalanobis":
        raise CheckpointError("The checkpoint's 'ood' entry is not Mahalanobis OOD statistics.")
    if int(stats.get("version", 0)) > OOD_VERSION:
        raise CheckpointError(f"OOD statistics version {stats['version']} is newer than this "
                              f"code reads ({OOD_VERSION}). Upgrade CXR Insight.")
    names = stats.get("layer_names")
    layers = stats.get("layers")
    if not names or not isinstance(layers, dict) or "threshold" not in stats or any(
            n not in layers or {"mean", "projection", "centers", "scale"} - set(layers[n])
            for n in names):
        raise CheckpointError("The checkpoint's OOD statistics are incomplete; recompute them "
                              "with core.ood.calibrate_run_ood.")


def ood_score(stats: Mapping[str, Any], features: Features) -> np.ndarray:
    """OOD score of each image (N,): the largest per-layer Mahalanobis distance to the
    nearest training class mean, in units of that layer's median validation distance.

    ``features`` must hold the layers the statistics were fitted on (a plain array when
    they were fitted on one).
    """
    f = _as_layers(features, "features")
    names = list(stats["layer_names"])
    if names == [SINGLE] and SINGLE not in f and len(f) == 1:
        f = {SINGLE: next(iter(f.values()))}
    missing = [n for n in names if n not in f]
    if missing:
        raise ValueError(f"features lack the layers {missing} of the OOD statistics")
    per_layer = [_layer_distance(stats["layers"][n], f[n]) / float(stats["layers"][n]["scale"])
                 for n in names]
    return np.max(np.stack(per_layer), axis=0)


def fit_low_confidence(max_probabilities: Any, temperature: float, calibrated: bool,
                       quantile: float = DEFAULT_LOW_CONFIDENCE_QUANTILE) -> dict[str, Any]:
    """The low-confidence cut-off: the ``quantile`` of validation max calibrated probabilities."""
    p = np.asarray(max_probabilities, np.float64).reshape(-1)
    if p.size == 0:
        raise ValueError("no validation probabilities")
    return {
        "threshold": float(np.quantile(p, quantile)),
        "quantile": float(quantile),
        "temperature": float(temperature),
        "calibrated": bool(calibrated),
        "n_val": int(p.size),
        "rule": "flag when the top calibrated probability is below the threshold",
    }


def score_pooled(stats: Mapping[str, Any], pooled: Mapping[str, Any]) -> np.ndarray:
    """:func:`ood_score` of pooled stage features (:func:`pooled_layer_features`), also for
    statistics fitted on the head's input alone (``layer4``, stored as one plain array)."""
    if list(stats["layer_names"]) == [SINGLE] and SINGLE not in pooled:
        return ood_score(stats, {SINGLE: pooled["layer4"]})
    return ood_score(stats, dict(pooled))


def image_flags(ckpt: Mapping[str, Any], pooled: Mapping[str, Any] | None,
                proba: Any) -> dict[str, np.ndarray | None]:
    """Per-image OOD score and flag and low-confidence flag under a checkpoint's stored
    statistics and cut-offs (``ckpt["ood"]``, ``ckpt["low_confidence"]``), as the predictor
    sets them on the fp32 network.

    ``pooled``: the images' pooled stage features (None when not computed); ``proba``: their
    calibrated probabilities (N x K). An entry is None where the checkpoint (or ``pooled``)
    lacks what it needs: ``ood_score`` and ``ood`` without OOD statistics, ``low_confidence``
    without a low-confidence cut-off.
    """
    p = np.asarray(proba, np.float64)
    out: dict[str, np.ndarray | None] = {"ood_score": None, "ood": None, "low_confidence": None}
    stats = ckpt.get("ood")
    if stats is not None and pooled is not None:
        check_stats(stats)
        scores = score_pooled(stats, pooled)
        out["ood_score"] = scores
        out["ood"] = scores > float(stats["threshold"])
    low = ckpt.get("low_confidence")
    if low is not None and p.size:
        out["low_confidence"] = p.max(axis=1) < float(low["threshold"])
    return out


# ---------------------------------------------------------------- a whole run


@torch.inference_mode()
def _split_features(model: nn.Module, loader: Any, device: torch.device, progress: bool,
                    desc: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(pooled features per layer, logits, labels) of every image of a loader."""
    from tqdm.auto import tqdm

    feats: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        out = pooled_layer_features(model, x)
        for n in LAYERS:
            feats[n].append(out[n].cpu())
        logits.append(model.fc(out["layer4"]).float().cpu())
        labels.append(torch.as_tensor(y))
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(logits), torch.cat(labels)


def calibrate_run_ood(
    run_dir: str | Path,
    data_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    *,
    batch_size: int = 64,
    workers: int = 0,
    dim: int = DEFAULT_DIM,
    pass_rate: float = DEFAULT_PASS_RATE,
    low_confidence_quantile: float = DEFAULT_LOW_CONFIDENCE_QUANTILE,
    allow_manifest_change: bool = False,
) -> dict[str, Any]:
    """Fit OOD statistics (train split) and both cut-offs (validation split) for a run.

    Reads ``run_dir/best.pt`` (with its calibration sidecar) and ``run_dir/manifest.csv``
    (:func:`core.data.run_split_rows`; see it for ``allow_manifest_change``); features come
    from the run's own model and preprocessing contract (``core.data.CXRDataset``, no
    augmentation). Writes ``ood`` and ``low_confidence`` to ``best.ood.safetensors``
    (:func:`core.sidecars.write_ood`), stamped with the hash of ``best.pt``, which is not
    modified, and returns both. Call it after ``core.calibration.recalibrate_checkpoint`` so
    that the low-confidence cut-off uses the calibrated temperature (without one, T = 1 is
    used and recorded); ``core.evaluate.finalize_run`` calls it between the two.
    """
    from torch.utils.data import DataLoader

    from core import sidecars
    from core.data import CXRDataset, run_split_rows
    from core.devices import resolve_device
    from core.files import file_sha256
    from core.model import model_from_checkpoint, preprocess_config_of
    from core.preprocess import build_transform

    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    sha = file_sha256(best) if best.is_file() else ""
    ckpt = sidecars.load_run_checkpoint(best, parts=("calibration",))
    classes = list(ckpt["classes"])
    splits, _ = run_split_rows(run_dir, data_dir, ckpt, ("train", "val"),
                               allow_manifest_change=allow_manifest_change)
    temperature = ckpt.get("temperature")
    calibrated = temperature is not None
    t = float(temperature) if calibrated else 1.0
    if not (np.isfinite(t) and t > 0):
        raise CheckpointError(f"Checkpoint temperature {t} is not a positive number.")
    if not calibrated:
        log.warning("%s has no temperature (run core.calibration.recalibrate_checkpoint "
                    "first); the low-confidence cut-off uses uncalibrated probabilities", best)

    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    transform = build_transform(preprocess_config_of(ckpt))
    t0 = time.perf_counter()
    out = {}
    for name, rows in splits.items():
        loader = DataLoader(CXRDataset(data_dir, rows, classes, transform),
                            batch_size=batch_size, shuffle=False, num_workers=workers)
        out[name] = _split_features(model, loader, dev, progress, f"OOD features ({name})")
    (f_train, _, y_train), (f_val, logits_val, _) = out["train"], out["val"]
    stats = fit_ood(f_train, y_train, f_val, dim=dim, pass_rate=pass_rate)
    max_p = torch.softmax(logits_val / t, dim=1).max(dim=1).values.numpy()
    low = fit_low_confidence(max_p, t, calibrated, low_confidence_quantile)

    path = sidecars.write_ood(best, stats, low, weights_sha256=sha)
    log.info("OOD statistics for %s: Mahalanobis on %s (%s-D) from %d train images; cut-off "
             "%.3f passes %.1f%% of %d val images; low-confidence below p=%.3f; %.1f s; wrote "
             "%s", best, "+".join(stats["layer_names"]),
             "/".join(str(stats["layers"][n]["dim"]) for n in stats["layer_names"]),
             stats["n_train"], stats["threshold"], 100 * stats["val_pass_rate"], stats["n_val"],
             low["threshold"], time.perf_counter() - t0, path.name)
    return {"ood": stats, "low_confidence": low}
