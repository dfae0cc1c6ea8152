"""core.runs: what a page reads of a run (run.json, dataset.json, records, findings), read
without torch, and the files the dashboard's cached predictor is keyed on.

The full-fit tests use ``small_run`` (tests/conftest.py: ``core.train.fit`` end to end on
synthetic images), so they check what training itself writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import data as D
from core import runs
from core.config import DataConfig
from core.errors import CheckpointError
from tests.conftest import ROOT, make_dataset, write_png


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ---------------------------------------------------------------- run.json (after a full fit)


def test_run_json_describes_the_final_checkpoint(small_run: Path) -> None:
    from core.sidecars import load_run_checkpoint

    ckpt = load_run_checkpoint(small_run / "best.pt")
    summary = json.loads((small_run / "run.json").read_text())
    assert summary["weights_sha256"] == sha256(small_run / "best.pt")
    report = json.loads((small_run / "report" / "metrics.json").read_text())
    # best.pt is never rewritten after training: the report names the weights on disk
    assert report["run"]["checkpoint_sha256"] == summary["weights_sha256"]
    assert summary["classes"] == list(ckpt["classes"])
    assert summary["epoch"] == ckpt["epoch"] and summary["created"] == ckpt["created"]
    assert summary["temperature"] == pytest.approx(ckpt["temperature"])
    assert summary["operating_point"] == ckpt["operating_point"]
    assert summary["ood_threshold"] == pytest.approx(ckpt["ood"]["threshold"])
    assert summary["low_confidence_threshold"] == pytest.approx(ckpt["low_confidence"]["threshold"])
    check = json.loads((small_run / "serving.json").read_text())
    assert check["weights_sha256"] == summary["weights_sha256"]
    passed = [n for n in ("openvino-bf16", "onnx-int8") if check["checks"].get(n, {}).get("passed")]
    want = (passed or ["onnx-fp32"])[0]  # the default settings' order, on a CPU that runs it
    assert summary["serving"]["network"] == want
    assert summary["serving"]["runtime"] == want.split("-")[0]

    run = runs.load_run(small_run)
    assert run.weights_sha256 == summary["weights_sha256"]
    assert run.temperature == summary["temperature"]
    assert run.ood_threshold == summary["ood_threshold"]
    assert run.low_confidence_threshold == summary["low_confidence_threshold"]
    assert run.screening_class == ckpt["operating_point"]["class"]
    assert run.serving == summary["serving"]
    config = json.loads((small_run / "config.json").read_text())
    assert run.data_dir == config["data"]["data_dir"]
    assert run.classes == summary["classes"] and run.arch == "resnet18" and run.img_size == 64
    assert run.epoch == ckpt["epoch"] and run.created == ckpt["created"]
    assert run.missing == ()


def test_summarise_cli_rewrites_the_same_run_json(small_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(small_run, tmp_path / "run")
    want = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").unlink()
    assert any(m.startswith("checkpoint summary (run.json): python -m core.runs summarise")
               for m in runs.load_run(run_dir).missing)
    assert runs.main(["summarise", str(run_dir)]) == 0
    assert json.loads((run_dir / "run.json").read_text()) == want
    assert runs.main(["summarise", str(tmp_path / "nowhere")]) == 2  # reported, not raised


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "core.runs", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "summarise" in out and "dataset" in out and "migrate" in out
    out = subprocess.run([sys.executable, "-m", "core.runs", "summarise", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "run_dir" in out


# ---------------------------------------------------------------- reading without torch


def test_load_run_never_imports_torch(small_run: Path) -> None:
    code = (
        "import sys; from core.runs import load_run, list_runs\n"
        f"run = load_run({str(small_run)!r})\n"
        "_ = (run.classes, run.findings, run.serving, run.temperature, run.ood_threshold,\n"
        "     run.created, run.weights_sha256, run.data_dir, run.screening_class, run.missing,\n"
        "     len(run.predictions), run.dataset['counts'], list_runs(run.path.parent))\n"
        "assert 'torch' not in sys.modules, 'load_run imported torch'\n"
        "print('ok', len(run.predictions))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_runs_are_found_at_any_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    deep = models / "lungviews" / "crop"
    deep.mkdir(parents=True)
    (deep / "best.pt").write_bytes(b"not loaded here")
    (models / "plain").mkdir()
    (models / "plain" / "best.pt").write_bytes(b"x")
    (models / "empty").mkdir()  # no checkpoint: not a run
    monkeypatch.setenv("CXR_MODELS_DIR", str(models))
    found = {r.name: r for r in runs.list_runs()}
    assert set(found) == {"lungviews/crop", "plain"}
    assert found["lungviews/crop"].checkpoint == deep / "best.pt"
    run = runs.load_run(deep)
    assert run.name == "lungviews/crop"
    # nothing but the checkpoint: every piece is named with the command that makes it
    assert run.report is None and run.summary is None and run.predictions is None
    whats = [m.split(":", 1)[0] for m in run.missing]
    assert whats == ["checkpoint summary (run.json)", "evaluation report",
                     "dataset summary (dataset.json)",
                     "serving graph and its precision check (serving.json)"]
    assert all(": python -m core." in m for m in run.missing)
    with pytest.raises(CheckpointError):
        runs.load_run(models / "empty")


def test_older_runs_fall_back_to_report_and_serving_json(small_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(small_run, tmp_path / "old")
    (run_dir / "run.json").unlink()
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    report["findings"] = ["a plain-string finding of an older report"]
    (run_dir / "report" / "metrics.json").write_text(json.dumps(report))
    run = runs.load_run(run_dir)
    assert run.temperature == pytest.approx(report["calibration"]["temperature"])
    assert run.weights_sha256 == report["run"]["checkpoint_sha256"]
    assert run.operating_point["threshold"] == report["operating_point"]["threshold"]
    assert run.ood_threshold is None  # only the checkpoint (and run.json) know it
    check = json.loads((run_dir / "serving.json").read_text())
    assert run.serving == runs.serving(check, report["run"]["checkpoint_sha256"])
    stale = runs.serving({**check, "weights_sha256": "0" * 64}, report["run"]["checkpoint_sha256"])
    assert stale["network"] == "onnx-fp32"  # a check of other weights does not count
    assert run.findings == [{"id": "finding-0", "severity": "info",
                             "text": "a plain-string finding of an older report"}]
    assert [m.split(":", 1)[0] for m in run.missing] == ["checkpoint summary (run.json)"]
    old_columns = ["path", "true_class", "predicted_class", "predicted_class_at_operating_point",
                   *[f"prob_{c}" for c in run.classes]]
    csv = run_dir / "report" / "predictions.csv"
    pd.read_csv(csv)[old_columns].to_csv(csv, index=False)  # records of an older evaluate
    assert any(m.startswith("per-image records with OOD, probe and lung-focus columns: "
                            "python -m core.evaluate --checkpoint")
               for m in runs.load_run(run_dir).missing)


# ---------------------------------------------------------------- findings


def test_findings_are_records_sorted_most_severe_first(small_run: Path, tmp_path: Path) -> None:
    report = json.loads((small_run / "report" / "metrics.json").read_text())
    assert report["findings"]  # the synthetic run reads the periphery: a shortcut finding
    for f in report["findings"]:
        assert set(f) == {"id", "severity", "text"}
        assert f["severity"] in runs.SEVERITIES and f["text"]
    run_dir = copy_run(small_run, tmp_path / "run")
    mixed = [{"id": "b", "severity": "low", "text": "low one"},
             {"id": "a", "severity": "high", "text": "high one"},
             {"id": "c", "severity": "info", "text": "info one"},
             {"id": "d", "severity": "high", "text": "second high"}]
    report["findings"] = mixed
    (run_dir / "report" / "metrics.json").write_text(json.dumps(report))
    assert [f["id"] for f in runs.load_run(run_dir).findings] == ["a", "d", "b", "c"]


# ---------------------------------------------------------------- per-image records


def test_records_of_a_full_fit(small_run: Path) -> None:
    from core.sidecars import load_run_checkpoint

    run = runs.load_run(small_run)
    rec = run.predictions
    ckpt = load_run_checkpoint(small_run / "best.pt")
    for col in ("path", "true_class", "predicted_class", "predicted_class_at_operating_point",
                *[f"prob_{c}" for c in run.classes], "correct", "periphery_pred",
                "centre_pred", "lung_focus", "ood_score", "ood", "low_confidence"):
        assert col in rec.columns, col
    assert len(rec) == run.report["n"]
    assert (rec["correct"] == (rec["predicted_class"] == rec["true_class"])).all()
    # training fitted the OOD cut-off before the report: every image has a score and a flag
    assert rec["ood_score"].notna().all()
    assert (rec["ood"] == (rec["ood_score"] > ckpt["ood"]["threshold"])).all()
    assert rec["ood"].dtype == bool and rec["low_confidence"].dtype == bool
    manifest = D.load_manifest(small_run / "manifest.csv", run.data_dir)
    assert sorted(rec["path"]) == sorted(r["path"] for r in manifest.split("test"))


# ---------------------------------------------------------------- dataset.json


def test_dataset_json_of_a_full_fit_matches_the_manifest(small_run: Path) -> None:
    doc = json.loads((small_run / runs.DATASET_FILE).read_text())
    manifest = D.load_manifest(small_run / "manifest.csv", doc["data_dir"])
    assert doc["counts"] == manifest.summary()
    assert doc["classes"] == manifest.classes
    n = len(manifest.rows)
    assert doc["image_sizes"] == {"96x96": n}  # the fixture's images are 96 px, 8-bit
    assert doc["bit_depths"] == {"8": n}
    assert doc["sources"]["available"] is False and doc["sources"]["reason"]
    assert runs.load_run(small_run).dataset == doc


def test_dataset_summary_duplicates_skips_depths_and_sources(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", per_class=8, classes=("COVID", "Normal"),
                        layout="database", size=48)
    covid = root / "COVID" / "images"
    shutil.copy(covid / "COVID-0.png", covid / "COVID-copy-a.png")  # one group of three
    shutil.copy(covid / "COVID-0.png", covid / "COVID-copy-b.png")
    shutil.copy(root / "Normal" / "images" / "Normal-1.png",
                root / "Normal" / "images" / "Normal-copy.png")  # a group of two
    wide = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(wide).save(covid / "COVID-16bit.png")  # 16-bit greyscale, 40x30
    (covid / "COVID-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (covid / "readme.txt").write_text("not an image")
    (root / "Extra").mkdir()  # a class folder without images/
    write_png(root / "Extra" / "x.png", np.zeros((8, 8), np.uint8))
    pd.DataFrame({"FILE NAME": [f"COVID-{i}" for i in range(8)],
                  "URL": ["https://a.example"] * 5 + ["https://b.example"] * 3}).to_excel(
        root / "COVID.metadata.xlsx", index=False)

    from core.metadata import source_report

    manifest = D.build_manifest(DataConfig(data_dir=str(root), near_dup_distance=0),
                                progress=False)
    doc = D.dataset_summary(manifest, sources=source_report(root, manifest.classes))
    assert doc["counts"] == manifest.summary()
    assert sum(sum(c.values()) for c in doc["counts"].values()) == len(manifest.rows) == 20
    dup = doc["duplicates"]
    assert dup == {"groups": 2, "images_in_groups": 5, "largest_group": 3, "examples": [
        ["COVID/images/COVID-0.png", "COVID/images/COVID-copy-a.png",
         "COVID/images/COVID-copy-b.png"],
        ["Normal/images/Normal-1.png", "Normal/images/Normal-copy.png"]]}
    skipped = {s["path"]: s["reason"] for s in doc["skipped"]}
    assert set(skipped) == {"COVID/images/COVID-broken.png", "COVID/images/readme.txt", "Extra/"}
    assert "images/" in skipped["Extra/"] and "not an image" in skipped["COVID/images/readme.txt"]
    assert doc["image_sizes"] == {"48x48": 19, "40x30": 1}
    assert doc["bit_depths"] == {"8": 19, "16": 1}
    assert doc["sources"] == {"available": True, "reason": None, "per_class": {
        "COVID": {"https://a.example": 5, "https://b.example": 3}}}


def test_dataset_cli_rebuilds_dataset_json_from_the_manifest(small_run: Path,
                                                             tmp_path: Path) -> None:
    run_dir = copy_run(small_run, tmp_path / "run")
    want = json.loads((run_dir / runs.DATASET_FILE).read_text())
    (run_dir / runs.DATASET_FILE).unlink()
    assert runs.main(["dataset", str(run_dir)]) == 0  # data dir from config.json
    assert json.loads((run_dir / runs.DATASET_FILE).read_text()) == want


# ---------------------------------------------------------------- the cached predictor's key


def test_predictor_files_lists_the_checkpoint_and_its_sidecars(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"w")
    (tmp_path / "best.int8.onnx").write_bytes(b"graph")
    (tmp_path / "serving.json").write_text("{}")
    (tmp_path / "history.json").write_text("[]")  # not read by the predictor
    (tmp_path / ".best.pt.abc.tmp").write_bytes(b"half-written")
    os.utime(ckpt, (1_000_000, 1_000_000))
    stamp = runs.predictor_files(ckpt)
    assert [Path(p).name for p, _ in stamp] == ["best.int8.onnx", "best.pt", "serving.json"]
    assert dict(stamp)[str(ckpt)] == 1_000_000
    os.utime(ckpt, (2_000_000, 2_000_000))  # a rewritten checkpoint gives another key
    assert dict(runs.predictor_files(ckpt))[str(ckpt)] == 2_000_000
    with pytest.raises(CheckpointError):
        runs.predictor_files(tmp_path / "none" / "best.pt")


def test_ui_reloads_the_predictor_when_its_checkpoint_changes(small_run: Path,
                                                              tmp_path: Path) -> None:
    from core import ui

    run_dir = copy_run(small_run, tmp_path / "run")
    ui.load_predictor.clear()
    run = runs.load_run(run_dir)
    first = ui.predictor_for(run)
    assert ui.predictor_for(run) is first  # cached
    mtime = (run_dir / "best.pt").stat().st_mtime + 10
    os.utime(run_dir / "best.pt", (mtime, mtime))
    assert ui.predictor_for(run) is not first
    ui.load_predictor.clear()
