"""Step progress of a training run, written to a small JSON file while it trains.

``python -m core.train --progress-file RUN/progress.json`` passes a :class:`StepProgress` as
``fit``'s ``on_step`` hook. It receives the run's global step count and works out the
epoch and step within it from the run folder (``manifest.csv`` for the number of training
images, ``history.json`` for the steps of finished epochs), measures images per second and
estimates the time left. It writes atomically, at most every ``interval`` seconds, so a
reader (the app's Training page, :mod:`core.jobs`) never sees half a file. No torch here.

File content: ``{"epoch", "epochs", "phase" ("head"|"finetune"), "step", "steps_per_epoch",
"images_per_s", "eta_s", "updated" (Unix time)}``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from core.config import RunConfig

PROGRESS_FILE = "progress.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class StepProgress:
    """``on_step`` hook of :func:`core.train.fit` that writes the run's progress file."""

    def __init__(self, path: str | Path, cfg: RunConfig, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.out = Path(cfg.train.output)
        self.tc = cfg.train
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.interval = interval
        self._train_images: int | None = None
        self._history_mtime = -1.0
        self._steps_before = 0
        self._epochs_done = 0
        self._epoch_started: dict[int, float] = {}
        self._epoch_walls: list[float] = []
        self._last_write = 0.0
        self._seconds_per_step: float | None = None

    def _phase(self, epoch: int) -> str:
        tc = self.tc
        if tc.mode == "head" or (tc.mode == "staged" and epoch <= tc.head_epochs):
            return "head"
        return "finetune"

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches in one epoch of ``epoch``'s phase (head epochs run over cached features:
        ``feature_cache_views`` per training image)."""
        if self._train_images is None:
            with (self.out / "manifest.csv").open(newline="") as fh:
                self._train_images = sum(r["split"] == "train" for r in csv.DictReader(fh))
        n = self._train_images
        if self._phase(epoch) == "head":
            n *= max(1, self.tc.feature_cache_views)
        per_rank = max(1, self.tc.batch_size // self.world)
        steps = math.ceil(math.ceil(n / self.world) / per_rank)
        return min(steps, self.tc.max_steps_per_epoch) if self.tc.max_steps_per_epoch else steps

    def _refresh_history(self) -> None:
        path = self.out / "history.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._history_mtime:
            return
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        self._history_mtime = mtime
        self._epochs_done = len(rows)
        self._steps_before = sum(int(r.get("steps", 0)) for r in rows)

    def __call__(self, step: int) -> None:
        now = time.time()
        self._refresh_history()
        epoch = self._epochs_done + 1
        per_epoch = self.steps_per_epoch(epoch)
        in_epoch = max(1, step - self._steps_before)
        if epoch not in self._epoch_started:
            if epoch - 1 in self._epoch_started:  # the previous epoch's full wall time
                self._epoch_walls.append(now - self._epoch_started[epoch - 1])
            self._epoch_started[epoch] = now
        if now - self._last_write < self.interval and in_epoch < per_epoch:
            return
        elapsed = now - self._epoch_started[epoch]
        # from this epoch's steps; at an epoch's first step, the previous epoch's pace
        seconds_per_step = elapsed / (in_epoch - 1) if in_epoch > 1 else self._seconds_per_step
        self._seconds_per_step = seconds_per_step
        images_per_s = (self.tc.batch_size / seconds_per_step) if seconds_per_step else None
        eta = None
        if seconds_per_step:
            later = self.tc.epochs - epoch
            per_epoch_wall = (sum(self._epoch_walls) / len(self._epoch_walls)
                              if self._epoch_walls else per_epoch * seconds_per_step)
            eta = (per_epoch - in_epoch) * seconds_per_step + later * per_epoch_wall
        write_json_atomic(self.path, {
            "epoch": epoch, "epochs": self.tc.epochs, "phase": self._phase(epoch),
            "step": in_epoch, "steps_per_epoch": per_epoch,
            "images_per_s": None if images_per_s is None else round(images_per_s, 2),
            "eta_s": None if eta is None else round(eta, 1), "updated": now,
        })
        self._last_write = now
