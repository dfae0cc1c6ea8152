"""Shared fixtures.

Real-data tests use ``../shared/data/cxr-real`` (1,350 real X-rays, 3 classes) by path and
are skipped, with the reason, where that folder is absent (users' machines). The real model
(``trained_run``, minutes) is trained only for the ``@pytest.mark.slow`` tests (learning on
real data, OOD on real X-rays, int8 agreement on the real test split), which the default
``python -m pytest`` deselects; tests that need a model but not a learned one use the
seconds-fast ``small_run``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
REAL_DIR = SHARED / "cxr-real"
MASKS_DIR = SHARED / "lung-masks"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The audit log (core.audit) never writes into the user's data folder or a deployment's database
# from a test: the session gets a data folder of its own, and tests that want a database or the
# off switch set CXR_DB_URL / CXR_AUDIT themselves.
for _var in ("CXR_DB_URL", "CXR_AUDIT", "CXR_AUDIT_SPOOL", "CXR_AUDIT_SYNC"):
    os.environ.pop(_var, None)
os.environ["CXR_DATA_HOME"] = tempfile.mkdtemp(prefix="cxr-test-data-")
# The shipped demo model (assets/demo) is hidden unless a test shows it (CXR_DEMO=1, with
# CXR_DEMO_DIR for a demo of its own), so that every other test sees only its own runs; an
# exported graph of a demo goes to the session's data folder (its cache/), not the user's.
os.environ["CXR_DEMO"] = "0"
os.environ.pop("CXR_DEMO_DIR", None)


def require_real() -> Path:
    if not (REAL_DIR / "COVID" / "images").is_dir():
        pytest.skip(f"real chest X-rays not found at {REAL_DIR} (they sit beside the clone in CI "
                    "as ../shared/data/cxr-real; users' machines don't have them)")
    return REAL_DIR


@pytest.fixture(scope="session")
def real_dir() -> Path:
    return require_real()


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def blob_image(rng: np.random.Generator, cls: int, size: int = 64) -> np.ndarray:
    """A small synthetic grayscale image whose class is a bright blob's position."""
    img = rng.normal(60, 12, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = [(size // 4, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, size // 2)][cls % 3]
    img += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_class: int = 12, classes=("A", "B", "C"), layout: str = "plain",
                 seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        folder = root / c / "images" if layout == "database" else root / c
        for i in range(per_class):
            write_png(folder / f"{c}-{i}.png", blob_image(rng, k, size))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet50 trained from scratch on the real set, once per session; returns best.pt.

    For ``@pytest.mark.slow`` tests only (``python -m pytest -m "slow or not slow"``).
    Small for CI (64 px, 6 epochs, about four minutes on 2 cores with every finishing step)
    yet honest: from random weights it must learn the real images well above chance (see
    test_train_real). It is then calibrated and evaluated like every run.
    """
    data = require_real()
    from core.config import DataConfig, PreprocessConfig, RunConfig, TrainConfig
    from core.train import fit

    out = tmp_path_factory.mktemp("real_run")
    cfg = RunConfig(
        data=DataConfig(data_dir=str(data)),
        preprocess=PreprocessConfig(img_size=64),
        train=TrainConfig(output=str(out), arch="resnet50", weights="none", epochs=6,
                          batch_size=32, lr=1e-3, backbone_lr_mult=1.0, scheduler="cosine",
                          early_stop_patience=6, seed=0),
    )
    return fit(cfg, progress=False)


SMALL_CLASSES = ("COVID", "Normal", "Viral Pneumonia")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete small run, built once per pytest run in seconds, with no real data needed:
    a ResNet18 trained for 2 epochs at 64 px on synthetic images laid out like the database
    (three of its classes), with every finishing step (calibration, test report, OOD
    statistics, the exported serving graph and its precision check). For tests of what is
    shown, not of what is learnt. Returns the run folder, ``<tmp>/models/small``: point
    ``CXR_MODELS_DIR`` at its parent. Don't modify it.
    """
    from core.config import DataConfig, PreprocessConfig, RunConfig, TrainConfig
    from core.train import fit

    base = tmp_path_factory.mktemp("small")
    data = make_dataset(base / "data", per_class=20, classes=SMALL_CLASSES, layout="database",
                        size=96)
    cfg = RunConfig(
        data=DataConfig(data_dir=str(data)),
        preprocess=PreprocessConfig(img_size=64),
        train=TrainConfig(output=str(base / "models" / "small"), arch="resnet18", weights="none",
                          epochs=2, batch_size=16, lr=1e-3, backbone_lr_mult=1.0, seed=0,
                          precision="fp32"),
    )
    return fit(cfg, progress=False).parent


@pytest.fixture(scope="session")
def small_demo(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo folder built from ``small_run`` by ``core.demo.build`` (``--from-run``: int8
    weights, finished on them), for tests of the demo's build and display; the shipped one
    is ``assets/demo``. Show it with ``CXR_DEMO=1`` and ``CXR_DEMO_DIR`` at it. Don't
    modify it."""
    from core import demo, runs

    data = runs.load_run(small_run).data_dir
    out = tmp_path_factory.mktemp("demo") / "demo"
    return demo.build(out, data, from_run=small_run, recipe="small-run", progress=False)


@pytest.fixture
def small_models(small_run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``CXR_MODELS_DIR`` pointed at the folder holding ``small_run``; returns the run."""
    monkeypatch.setenv("CXR_MODELS_DIR", str(small_run.parent))
    return small_run


@pytest.fixture
def no_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``CXR_MODELS_DIR`` pointed at an empty folder and the demo model hidden
    (``CXR_DEMO=0``): every page's empty state."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    monkeypatch.setenv("CXR_MODELS_DIR", str(empty))
    monkeypatch.setenv("CXR_DEMO", "0")
    return empty


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty models folder for training-job tests (``CXR_MODELS_DIR``), with in-app
    training allowed and no data root; a job's runner left behind is killed."""
    import signal

    from core import jobs

    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("CXR_MODELS_DIR", str(folder))
    monkeypatch.delenv(jobs.ENV_ALLOW, raising=False)
    monkeypatch.delenv(jobs.ENV_DATA_ROOT, raising=False)
    yield folder
    job = jobs.read_job(folder)  # never leave a runner behind
    if job and job.get("pid") and jobs.pid_alive(job["pid"], runner=True):
        os.killpg(job["pid"], signal.SIGKILL)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after
    ``timeout`` seconds naming ``what``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
