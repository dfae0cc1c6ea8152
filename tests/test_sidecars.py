"""Run artefacts you can trust: ``best.pt`` is never rewritten after training; calibration,
operating point, OOD and low-confidence statistics (and the int8 block) live in sidecar files
beside it, each naming the SHA-256 of the weights it was fitted on, and loading checks them.

``small_run`` (tests/conftest.py) is a full default ``core.train.fit``, so the first test
checks what training itself leaves on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import runs, sidecars
from core.errors import CheckpointError
from core.model import load_checkpoint, save_checkpoint
from tests.conftest import ROOT

FITTED_KEYS = ("temperature", "operating_point", "ood", "low_confidence", "int8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_a_full_fit_leaves_best_pt_as_trained_and_every_hash_names_it(small_run: Path) -> None:
    best = small_run / "best.pt"
    raw = load_checkpoint(best)
    # the finish wrote nothing into the weights file: it is what training saved
    assert not set(FITTED_KEYS) & set(raw), "the finish rewrote best.pt"
    sha = sha256(best)
    report = json.loads((small_run / "report" / "metrics.json").read_text())
    summary = json.loads((small_run / "run.json").read_text())
    assert report["run"]["checkpoint_sha256"] == sha
    assert summary["weights_sha256"] == sha
    cal = json.loads((small_run / "best.calibration.json").read_text())
    assert cal["weights_sha256"] == sha and cal["weights_file"] == "best.pt"
    from safetensors import safe_open

    with safe_open(str(small_run / "best.ood.safetensors"), "pt") as fh:
        assert fh.metadata()["weights_sha256"] == sha
    # the serving graph and its precision check name the same weights
    from core import export

    assert export.is_current(small_run / "best.onnx", sha)
    assert json.loads((small_run / "serving.json").read_text())["weights_sha256"] == sha
    # what the finish fitted is what a loader gets back
    ckpt = sidecars.load_run_checkpoint(best)
    assert ckpt["temperature"] == pytest.approx(summary["temperature"]) == cal["temperature"]
    assert ckpt["operating_point"] == summary["operating_point"] == cal["operating_point"]
    assert ckpt["ood"]["threshold"] == pytest.approx(summary["ood_threshold"])
    assert ckpt["low_confidence"]["threshold"] == pytest.approx(summary["low_confidence_threshold"])
    assert ckpt["low_confidence"]["temperature"] == pytest.approx(cal["temperature"])
    assert torch.equal(ckpt["state_dict"]["fc.1.weight"], raw["state_dict"]["fc.1.weight"])


def test_refitting_calibration_and_ood_leaves_best_pt_untouched(small_run: Path,
                                                                 tmp_path: Path) -> None:
    from core import calibration, ood

    run = copy_run(small_run, tmp_path / "run")
    before = sha256(run / "best.pt")
    data = runs.load_run(run).data_dir
    for f in (run / "best.calibration.json", run / "best.ood.safetensors"):
        f.unlink()
    calibration.recalibrate_checkpoint(run / "best.pt", data, progress=False)
    ood.calibrate_run_ood(run, data, progress=False)
    assert sha256(run / "best.pt") == before
    want = sidecars.load_run_checkpoint(small_run / "best.pt")
    got = sidecars.load_run_checkpoint(run / "best.pt")
    assert got["temperature"] == pytest.approx(want["temperature"])
    assert got["ood"]["threshold"] == pytest.approx(want["ood"]["threshold"])
    for name in want["ood"]["layer_names"]:
        for key in ("mean", "projection", "centers"):
            torch.testing.assert_close(got["ood"]["layers"][name][key],
                                       want["ood"]["layers"][name][key])


def test_a_stale_sidecar_is_refused_with_its_file_and_the_refit_command(small_run: Path,
                                                                        tmp_path: Path) -> None:
    from core.inference import Predictor

    run = copy_run(small_run, tmp_path / "run")
    ckpt = load_checkpoint(run / "best.pt")
    ckpt["epoch"] = int(ckpt["epoch"]) + 1  # retrained: other weights, same folder
    save_checkpoint(ckpt, run / "best.pt")
    with pytest.raises(CheckpointError) as err:
        Predictor.from_checkpoint(run / "best.pt", device="cpu")
    msg = str(err.value)
    assert "best.calibration.json" in msg and "python -m core.evaluate" in msg
    assert "--calibrate" in msg and str(run / "best.pt") in msg
    # only the OOD file stale: named with its own refit command
    cal = json.loads((run / "best.calibration.json").read_text())
    cal["weights_sha256"] = sha256(run / "best.pt")
    (run / "best.calibration.json").write_text(json.dumps(cal))
    with pytest.raises(CheckpointError, match=r"best\.ood\.safetensors.*python -m core\.evaluate"):
        sidecars.load_run_checkpoint(run / "best.pt")


def test_an_older_run_with_calibration_inside_best_pt_loads_and_migrates(small_run: Path,
                                                                         tmp_path: Path) -> None:
    from core.inference import Predictor

    run = copy_run(small_run, tmp_path / "old")
    fitted = sidecars.load_run_checkpoint(run / "best.pt")
    save_checkpoint(fitted, run / "best.pt")  # how runs were stored before the sidecars
    for f in sidecars.sidecar_files(run / "best.pt"):
        f.unlink()
    old = Predictor.from_checkpoint(run / "best.pt", device="cpu", runtime="torch")
    assert old.temperature == pytest.approx(fitted["temperature"])
    assert old.operating_point == fitted["operating_point"]
    assert old.ood_threshold == pytest.approx(fitted["ood"]["threshold"])

    before = sha256(run / "best.pt")
    out = subprocess.run([sys.executable, "-m", "core.runs", "migrate", str(run)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sha256(run / "best.pt") == before  # migration writes sidecars, not the weights
    written = sidecars.sidecar_files(run / "best.pt")
    assert run / "best.calibration.json" in written and run / "best.ood.safetensors" in written
    assert json.loads((run / "best.calibration.json").read_text())["weights_sha256"] == before
    migrated = sidecars.load_run_checkpoint(run / "best.pt")
    assert migrated["temperature"] == fitted["temperature"]
    assert migrated["ood"]["threshold"] == fitted["ood"]["threshold"]
    assert json.loads((run / "run.json").read_text())["weights_sha256"] == before
    # the sidecars now win over the keys still inside best.pt
    cal = json.loads((run / "best.calibration.json").read_text())
    cal["temperature"] = 2.5
    (run / "best.calibration.json").write_text(json.dumps(cal))
    assert sidecars.load_run_checkpoint(run / "best.pt")["temperature"] == 2.5


def test_predictor_files_list_the_sidecars(small_run: Path) -> None:
    names = {Path(p).name for p, _ in runs.predictor_files(small_run / "best.pt")}
    assert {"best.pt", "best.calibration.json", "best.ood.safetensors"} <= names
    assert {p.name for p in sidecars.sidecar_files(small_run / "best.pt")} <= names
