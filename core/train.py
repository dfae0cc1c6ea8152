"""Training: small reference-style functions and ``fit(cfg)``; ``python -m core.train``.

Shaped like torchvision's ``references/classification``: ``train_one_epoch`` and
``evaluate_epoch`` take (model, loader, device, ...); ``fit`` wires data, model, optimiser,
schedule, early stopping, checkpoints and history together.

* Modes: ``head`` (frozen backbone; backbone features are computed once and cached, so head
  epochs take seconds), ``finetune`` (all layers, backbone at ``lr * backbone_lr_mult``),
  ``staged`` (``head_epochs`` of head training on cached features, then fine-tuning).
* Devices: CUDA with AMP (bf16, or fp16 with a GradScaler), channels_last and pinned memory;
  CPU with bf16 autocast only where the CPU has native bf16 (elsewhere oneDNN emulates it
  and it is ~10x slower, so fp32 + channels_last is used).
* Distributed: the same entry point under ``torchrun`` uses DistributedDataParallel with a
  ``DistributedSampler`` (gloo on CPU, NCCL on CUDA). PyTorch has no distributed weighted
  sampler, so DDP uses the class-weighted loss; the early-stopping decision is taken on rank
  0 and broadcast so that all ranks stop at the same epoch. On CUDA BatchNorm layers become
  ``SyncBatchNorm``; on CPU (where SyncBatchNorm is unsupported) each rank normalises its own
  share of the batch unless ``--freeze-bn`` is set.
* Reproducible: every epoch reseeds torch, the sampler and the augmentation from
  ``seed + epoch``, so ``--resume`` after an interruption continues exactly where the last
  finished epoch left off.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, WeightedRandomSampler
from tqdm.auto import tqdm

from core import model as model_lib
from core import runs
from core.config import (
    ARCHS,
    LUNG_VIEWS,
    MODES,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    SCHEDULERS,
    AugmentConfig,
    DataConfig,
    PreprocessConfig,
    RunConfig,
    TrainConfig,
    default_data_dir,
    save_json,
    to_dict,
)
from core.data import CXRDataset, Manifest, build_manifest, load_manifest, seed_worker
from core.devices import autocast, resolve_device, resolve_precision
from core.errors import CheckpointError, ConfigError, CXRError
from core.preprocess import build_transform

log = logging.getLogger(__name__)

StepHook = Callable[[int], None]


# ---------------------------------------------------------------- devices and precision


# ---------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    rank, world, local_rank = dist_info()
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- loss, seeding


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised so that the mean weight per *sample* is 1."""
    counts = np.bincount(np.asarray(targets), minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def weighted_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Sum of per-sample (weighted) cross-entropy divided by the local batch size.

    Unlike ``reduction="mean"`` with class weights, this normaliser does not depend on the
    batch's class mix, so DDP's gradient averaging over equal shards equals the loss of the
    whole global batch.
    """
    return F.cross_entropy(logits.float(), y, weight=weight, reduction="sum") / y.shape[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---------------------------------------------------------------- one epoch


def train_one_epoch(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    freeze_bn: bool = False,
    max_steps: int = 0,
    on_step: StepHook | None = None,
    step_offset: int = 0,
    progress: bool = True,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns loss, accuracy, images and images/s. ``ema``: a
    weight average updated after every optimiser step."""
    model.train()
    if freeze_bn:
        set_bn_eval(model)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, unit="batch")
    for step, (x, y) in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        if on_step is not None:
            on_step(step_offset + step + 1)
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "acc": correct / max(seen, 1),
        "images": seen,
        "seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 else 0.0,
    }


@torch.inference_mode()
def evaluate_epoch(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, and the raw logits/targets of a loader."""
    model.eval()
    logits_all, targets_all = [], []
    for x, y in tqdm(loader, desc="evaluate", leave=False, disable=not progress, unit="batch"):
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits_all.append(model(x).float().cpu())
        targets_all.append(y.cpu())
    logits = torch.cat(logits_all)
    targets = torch.cat(targets_all)
    pred = logits.argmax(1)
    loss = loss_fn(logits, targets) if loss_fn else F.cross_entropy(logits, targets)
    return {
        "loss": float(loss),
        "acc": float((pred == targets).float().mean()),
        "macro_f1": float(f1_score(targets.numpy(), pred.numpy(), average="macro", zero_division=0)),
        "logits": logits,
        "targets": targets,
    }


# ---------------------------------------------------------------- head-mode feature cache


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "caching features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (N x 2048 for ResNet50) of every image in ``loader``."""
    net = unwrap(model)
    fc = net.fc
    net.fc = nn.Identity()
    net.eval()
    feats, ys = [], []
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                feats.append(net(x).float().cpu())
            ys.append(y)
    finally:
        net.fc = fc
    return torch.cat(feats), torch.cat(ys)


# ---------------------------------------------------------------- the run


class Trainer:
    """State of one run: built by ``fit``; kept small so each piece is testable."""

    def __init__(self, cfg: RunConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.out = Path(self.tc.output)
        self.progress = progress
        self.rank, self.world, self.device = init_distributed(self.tc.device)
        self.is_main = self.rank == 0
        self.amp_dtype = resolve_precision(self.tc.precision, self.device)
        self.channels_last = self.tc.channels_last
        self.history: list[dict[str, Any]] = []
        self.best_f1 = -1.0
        self.bad_epochs = 0
        self.start_epoch = 1
        if self.tc.batch_size % self.world:
            raise ConfigError(
                f"--batch-size {self.tc.batch_size} is the global batch; it must divide by the "
                f"{self.world} processes"
            )

    # -- data
    def prepare_data(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        manifest_path = self.out / "manifest.csv"
        resumed = self.tc.resume and manifest_path.is_file()
        if resumed:
            manifest = load_manifest(manifest_path, self.cfg.data.data_dir)
        else:
            manifest = build_manifest(self.cfg.data, progress=self.progress and self.is_main)
            if self.is_main:
                manifest.save(manifest_path)
        if self.is_main and not (resumed and (self.out / runs.DATASET_FILE).is_file()):
            runs.write_dataset_summary(self.out, self.cfg.data.data_dir, manifest)
        self.manifest: Manifest = manifest
        self.classes = manifest.classes
        pp, aug = self.cfg.preprocess, self.cfg.augment
        root = self.cfg.data.data_dir
        # One cache for the train split's two views (same rows, same preparation), one for val.
        train_cache, val_cache = ({}, {}) if self.tc.cache_images else (None, None)
        self.train_ds = CXRDataset(root, manifest.split("train"), self.classes,
                                   build_transform(pp, train=True, augment=aug, seed=self.tc.seed),
                                   cache=train_cache)
        self.train_plain_ds = CXRDataset(root, manifest.split("train"), self.classes,
                                         build_transform(pp), cache=train_cache)
        self.val_ds = CXRDataset(root, manifest.split("val"), self.classes, build_transform(pp),
                                 cache=val_cache)
        self.weights = class_weights(self.train_ds.targets, len(self.classes))
        log.info("Classes %s; split sizes %s", self.classes,
                 {s: len(manifest.split(s)) for s in ("train", "val", "test")})

    def loader(self, ds: torch.utils.data.Dataset, train: bool, epoch: int = 0) -> DataLoader:
        per_rank = self.tc.batch_size // self.world
        common: dict[str, Any] = {
            "batch_size": per_rank if train else max(per_rank, 64),
            "num_workers": self.tc.workers,
            "pin_memory": self.device.type == "cuda",
            "worker_init_fn": seed_worker,
            "generator": torch.Generator().manual_seed(self.tc.seed + epoch),
            "persistent_workers": False,
        }
        if not train:
            return DataLoader(ds, shuffle=False, **common)
        if self.tc.weighted_sampler and self.world == 1:
            targets = ds.tensors[1].tolist() if isinstance(ds, TensorDataset) else ds.targets
            w = self.weights[torch.as_tensor(targets)]
            sampler = WeightedRandomSampler(w.double(), num_samples=len(w), replacement=True,
                                            generator=common.pop("generator"))
            return DataLoader(ds, sampler=sampler, **common)
        sampler = DistributedSampler(ds, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.tc.seed, drop_last=False)
        sampler.set_epoch(epoch)
        return DataLoader(ds, sampler=sampler, **common)

    # -- model and optimiser
    def build(self) -> None:
        tc = self.tc
        net = model_lib.build_model(len(self.classes), weights=tc.weights, arch=tc.arch,
                                    dropout=tc.dropout)
        if self.world > 1 and self.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net.to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.model: nn.Module = net
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
            )
        use_weights = tc.class_weighted_loss or (tc.weighted_sampler and self.world > 1)
        if tc.weighted_sampler and self.world > 1 and self.is_main:
            log.warning("DDP has no distributed weighted sampler: using the class-weighted loss")
        sampler_balances = tc.weighted_sampler and self.world == 1
        self.loss_weight = self.weights.to(self.device) if use_weights and not sampler_balances else None
        self.scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None)
        # The weight average (--ema-decay) is what validation, best.pt and serving see.
        self.ema = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay),
                                  use_buffers=True) if tc.ema_decay > 0 else None)

    @property
    def eval_net(self) -> nn.Module:
        """The network validated and saved: the weight average when there is one."""
        if self.ema is None or int(self.ema.n_averaged) == 0:  # not averaged yet (head epochs)
            return self.net
        return self.ema.module

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return weighted_loss(logits, y, self.loss_weight)

    def make_optimizer(self, phase: str) -> None:
        tc = self.tc
        if phase == "head":
            groups = [{"params": model_lib.head_parameters(self.net), "lr": tc.lr}]
        else:
            groups = [
                {"params": model_lib.backbone_parameters(self.net),
                 "lr": tc.lr * tc.backbone_lr_mult},
                {"params": model_lib.head_parameters(self.net), "lr": tc.lr},
            ]
        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(groups, weight_decay=tc.weight_decay)
        if tc.scheduler == "cosine":
            self.scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(1, self.phase_epochs(phase)))
        else:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=0.5, patience=2)
        self.phase = phase
        for p in model_lib.backbone_parameters(self.net):
            p.requires_grad_(phase != "head")

    def phase_of(self, epoch: int) -> str:
        if self.tc.mode == "head":
            return "head"
        if self.tc.mode == "staged" and epoch <= self.tc.head_epochs:
            return "head"
        return "finetune"

    def phase_epochs(self, phase: str) -> int:
        if self.tc.mode == "staged":
            return self.tc.head_epochs if phase == "head" else self.tc.epochs - self.tc.head_epochs
        return self.tc.epochs

    # -- checkpoints
    def payload(self, epoch: int, val: dict[str, Any], full: bool) -> dict[str, Any]:
        state = {k: v.detach().cpu().contiguous() for k, v in self.eval_net.state_dict().items()}
        p: dict[str, Any] = {
            "format": model_lib.CHECKPOINT_FORMAT,
            "version": model_lib.CHECKPOINT_VERSION,
            "arch": self.tc.arch,
            "dropout": self.tc.dropout,
            "classes": list(self.classes),
            "preprocess": to_dict(self.cfg.preprocess),
            "augment": to_dict(self.cfg.augment),
            "data_config": to_dict(self.cfg.data),
            "train_config": to_dict(self.tc),
            "state_dict": state,
            "epoch": epoch,
            "val_metrics": {k: float(v) for k, v in val.items() if isinstance(v, int | float)},
            "manifest_sha256": self.manifest.sha256(),
            "manifest_splits": self.manifest.split_digests(),
            "versions": model_lib.library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if full:
            p.update({
                "phase": self.phase,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "train_state_dict": ({k: v.detach().cpu() for k, v in self.net.state_dict().items()}
                                     if self.ema is not None else None),
                "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
                "best_f1": self.best_f1,
                "bad_epochs": self.bad_epochs,
                "history": self.history,
            })
        return p

    def try_resume(self) -> None:
        last = self.out / "last.pt"
        if not self.tc.resume:
            return
        if not last.is_file():
            log.warning("--resume: no %s yet; starting from scratch", last)
            return
        ckpt = model_lib.load_checkpoint(last)
        if ckpt.get("manifest_sha256") != self.manifest.sha256():
            raise CheckpointError(f"{last} was trained on another data split; cannot resume.")
        if self.ema is not None and ckpt.get("train_state_dict") is not None:
            self.net.load_state_dict(ckpt["train_state_dict"])  # the state_dict is the average
            self.ema.module.load_state_dict(ckpt["state_dict"])
            self.ema.n_averaged.fill_(int(ckpt.get("ema_n_averaged", 0)))
        else:
            self.net.load_state_dict(ckpt["state_dict"])
        self.make_optimizer(ckpt["phase"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.best_f1 = float(ckpt["best_f1"])
        self.bad_epochs = int(ckpt["bad_epochs"])
        self.history = list(ckpt["history"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        log.info("Resumed from %s at epoch %d", last, self.start_epoch)

    def write_history(self) -> None:
        if not self.is_main or not self.history:
            return
        (self.out / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        tmp = self.out / "history.csv.tmp"
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(self.history[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(self.history)
        tmp.replace(self.out / "history.csv")

    # -- epochs
    def head_loaders(self, epoch: int) -> tuple[DataLoader, DataLoader]:
        """Loaders over cached backbone features (computed on first use)."""
        if not hasattr(self, "_feat_train"):
            views = [self.train_plain_ds] + [self.train_ds] * max(0, self.tc.feature_cache_views - 1)
            xs, ys = [], []
            for k, ds in enumerate(views):
                x, y = extract_features(self.net, self.loader(ds, train=False), self.device,
                                        self.amp_dtype, self.channels_last,
                                        self.progress and self.is_main, f"caching features {k + 1}/{len(views)}")
                xs.append(x)
                ys.append(y)
            self._feat_train = TensorDataset(torch.cat(xs), torch.cat(ys))
            self._feat_val = TensorDataset(*extract_features(
                self.net, self.loader(self.val_ds, train=False), self.device, self.amp_dtype,
                self.channels_last, self.progress and self.is_main, "caching val features"))
        return self.loader(self._feat_train, train=True, epoch=epoch), self.loader(
            self._feat_val, train=False)

    def run_epoch(self, epoch: int, on_step: StepHook | None) -> tuple[dict[str, float], dict[str, Any]]:
        seed_everything(self.tc.seed * 1000 + epoch)
        self.train_ds.transform.reseed(self.tc.seed * 1000 + epoch)
        steps_before = sum(int(h.get("steps", 0)) for h in self.history)
        if self.phase == "head":
            tl, vl = self.head_loaders(epoch)
            head = unwrap(self.model).fc
            module: nn.Module = head
            if self.world > 1:
                module = nn.parallel.DistributedDataParallel(head)
            tr = train_one_epoch(module, self.loss_fn, self.optimizer, tl, self.device, epoch,
                                 None, None, False, False, self.tc.max_steps_per_epoch, on_step,
                                 steps_before, self.progress and self.is_main)
            val = evaluate_epoch(head, vl, self.device, None, False)
        else:
            tl = self.loader(self.train_ds, train=True, epoch=epoch)
            vl = self.loader(self.val_ds, train=False)
            tr = train_one_epoch(self.model, self.loss_fn, self.optimizer, tl, self.device, epoch,
                                 self.amp_dtype, self.scaler, self.channels_last, self.tc.freeze_bn,
                                 self.tc.max_steps_per_epoch, on_step, steps_before,
                                 self.progress and self.is_main, self.ema)
            val = evaluate_epoch(self.eval_net, vl, self.device, self.amp_dtype, self.channels_last)
        tr["steps"] = len(tl) if not self.tc.max_steps_per_epoch else min(len(tl), self.tc.max_steps_per_epoch)
        return tr, val

    def fit(self, on_step: StepHook | None = None) -> Path:
        self.prepare_data()
        seed_everything(self.tc.seed)  # same initial weights on every run and rank
        self.build()
        self.make_optimizer(self.phase_of(1))
        self.try_resume()
        if self.is_main:
            save_json(self.cfg, self.out / "config.json")
        best_path, last_path = self.out / "best.pt", self.out / "last.pt"
        for epoch in range(self.start_epoch, self.tc.epochs + 1):
            phase = self.phase_of(epoch)
            if phase != self.phase:
                log.info("Epoch %d: unfreezing the backbone (staged mode)", epoch)
                self.make_optimizer(phase)
            tr, val = self.run_epoch(epoch, on_step)
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            improved = val["macro_f1"] > self.best_f1
            if improved:
                self.best_f1 = val["macro_f1"]
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(val["macro_f1"])
            else:
                self.scheduler.step()
            row = {
                "epoch": epoch, "phase": phase,
                "train_loss": round(tr["loss"], 6), "train_acc": round(tr["acc"], 6),
                "val_loss": round(val["loss"], 6), "val_acc": round(val["acc"], 6),
                "val_macro_f1": round(val["macro_f1"], 6),
                "lr": lrs[-1], "backbone_lr": lrs[0] if len(lrs) > 1 else 0.0,
                "seconds": round(tr["seconds"], 3), "images_per_s": round(tr["images_per_s"], 2),
                "steps": tr["steps"],
            }
            self.history.append(row)
            stop = self.bad_epochs >= self.tc.early_stop_patience
            stop = bool(broadcast_object(stop))  # every rank takes rank 0's decision
            if self.is_main:
                log.info("epoch %d %s: train loss %.4f acc %.3f | val acc %.3f macro-F1 %.3f | "
                         "%.1f img/s", epoch, phase, tr["loss"], tr["acc"], val["acc"],
                         val["macro_f1"], tr["images_per_s"])
                if improved:
                    model_lib.save_checkpoint(self.payload(epoch, val, full=False), best_path)
                model_lib.save_checkpoint(self.payload(epoch, val, full=True), last_path)
                self.write_history()
            if dist.is_initialized():
                dist.barrier()
            if stop:
                log.info("Early stopping at epoch %d: no macro-F1 gain for %d epochs",
                         epoch, self.tc.early_stop_patience)
                break
        self.final_epoch = epoch if self.start_epoch <= self.tc.epochs else self.start_epoch - 1
        log.info("rank %d of %d finished after epoch %d", self.rank, self.world, self.final_epoch)
        return best_path


def fit(cfg: RunConfig, on_step: StepHook | None = None, progress: bool = True) -> Path:
    """Train a run end to end; returns the path of ``best.pt``.

    The rank-0 process writes ``dataset.json`` from the manifest before training. With
    ``cfg.train.evaluate`` (the default) it then finishes the run
    (``core.evaluate.finalize_run``): temperature and operating point on validation, the OOD
    and low-confidence cut-offs on validation (``core.ood``), with ``cfg.train.export`` (the
    default) the serving graph exported beside ``best.pt`` and the check of which reduced
    precisions may serve (``core.export``), and last the test report, whose per-image
    records carry the OOD and low-confidence flags. It ends by writing the checkpoint
    summary ``run.json`` (``core.runs.summarise``) of the final ``best.pt``.
    """
    trainer = Trainer(cfg, progress=progress)
    try:
        best = trainer.fit(on_step)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.is_main:
        if cfg.train.evaluate:
            from core import evaluate

            evaluate.finalize_run(best.parent, cfg.data.data_dir, device=str(trainer.device),
                                  progress=progress, export=cfg.train.export)
        runs.summarise(best.parent)
    return best


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d, p, a, t = DataConfig(), PreprocessConfig(), AugmentConfig(), TrainConfig()
    ap = argparse.ArgumentParser(
        prog="python -m core.train",
        description="Train a chest X-ray classifier (torchvision ResNet) on a folder of images. "
        "Runs under torchrun for several GPUs or machines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = ap.add_argument_group("recipe")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named recipe whose settings become the defaults (flags given "
                   "here still win); cpu-lungs: the recipe chosen by python -m core.bench "
                   "recipes (from scratch on a CPU, lung view, stronger augmentation)")
    g = ap.add_argument_group("data")
    g.add_argument("--data-dir", default=default_data_dir(),
                   help="dataset root (<Class>/images/*.png or <Class>/*.png); default: "
                   "$CXR_DATA_DIR, then data/COVID-19_Radiography_Dataset")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for the split and training")
    g.add_argument("--val-frac", type=float, default=d.val_frac)
    g.add_argument("--test-frac", type=float, default=d.test_frac)
    g.add_argument("--near-dup-distance", type=int, default=d.near_dup_distance,
                   help="max Hamming distance (bits of a 256-bit pHash) for near-duplicates")
    g.add_argument("--max-per-class", type=int, default=d.max_per_class,
                   help="use a seeded subset of at most N images per class (0 = all)")

    g = ap.add_argument_group("preprocessing (stored in the checkpoint)")
    g.add_argument("--img-size", type=int, default=p.img_size)
    g.add_argument("--resize-mode", choices=("letterbox", "stretch"), default=p.resize_mode,
                   help="letterbox keeps the aspect ratio and pads with black")
    g.add_argument("--no-clahe", dest="clahe", action="store_false", help="disable CLAHE")
    g.add_argument("--clahe-clip", type=float, default=p.clahe_clip)
    g.add_argument("--lung-view", choices=LUNG_VIEWS, default=p.lung_view,
                   help="crop to the lung field (crop), crop and blank outside it (mask), or "
                   "crop and blur and dim outside it (soft); see core.lungs")

    g = ap.add_argument_group("augmentation (training only)")
    g.add_argument("--rotate", type=float, default=a.rotate_deg, help="max rotation, degrees")
    g.add_argument("--translate", type=float, default=a.translate,
                   help="max shift as a fraction of the side")
    g.add_argument("--scale", type=float, default=a.scale,
                   help="max zoom in or out as a fraction (0.1: 0.9x to 1.1x)")
    g.add_argument("--brightness", type=float, default=a.brightness)
    g.add_argument("--contrast", type=float, default=a.contrast)
    g.add_argument("--no-augment", action="store_true", help="turn augmentation off")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=a.hflip,
                   help="random horizontal flip; off by default because a chest X-ray is not "
                   "left-right symmetric (heart on the left, markers, situs)")
    g.add_argument("--crop-scale", type=float, default=a.crop_scale,
                   help="random resized crop keeping at least this share of the area; with a "
                   "lung view the crop lies inside the lung box (0 = off)")
    g.add_argument("--gamma", type=float, default=a.gamma, help="random gamma in [1-g, 1+g]")
    g.add_argument("--blur", type=float, default=a.blur, help="probability of a Gaussian blur")
    g.add_argument("--noise", type=float, default=a.noise,
                   help="Gaussian noise std as a fraction of the intensity range")
    g.add_argument("--erase-periphery", type=float, default=a.erase_periphery,
                   help="probability of blanking a random band along each border (markers, "
                   "text and collimation edges carry the image's source, not its disease)")

    g = ap.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=t.arch)
    g.add_argument("--weights", default=t.weights,
                   help="imagenet (torchvision download), none (random init), or a path to a "
                   "local .pth state dict for offline use")
    g.add_argument("--mode", choices=MODES, default=t.mode,
                   help="head: frozen backbone (cached features); finetune: all layers; "
                   "staged: head first, then all layers")
    g.add_argument("--dropout", type=float, default=t.dropout)
    g.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=t.freeze_bn,
                   help="keep BatchNorm statistics fixed while training")

    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=t.epochs)
    g.add_argument("--head-epochs", type=int, default=t.head_epochs,
                   help="staged mode: epochs before the backbone is unfrozen")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="global batch size")
    g.add_argument("--lr", type=float, default=t.lr, help="head learning rate")
    g.add_argument("--backbone-lr-mult", type=float, default=None,
                   help="backbone learning rate as a multiple of --lr (default: 1.0 with "
                   "--weights none, 0.1 with pretrained weights)")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=t.optimizer)
    g.add_argument("--scheduler", choices=SCHEDULERS, default=t.scheduler)
    g.add_argument("--class-weighted-loss", action=argparse.BooleanOptionalAction,
                   default=t.class_weighted_loss, help="inverse-frequency class weights")
    g.add_argument("--weighted-sampler", action=argparse.BooleanOptionalAction,
                   default=t.weighted_sampler, help="class-balanced sampling (single process)")
    g.add_argument("--early-stop-patience", type=int, default=t.early_stop_patience)
    g.add_argument("--ema-decay", type=float, default=t.ema_decay,
                   help="exponential moving average of the weights per step, used for "
                   "validation, best.pt and serving (0 = off; 0.98 ~ the last 50 steps)")
    g.add_argument("--feature-cache-views", type=int, default=t.feature_cache_views,
                   help="head mode: cached views per image (1 = un-augmented only)")

    g = ap.add_argument_group("run")
    g.add_argument("--output", default=t.output, help="run folder, e.g. models/<run>")
    g.add_argument("--device", default=t.device, help="auto, cpu or cuda[:N]")
    g.add_argument("--precision", choices=PRECISIONS, default=t.precision,
                   help="auto: CUDA AMP; bf16 on CPUs with native bf16; else fp32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   default=t.channels_last)
    g.add_argument("--workers", type=int, default=t.workers, help="DataLoader workers")
    g.add_argument("--cache-images", action=argparse.BooleanOptionalAction,
                   default=t.cache_images,
                   help="keep each image's decoded, lung-viewed, resized and CLAHE'd form "
                   "between epochs (about img_size^2 bytes per image; in-process, so it helps "
                   "most with --workers 0, the CPU default)")
    g.add_argument("--resume", action="store_true", help="continue from <output>/last.pt")
    g.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="skip calibration and the test report at the end")
    g.add_argument("--no-export", dest="export", action="store_false",
                   help="skip the serving graph (best.onnx) and the reduced-precision check "
                   "(core.export) at the end; the predictor exports the graph on first load")
    g.add_argument("--max-steps-per-epoch", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--progress-file", default=None,
                   help="write step progress (epoch, step, images/s, ETA) to this JSON file "
                   "(core.progress; the app's Training page reads it)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def parse_args(argv: list[str] | None = None,
               overrides: dict[str, Any] | None = None) -> argparse.Namespace:
    """The CLI's arguments with ``--preset``'s settings (then ``overrides``, by argument
    name) as defaults: a flag given in ``argv`` always wins."""
    ap = build_parser()
    known, _ = ap.parse_known_args(argv)
    if known.preset:
        ap.set_defaults(**PRESETS[known.preset])
    if overrides:
        unknown = set(overrides) - set(vars(known))
        if unknown:
            raise ConfigError(f"unknown training settings: {sorted(unknown)}")
        ap.set_defaults(**overrides)
    return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    data = DataConfig(data_dir=args.data_dir, val_frac=args.val_frac, test_frac=args.test_frac,
                      seed=args.seed, near_dup_distance=args.near_dup_distance,
                      max_per_class=args.max_per_class)
    pre = replace(PreprocessConfig(), img_size=args.img_size, resize_mode=args.resize_mode,
                  clahe=args.clahe, clahe_clip=args.clahe_clip, lung_view=args.lung_view)
    if pre.lung_view != "none":
        from core import lungs

        pre = replace(pre, segmenter_sha256=lungs.file_sha256(lungs.DEFAULT_SEGMENTER_PATH))
    aug = AugmentConfig(rotate_deg=args.rotate, translate=args.translate, scale=args.scale,
                        brightness=args.brightness,
                        contrast=args.contrast, hflip=args.hflip, crop_scale=args.crop_scale,
                        gamma=args.gamma, blur=args.blur, noise=args.noise,
                        erase_periphery=args.erase_periphery,
                        p=0.0 if args.no_augment else AugmentConfig().p)
    train = TrainConfig(
        output=args.output, arch=args.arch, weights=args.weights, mode=args.mode,
        epochs=args.epochs, head_epochs=args.head_epochs, batch_size=args.batch_size, lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult, weight_decay=args.weight_decay,
        optimizer=args.optimizer, scheduler=args.scheduler, dropout=args.dropout,
        freeze_bn=args.freeze_bn, class_weighted_loss=args.class_weighted_loss,
        weighted_sampler=args.weighted_sampler, early_stop_patience=args.early_stop_patience,
        ema_decay=args.ema_decay,
        feature_cache_views=args.feature_cache_views, workers=args.workers,
        cache_images=args.cache_images, device=args.device,
        precision=args.precision, channels_last=args.channels_last, seed=args.seed,
        resume=args.resume, evaluate=args.evaluate, export=args.export,
        max_steps_per_epoch=args.max_steps_per_epoch,
    )
    return RunConfig(data=data, preprocess=pre, augment=aug, train=train)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        on_step = None
        if args.progress_file and dist_info()[0] == 0:
            from core.progress import StepProgress

            on_step = StepProgress(args.progress_file, cfg)
        best = fit(cfg, on_step=on_step, progress=not args.quiet)
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    if dist_info()[0] == 0:
        log.info("Best checkpoint: %s", best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
