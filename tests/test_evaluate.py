"""core.evaluate: calibration, operating point, the report, the occlusion probe, external sets.

Runs use small, quickly trained checkpoints: ``small_run`` on the real X-rays
(``../shared/data/cxr-real``, skipped where absent) and ``synthetic_run`` on generated images
(always available). ``small_run`` can later be swapped for the lead's ``trained_run``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core import calibration as C
from core import evaluate as E
from core import gradcam, metadata
from core import report as R
from core import scoring as S
from core.config import DataConfig, PreprocessConfig, to_dict
from core.data import CXRDataset, build_manifest, run_split_rows
from core.errors import CheckpointError, ConfigError, DatasetError
from core.model import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    build_model,
    load_checkpoint,
    model_from_checkpoint,
    preprocess_config_of,
    save_checkpoint,
)
from core.preprocess import build_transform
from core.sidecars import load_run_checkpoint
from tests.conftest import make_dataset, require_real

SCHEMA = json.loads(R.SCHEMA_PATH.read_text())


@dataclass(frozen=True)
class SmallRun:
    run_dir: Path
    data_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "best.pt"


def train_small_run(data_dir: Path, run_dir: Path, max_per_class: int, steps: int,
                    img_size: int = 64, seed: int = 0) -> SmallRun:
    """A resnet18 trained from scratch for a few steps, saved like core.train saves runs."""
    torch.manual_seed(seed)
    dcfg = DataConfig(data_dir=str(data_dir), max_per_class=max_per_class, seed=seed)
    manifest = build_manifest(dcfg, progress=False)
    manifest.save(run_dir / "manifest.csv")
    pcfg = PreprocessConfig(img_size=img_size)
    ds = CXRDataset(data_dir, manifest.split("train"), manifest.classes, build_transform(pcfg))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor(ds.targets)
    model = build_model(len(manifest.classes), weights="none", arch="resnet18", dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ys), (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": "resnet18",
        "dropout": 0.0, "classes": list(manifest.classes), "preprocess": to_dict(pcfg),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "train_config": {"steps": steps}, "data_config": to_dict(dcfg),
        "manifest_sha256": manifest.sha256(), "val_metrics": {}, "epoch": 1,
    }, run_dir / "best.pt")
    return SmallRun(run_dir, Path(data_dir))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads can be ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    """A small checkpoint on the real X-rays (40 per class, 64 px, 15 steps: ~10 s on one core)."""
    data = require_real()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_small_run(data, tmp_path_factory.mktemp("small_run"), 40, steps=15)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    """The same on generated images (class = blob position); runs on every machine."""
    base = tmp_path_factory.mktemp("synthetic")
    data = make_dataset(base / "ds", per_class=14, classes=("COVID", "Normal", "Viral Pneumonia"),
                        layout="database")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_small_run(data, base / "run", 0, steps=10, img_size=32)
    finally:
        torch.set_num_threads(threads)


def copy_run(run: SmallRun, dest: Path) -> SmallRun:
    shutil.copytree(run.run_dir, dest)
    return SmallRun(dest, run.data_dir)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the real-data test


def test_real_checkpoint_report(small_run: SmallRun, tmp_path: Path) -> None:
    """Evaluate a checkpoint trained on real X-rays: schema-valid report, probe and bootstrap run."""
    before = sha256(small_run.checkpoint)
    path = E.evaluate(small_run.checkpoint, small_run.data_dir, "test", tmp_path / "report",
                      n_resamples=200, progress=False)
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    assert sha256(small_run.checkpoint) == before, "evaluating the test split changed the checkpoint"
    assert doc["run"]["classes"] == ["COVID", "Normal", "Viral Pneumonia"]
    assert doc["n"] == sum(doc["class_counts"].values()) > 0
    acc = doc["at_argmax"]["overall"]["accuracy"]
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert doc["overall"]["accuracy"] == acc  # the headline copy
    assert doc["overall"]["macro_roc_auc"] == doc["threshold_free"]["macro_roc_auc"]
    sc = doc["shortcut"]
    assert set(sc["conditions"]) == {"full", "periphery", "centre"}
    assert sc["risk"] in ("high", "moderate", "low", "inconclusive") and sc["verdict"]
    assert sc["chance_accuracy"] == pytest.approx(max(doc["class_counts"].values()) / doc["n"])
    assert doc["calibration"]["fitted"] is False and doc["operating_point"] is None
    assert any(f["id"] == "uncalibrated" and "not calibrated" in f["text"] for f in doc["findings"])
    assert not doc["sources"]["available"]  # cxr-real ships no metadata spreadsheets
    lf = doc["lung_focus"]  # no masks in cxr-real: the shipped segmenter gives them
    assert lf["lung_view"] == doc["run"]["lung_view"] == "none"
    assert lf["mask_source"]["dataset"] == 0
    assert lf["mask_source"]["segmenter"] + lf["n_unscored"] == doc["n"]
    assert lf["n_unscored"] <= 0.05 * doc["n"]  # real X-rays: lungs found almost always
    assert set(lf["per_class"]) == set(doc["run"]["classes"])
    assert sum(c["n"] for c in lf["per_class"].values()) == lf["overall"]["n"]
    assert 0 < lf["overall"]["mean"] < 10
    lines = (tmp_path / "report" / "predictions.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["path", "true_class", "predicted_class",
                                       "predicted_class_at_operating_point"]
    assert len(lines) == doc["n"] + 1


def test_real_finalize_run(small_run: SmallRun, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path / "run")
    before = sha256(run.checkpoint)
    path = E.finalize_run(run.run_dir, str(run.data_dir), progress=False)
    assert path == run.run_dir / "report" / "metrics.json"
    assert sha256(run.checkpoint) == before  # the finish writes sidecars, not best.pt
    ckpt = load_run_checkpoint(run.checkpoint)
    assert isinstance(ckpt["temperature"], float) and ckpt["temperature"] > 0
    op = ckpt["operating_point"]
    assert set(op) == {"class", "threshold", "target_sensitivity", "achieved_val_sensitivity"}
    assert op["class"] == "COVID" and op["achieved_val_sensitivity"] >= op["target_sensitivity"]
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["calibration"]["fitted"] and doc["at_operating_point"] is not None
    assert doc["operating_point"]["threshold"] == pytest.approx(op["threshold"])
    assert doc["run"]["checkpoint_sha256"] == sha256(run.checkpoint) == before


# ---------------------------------------------------------------- synthetic runs (always run)


def test_finalize_and_operating_point_on_validation(synthetic_run: SmallRun, tmp_path: Path) -> None:
    run = copy_run(synthetic_run, tmp_path / "run")
    E.finalize_run(run.run_dir, str(run.data_dir), progress=False)
    ckpt = load_run_checkpoint(run.checkpoint)
    val = S.predict_split(run.checkpoint, run.data_dir, "val", progress=False)
    op = ckpt["operating_point"]
    j = val.classes.index(op["class"])
    p = val.proba(ckpt["temperature"])[:, j]
    sens = (p[val.y_true == j] >= op["threshold"]).mean()
    assert sens >= op["target_sensitivity"]
    assert sens == pytest.approx(op["achieved_val_sensitivity"])
    doc = json.loads((run.run_dir / "report" / "metrics.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["calibration"]["source"] == "checkpoint"


def test_cli_with_external_set_and_calibrate(synthetic_run: SmallRun, tmp_path: Path) -> None:
    run = copy_run(synthetic_run, tmp_path / "run")
    ext = tmp_path / "ext"  # plain layout, other class names, one extra class to drop
    names = {"COVID": "covid", "Normal": "normal", "Viral Pneumonia": "pneumonia_viral"}
    for cls, new in names.items():
        imgs = sorted((run.data_dir / cls / "images").glob("*.png"))[:3]
        (ext / new).mkdir(parents=True)
        for f in imgs:
            shutil.copy(f, ext / new / f.name)
    make_dataset(tmp_path / "extra", per_class=2, classes=("Lung_Opacity",))
    shutil.copytree(tmp_path / "extra" / "Lung_Opacity", ext / "Lung_Opacity")
    out = tmp_path / "report"
    rc = E.main(["--checkpoint", str(run.checkpoint), "--data-dir", str(run.data_dir),
                 "--external-dir", str(ext), "--class-map",
                 "pneumonia_viral=Viral Pneumonia,Lung_Opacity=", "--bootstrap", "50",
                 "--prevalence", "COVID=0.05", "--calibrate", "--output", str(out), "--no-occlusion",
                 "--no-progress", "--log-level", "WARNING"])
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    ex = doc["external"]
    assert ex["n"] == 9 and ex["class_map"]["Lung_Opacity"] is None
    assert ex["overlap_with_manifest"] == 9  # copied from the run's own dataset
    assert any(f["id"] == "external-overlap" and f["severity"] == "high"
               and "not independent" in f["text"] for f in doc["findings"])
    assert set(ex["drop"]) == {"accuracy", "macro_f1", "macro_roc_auc", "per_class_roc_auc"}
    covid = doc["at_argmax"]["per_class"]["COVID"]
    assert covid["prevalence"] == 0.05 and "ppv_at_prevalence" in covid
    assert "ppv_at_prevalence" not in doc["at_argmax"]["per_class"]["Normal"]
    assert doc["calibration"]["source"] == "refit"
    assert "temperature" not in load_checkpoint(run.checkpoint)  # best.pt is not modified
    assert load_run_checkpoint(run.checkpoint)["temperature"] == doc["calibration"]["temperature"]
    assert load_run_checkpoint(run.checkpoint)["ood"] is not None  # refitted after calibration
    assert (out / "predictions_external.csv").is_file() and doc["shortcut"] is None


def test_lung_focus_per_class_from_dataset_masks(synthetic_run: SmallRun, tmp_path: Path) -> None:
    """With ``<Class>/masks/`` present the report scores Grad-CAM against them: here every
    mask is the image's left half, so each image's ratio is its map's left-half energy share
    over 0.5, recomputed by hand from core.gradcam.explain."""
    data = tmp_path / "ds"
    shutil.copytree(synthetic_run.data_dir, data)
    # 64 px, so that layer4 is 2x2 (at 32 px its 1x1 map carries no location)
    run = train_small_run(data, tmp_path / "run", 0, steps=10, img_size=64)
    for img in data.glob("*/images/*.png"):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, :32] = 255
        (img.parent.parent / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(img.parent.parent / "masks" / img.name)
    path = E.evaluate(run.checkpoint, data, "test", tmp_path / "report",
                      n_resamples=0, occlusion=False, progress=False)
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    lf = doc["lung_focus"]
    assert lf["mask_source"] == {"dataset": doc["n"], "segmenter": 0} and lf["n_unscored"] == 0

    ckpt = load_checkpoint(run.checkpoint)
    rows = run_split_rows(run.run_dir, data, ckpt, ("test",))[0]["test"]
    ds = S.evaluation_dataset(data, rows, ckpt["classes"], preprocess_config_of(ckpt))
    model = model_from_checkpoint(ckpt).eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    heat = gradcam.explain(model, x, "gradcam")  # predicted class, model-input resolution
    ratio = heat[:, :, :32].sum(axis=(1, 2)) / heat.sum(axis=(1, 2)) / 0.5
    for k, cls in enumerate(ckpt["classes"]):
        want = ratio[np.asarray(ds.targets) == k]
        assert lf["per_class"][cls]["n"] == len(want)
        assert lf["per_class"][cls]["mean"] == pytest.approx(want.mean(), abs=1e-5)
    assert lf["overall"]["mean"] == pytest.approx(ratio.mean(), abs=1e-5)


def test_low_lung_focus_becomes_a_finding() -> None:
    doc = {"calibration": {"fitted": True}, "operating_point": None, "run": {"warnings": []},
           "lung_focus": {"overall": {"n": 50, "mean": 0.8}}}
    found = [f for f in R.findings(doc) if f["id"] == "low-lung-focus"]
    assert len(found) == 1 and "mostly outside the lungs" in found[0]["text"]
    assert found[0]["severity"] == "medium"
    doc["lung_focus"]["overall"]["mean"] = 1.3
    assert not any("outside the lungs" in f["text"] for f in R.findings(doc))


def test_cli_errors_are_reported_not_raised(synthetic_run: SmallRun, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    rc = E.main(["--checkpoint", str(synthetic_run.checkpoint), "--data-dir",
                 str(tmp_path / "nowhere"), "--no-progress"])
    assert rc == 2 and "missing under" in caplog.text
    rc = E.main(["--checkpoint", str(tmp_path / "none.pt"), "--no-progress"])
    assert rc == 2


def test_missing_manifest_and_unknown_classes(synthetic_run: SmallRun, tmp_path: Path) -> None:
    ckpt_path = tmp_path / "lonely" / "best.pt"
    ckpt_path.parent.mkdir()
    shutil.copy(synthetic_run.checkpoint, ckpt_path)
    with pytest.raises(CheckpointError, match="manifest"):
        E.evaluate(ckpt_path, synthetic_run.data_dir, progress=False)
    with pytest.raises(DatasetError, match="--class-map"):
        E.map_external_classes(["Cat"], ["COVID", "Normal"])
    with pytest.raises(ConfigError):
        E.map_external_classes(["Cat"], ["COVID", "Normal"], {"Cat": "Dog"})


def test_help_lists_argument_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        E.main(["--help"])
    text = capsys.readouterr().out
    for word in ("external validation", "calibration", "--bootstrap", "--prevalence"):
        assert word in text


# ---------------------------------------------------------------- pieces


def test_occlusion_boxes() -> None:
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    rows, cols = S.central_box(10, 10)
    assert (rows, cols) == (slice(1, 8), slice(1, 8))
    mean = x.mean(dim=(-2, -1), keepdim=True)
    peri = S.occlude(x, "periphery")
    centre = S.occlude(x, "centre")
    assert torch.equal(peri[..., 0, :], x[..., 0, :])  # periphery kept
    assert torch.allclose(peri[..., rows, cols], mean.expand_as(x)[..., rows, cols])
    assert torch.equal(centre[..., rows, cols], x[..., rows, cols])  # centre kept
    assert torch.allclose(centre[..., 0, :], mean.expand_as(x)[..., 0, :])
    assert torch.equal(S.occlude(x, "centre") + 0, centre) and x[0, 0, 0, 0] == 0  # input intact
    with pytest.raises(ValueError):
        S.occlude(x, "lungs")


def _preds(y: np.ndarray, logits: np.ndarray, probes: dict | None = None) -> S.Predictions:
    return S.Predictions([f"{i}.png" for i in range(len(y))], y, logits,
                         ["COVID", "Normal", "Viral Pneumonia"], probes or {})


def test_shortcut_verdict_flags_a_periphery_reader() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 100)
    good = 4.0 * np.eye(3)[y] + rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 3))
    shortcut = R.score_predictions(_preds(y, good, {"periphery": good, "centre": noise}),
                                   n_resamples=200)["shortcut"]
    assert shortcut["risk"] == "high" and "SHORTCUT LIKELY" in shortcut["verdict"]
    honest = R.score_predictions(_preds(y, good, {"periphery": noise, "centre": good}),
                                 n_resamples=200)["shortcut"]
    assert honest["risk"] == "low"
    clueless = R.score_predictions(_preds(y, noise, {"periphery": noise, "centre": noise}),
                                   n_resamples=200)["shortcut"]
    assert clueless["risk"] == "inconclusive"


def test_fit_calibration_reaches_target_and_cools_overconfidence() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    logits = 5.0 * (1.5 * np.eye(3)[y] + rng.normal(size=(600, 3)))  # over-confident
    t, op = C.fit_calibration(_preds(y, logits), "covid", 0.9)
    assert t > 2.0
    assert op["class"] == "COVID" and op["achieved_val_sensitivity"] >= 0.9
    with pytest.raises(ConfigError):
        C.fit_calibration(_preds(y, logits), "Cat")
    no_covid = _preds(np.ones(10, int), rng.normal(size=(10, 3)))
    assert C.fit_calibration(no_covid)[1] is None


def test_parsers() -> None:
    classes = ["COVID", "Normal"]
    assert E.parse_prevalence("0.1", classes) == {"COVID": 0.1, "Normal": 0.1}
    assert E.parse_prevalence("COVID=0.02", classes) == {"COVID": 0.02}
    assert E.parse_prevalence(None, classes) is None
    for bad in ("Cat=0.1", "1.5", "COVID"):
        with pytest.raises(ConfigError):
            E.parse_prevalence(bad, classes)
    assert E.parse_class_map("a=b, c=") == {"a": "b", "c": ""}
    with pytest.raises(ConfigError):
        E.parse_class_map("a")
    assert E.map_external_classes(["covid", "NORMAL"], classes) == {"covid": "COVID",
                                                                    "NORMAL": "Normal"}
    assert E.map_external_classes(["viral_pneumonia"], ["Viral Pneumonia"]) == {
        "viral_pneumonia": "Viral Pneumonia"}


def test_source_report_from_metadata_xlsx(tmp_path: Path) -> None:
    root = tmp_path / "db"
    root.mkdir()
    pd.DataFrame({"FILE NAME": ["COVID-1", "COVID-2", "COVID-3"], "FORMAT": "PNG",
                  "SIZE": "256*256", "URL": ["https://a.org", "https://a.org", "https://b.org"]}
                 ).to_excel(root / "COVID.metadata.xlsx", index=False)
    pd.DataFrame({"FILE NAME": ["Normal-1", "Normal-2"], "FORMAT": "PNG", "SIZE": "256*256",
                  "URL": ["https://rsna.org"] * 2}).to_excel(root / "Normal.metadata.xlsx",
                                                             index=False)
    y = np.array([0, 0, 1])
    preds = S.Predictions(["COVID/images/COVID-1.png", "COVID/images/COVID-3.png",
                           "Normal/images/Normal-2.png"], y, np.eye(2)[[0, 1, 1]],
                          ["COVID", "Normal"])
    rep = metadata.source_report(root, ["COVID", "Normal"], preds)
    assert rep["available"] and rep["confounded"]
    assert rep["per_class"]["COVID"]["sources"] == [{"source": "https://a.org", "count": 2},
                                                    {"source": "https://b.org", "count": 1}]
    by = {r["source"]: r for r in rep["evaluated_by_source"]}
    assert by["https://a.org"]["accuracy"] == 1.0 and by["https://b.org"]["accuracy"] == 0.0
    assert not metadata.source_report(tmp_path, ["COVID"])["available"]
    (root / "Broken.metadata.xlsx").write_text("not a spreadsheet")
    broken = metadata.source_report(root, ["Broken"])
    assert not broken["available"] and "cannot read" in broken["reason"]


# ---------------------------------------------------------------- per-image records


def test_records_agree_with_the_report_and_the_predictor(synthetic_run: SmallRun,
                                                         tmp_path: Path) -> None:
    """finalize_run fits the OOD and low-confidence cut-offs before the test report, so
    each record carries its OOD score (as the predictor computes it) and both flags under
    the checkpoint's cut-offs; the records reproduce the report's figures."""
    from core import ood
    from core.inference import Predictor

    run = copy_run(synthetic_run, tmp_path / "run")
    E.finalize_run(run.run_dir, str(run.data_dir), progress=False)
    doc = json.loads((run.run_dir / "report" / "metrics.json").read_text())
    rec = pd.read_csv(run.run_dir / "report" / "predictions.csv")
    ckpt = load_run_checkpoint(run.checkpoint)
    classes = doc["run"]["classes"]
    assert len(rec) == doc["n"]
    assert (rec["correct"] == (rec["predicted_class"] == rec["true_class"])).all()

    # at the operating point, the records' confusion counts are the report's
    cm = pd.crosstab(rec["true_class"], rec["predicted_class_at_operating_point"]).reindex(
        index=classes, columns=classes, fill_value=0)
    assert cm.to_numpy().tolist() == doc["at_operating_point"]["confusion_matrix"]["counts"]
    cm = pd.crosstab(rec["true_class"], rec["predicted_class"]).reindex(
        index=classes, columns=classes, fill_value=0)
    assert cm.to_numpy().tolist() == doc["at_argmax"]["confusion_matrix"]["counts"]

    # the probe's predictions give the report's probe accuracies
    for probe in S.PROBES:
        acc = (rec[f"{probe}_pred"] == rec["true_class"]).mean()
        assert acc == pytest.approx(doc["shortcut"]["conditions"][probe]["accuracy"]["value"],
                                    abs=1e-6)  # the report keeps 6 decimals
    scored = rec["lung_focus"].dropna()
    assert len(scored) == doc["lung_focus"]["overall"]["n"]
    if len(scored):
        assert scored.mean() == pytest.approx(doc["lung_focus"]["overall"]["mean"], abs=1e-5)

    # OOD: the flag is the score above the checkpoint's cut-off, and the score is the
    # predictor's for the same file (the fp32 network, an independent code path)
    assert (rec["ood"] == (rec["ood_score"] > ckpt["ood"]["threshold"])).all()
    predictor = Predictor(ckpt, device="cpu", runtime="torch", precision="fp32")
    for _, row in rec.head(6).iterrows():
        got = predictor.predict(run.data_dir / row["path"])
        assert got.ood_score == pytest.approx(row["ood_score"], rel=1e-4)
        assert got.label == row["predicted_class"]
        assert got.decision == row["predicted_class_at_operating_point"]
    # low confidence: the top calibrated probability below the checkpoint's cut-off
    # (rows within the CSV's rounding of the cut-off are not decidable from it)
    top = rec[[f"prob_{c}" for c in classes]].max(axis=1)
    thr = ckpt["low_confidence"]["threshold"]
    clear = (top - thr).abs() > 2e-6
    assert clear.sum() >= len(rec) // 2
    assert (rec.loc[clear, "low_confidence"] == (top[clear] < thr)).all()
    assert ood.image_flags({}, None, np.ones((2, 3)) / 3) == {
        "ood_score": None, "ood": None, "low_confidence": None}


def test_records_without_ood_statistics_leave_those_columns_empty(synthetic_run: SmallRun,
                                                                  tmp_path: Path) -> None:
    assert "ood" not in load_checkpoint(synthetic_run.checkpoint)
    E.evaluate(synthetic_run.checkpoint, synthetic_run.data_dir, "test", tmp_path / "report",
               n_resamples=0, occlusion=False, lung_focus=False, progress=False)
    rec = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert list(rec.columns[-7:]) == ["correct", "periphery_pred", "centre_pred", "lung_focus",
                                      "ood_score", "ood", "low_confidence"]
    for col in ("periphery_pred", "centre_pred", "lung_focus", "ood_score", "ood",
                "low_confidence"):
        assert rec[col].isna().all(), col
    assert rec["correct"].dtype == bool


def test_findings_ids_and_severities() -> None:
    base = {"calibration": {"fitted": False}, "operating_point": None,
            "run": {"warnings": ["manifest differs"]},
            "shortcut": {"risk": "high", "verdict": "SHORTCUT LIKELY."},
            "sources": {"confounded": True},
            "external": {"n": 40, "overlap_with_manifest": 0, "drop": {"macro_roc_auc": {
                "internal": 0.95, "external": 0.80, "drop": 0.15}}}}
    got = {f["id"]: f for f in R.findings(base)}
    assert list(got) == ["shortcut-risk", "external-drop", "confounded-sources", "uncalibrated",
                         "no-operating-point", "run-warning-1"]
    assert {k: f["severity"] for k, f in got.items()} == {
        "shortcut-risk": "high", "external-drop": "high", "confounded-sources": "high",
        "uncalibrated": "medium", "no-operating-point": "low", "run-warning-1": "medium"}
    assert got["shortcut-risk"]["text"] == "SHORTCUT LIKELY."
    assert got["run-warning-1"]["text"] == "manifest differs"
    base["shortcut"] = {"risk": "inconclusive", "verdict": "not above chance"}
    base["external"]["drop"]["macro_roc_auc"]["drop"] = -0.01
    got = {f["id"]: f["severity"] for f in R.findings(base)}
    assert got["near-chance"] == "high" and got["external-drop"] == "info"
    for f in R.findings(base):
        jsonschema.validate([f], SCHEMA["properties"]["findings"])
