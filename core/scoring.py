"""Per-image inference for evaluation: a run's model over manifest-style rows.

:func:`predict_rows` gives raw logits (no temperature), and on request the occlusion probes'
logits, each image's Grad-CAM lung-focus ratio and its pooled stage features (what the OOD
score reads), in one pass per batch. :func:`predict_split` does it for one split of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from core import metrics as M
from core import ood
from core.config import PreprocessConfig
from core.data import CXRDataset, run_split_rows
from core.devices import resolve_device
from core.errors import DatasetError
from core.model import load_checkpoint, model_from_checkpoint, preprocess_config_of
from core.preprocess import build_transform

OCCLUSION_BOX = 0.70  # the central box covers 70% of the input's width and height
PROBES = ("periphery", "centre")
PROBE_LABELS = {
    "periphery": "periphery only (central 70% box filled with the image mean)",
    "centre": "centre only (everything outside the central 70% box filled with the image mean)",
}



@dataclass
class Predictions:
    """Model outputs on a list of images (logits before any temperature)."""

    paths: list[str]
    y_true: np.ndarray  # (n,) int class indices
    logits: np.ndarray  # (n, K) float64
    classes: list[str]
    probe_logits: dict[str, np.ndarray] = field(default_factory=dict)  # occlusion probes
    # per image: Grad-CAM lung-focus ratio (nan: no lung mask) and whether its mask came
    # from the dataset (else from the segmenter); None when not measured
    lung_focus: np.ndarray | None = None
    mask_from_dataset: np.ndarray | None = None
    # per image: pooled activations of each ResNet stage (``core.ood.pooled_layer_features``)
    # for the OOD score; None when not computed
    pooled: dict[str, np.ndarray] | None = None

    def proba(self, temperature: float = 1.0, probe: str | None = None) -> np.ndarray:
        logits = self.logits if probe is None else self.probe_logits[probe]
        return M.softmax_t(logits, temperature)


def central_box(h: int, w: int, frac: float = OCCLUSION_BOX) -> tuple[slice, slice]:
    """Row and column slices of the centred box covering ``frac`` of height and width."""
    bh, bw = round(h * frac), round(w * frac)
    top, left = (h - bh) // 2, (w - bw) // 2
    return slice(top, top + bh), slice(left, left + bw)


def occlude(x: torch.Tensor, keep: str, frac: float = OCCLUSION_BOX) -> torch.Tensor:
    """Occlusion probe on a preprocessed batch ``(B, C, H, W)``.

    ``keep="periphery"``: the central box is filled with each input's per-channel mean;
    ``keep="centre"``: everything outside the box is filled instead.
    """
    rows, cols = central_box(x.shape[-2], x.shape[-1], frac)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    if keep == "periphery":
        out = x.clone()
        out[..., rows, cols] = mean.expand_as(out[..., rows, cols])
        return out
    if keep == "centre":
        out = mean.expand_as(x).clone()
        out[..., rows, cols] = x[..., rows, cols]
        return out
    raise ValueError(f"keep must be one of {PROBES}, got {keep!r}")


def evaluation_dataset(root: str | Path, rows: Sequence[dict[str, str]], classes: Sequence[str],
                       pcfg: PreprocessConfig, lung_masks: bool = False) -> CXRDataset:
    """The images of ``rows`` as evaluation sees them (the checkpoint's contract, no
    augmentation); see :class:`core.data.CXRDataset` for ``lung_masks``."""
    return CXRDataset(root, rows, classes, build_transform(pcfg), lung_masks=lung_masks)


def predict_rows(
    model: nn.Module,
    root: str | Path,
    rows: Sequence[dict[str, str]],
    classes: Sequence[str],
    pcfg: PreprocessConfig,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    workers: int = 0,
    occlusion: bool = False,
    lung_focus: bool = False,
    features: bool = False,
    progress: bool = True,
    desc: str = "predict",
) -> Predictions:
    """Batched inference (eval mode, ``torch.inference_mode``, fp32) over manifest-style rows.

    ``rows``: dicts with ``path`` (relative to ``root``) and ``class``. With ``occlusion``
    the periphery-only and centre-only probes run on the same preprocessed batches. With
    ``lung_focus`` the same forward pass also gives each image's Grad-CAM (layer4, predicted
    class; ``core.gradcam.forward_with_cam``): its energy share on the lungs (on the model
    input's grid, padding excluded) over the lungs' share of the original image, as
    ``core.lungs.lung_focus_ratio`` of the map placed back on the original image. With
    ``features`` each image's pooled stage activations (``core.ood.pooled_layer_features``,
    what the OOD score reads) are kept too; without ``lung_focus`` the logits then come from
    the same pass (the head on ``layer4``'s pooled activations, as ``core.ood`` computes them).
    """
    if not rows:
        raise DatasetError(f"No images to evaluate ({desc}).")
    dev = resolve_device(str(device))
    ds = evaluation_dataset(root, rows, classes, pcfg, lung_masks=lung_focus)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    model = model.to(dev).eval()
    outs: dict[str, list[torch.Tensor]] = {"full": [], **{p: [] for p in PROBES}}
    focus: list[float] = []
    from_dataset: list[bool] = []
    pooled: dict[str, list[torch.Tensor]] = {n: [] for n in ood.LAYERS}
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
            x = batch[0].to(dev, non_blocking=True).float()
            if lung_focus:
                from core import gradcam, lungs

                logits, cams = gradcam.forward_with_cam(model, x)
                heat = gradcam.upsample(cams, tuple(x.shape[-2:]))
                focus.extend(
                    lungs.lung_energy_share(h, g == 2, region=g > 0) / float(frac)
                    if (g == 2).any() else float("nan")
                    for h, g, frac in zip(heat, batch[2].numpy(), batch[4], strict=True))
                from_dataset.extend(bool(v) for v in batch[3])
            if features:
                stages = ood.pooled_layer_features(model, x)
                for n in ood.LAYERS:
                    pooled[n].append(stages[n].cpu())
                if not lung_focus:
                    logits = model.fc(stages["layer4"])
            elif not lung_focus:
                logits = model(x)
            outs["full"].append(logits.float().cpu())
            if occlusion:
                for probe in PROBES:
                    outs[probe].append(model(occlude(x, probe)).float().cpu())
    logits = torch.cat(outs["full"]).numpy().astype(np.float64)
    probes = {p: torch.cat(outs[p]).numpy().astype(np.float64) for p in PROBES if outs[p]}
    return Predictions(paths=[r["path"] for r in rows], y_true=np.asarray(ds.targets),
                       logits=logits, classes=list(classes), probe_logits=probes,
                       lung_focus=np.asarray(focus, np.float64) if lung_focus else None,
                       mask_from_dataset=np.asarray(from_dataset, bool) if lung_focus else None,
                       pooled={n: torch.cat(v).numpy() for n, v in pooled.items()}
                       if features else None)



def loader_settings(ckpt: dict[str, Any], batch_size: int | None,
                    workers: int | None) -> tuple[int, int]:
    """Batch size and DataLoader workers: as given, else as the run was trained (32, 0)."""
    tc = ckpt.get("train_config") or {}
    bs = batch_size if batch_size is not None else int(tc.get("batch_size", 32) or 32)
    nw = workers if workers is not None else int(tc.get("workers", 0) or 0)
    return bs, nw


def predict_split(
    checkpoint: str | Path,
    data_dir: str | Path,
    split: str = "test",
    *,
    device: str = "cpu",
    batch_size: int = 32,
    workers: int = 0,
    occlusion: bool = False,
    progress: bool = True,
    allow_manifest_change: bool = False,
) -> Predictions:
    """Load ``checkpoint`` and predict one split of its run's manifest (raw logits; see
    :func:`core.data.run_split_rows` for ``allow_manifest_change``)."""
    ckpt = load_checkpoint(checkpoint)
    rows = run_split_rows(Path(checkpoint).parent, data_dir, ckpt, (split,),
                          allow_manifest_change=allow_manifest_change)[0][split]
    return predict_rows(model_from_checkpoint(ckpt), data_dir, rows, ckpt["classes"],
                        preprocess_config_of(ckpt), device=device, batch_size=batch_size,
                        workers=workers, occlusion=occlusion, progress=progress, desc=split)

