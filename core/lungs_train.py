"""Training and benchmark of the lung-field segmenter (the runtime is :mod:`core.lungs`).

Command line (``python -m core.lungs ...`` forwards here)::

    python -m core.lungs_train train --data-dir ../shared/data/lung-masks --output assets/lung_segmenter.pt
    python -m core.lungs_train bench --data-dir ../shared/data/lung-masks

Data: a folder with ``images/<name>`` and ``masks/<name>`` (255 = lung). A fixed held-out
list (the folder's MANIFEST.csv validation split, else every 10th file) is written beside
the weights and never trained on; the shipped weights are the last epoch's, scored once on it.

Research use only: not a medical device.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from core.errors import CheckpointError, DatasetError, InvalidImageError
from core.lungs import (
    ARCH_NAME,
    DEFAULT_PREPROCESS,
    DEFAULT_SEGMENTER_PATH,
    SEGMENTER_FORMAT,
    SEGMENTER_VERSION,
    LungSegmenter,
    _model_input,
    _normalise_u8,
    _resize_mask,
    file_sha256,
    load_mask,
)
from core.pixels import clahe, load_gray, resize, to_uint8
from core.unet import DEFAULT_ARCH_PARAMS, build_segmenter_model

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "../shared/data/lung-masks"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
HOLDOUT_SPLITS = ("val", "valid", "validation", "test", "holdout")


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
        prog="python -m core.lungs_train",
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
