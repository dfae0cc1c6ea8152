"""Clinical Predictions, Explainability and Data Explorer: their ``core`` helpers
(core.preview, core.clinical, core.explore, core.gallery) without Streamlit, and the pages
driven headlessly with AppTest on the ``small_run`` fixture."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import tomllib
from PIL import Image
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import app_test

from core import clinical, explore, gallery, gradcam, lungs, preprocess, preview
from core.config import PreprocessConfig
from core.errors import InvalidImageError
from core.imaging import MAX_FILE_BYTES
from core.ui import DISCLAIMER
from tests.conftest import REAL_DIR, ROOT, SMALL_CLASSES, blob_image
from tests.test_app import run_page
from tests.test_imaging import make_dicom

PATIENT = {"PatientName": "DOE^JANE", "PatientID": "P-12345", "PatientBirthDate": "19700101"}
PATIENT_TEXTS = ("DOE", "JANE", "P-12345", "19700101")


# ----------------------------------------------------------------------------- helpers


def xray_bytes() -> tuple[str, bytes]:
    """A real X-ray (PNG) when the shared set is here, else a synthetic PNG."""
    real = sorted((REAL_DIR / "COVID" / "images").glob("*.png"))[:1] if REAL_DIR.is_dir() else []
    if real:
        return real[0].name, real[0].read_bytes()
    buf = io.BytesIO()
    Image.fromarray(blob_image(np.random.default_rng(1), 0, 256)).save(buf, format="PNG")
    return "synthetic.png", buf.getvalue()


def dicom_bytes() -> bytes:
    """A 12-bit DX DICOM (PA view) carrying the fake patient fields of :data:`PATIENT`."""
    rng = np.random.default_rng(2)
    pixels = (blob_image(rng, 1, 256).astype(np.uint16) * 16)
    return make_dicom(pixels, ViewPosition="PA", BitsStored=12, HighBit=11, **PATIENT)


def texts(at: app_test.AppTest) -> str:
    """Everything rendered (every element's protobuf, as text) plus the session's values."""
    parts = []
    for node in at._tree:
        proto = getattr(node, "proto", None)
        if proto is not None:
            parts.append(str(proto))
    for key, value in at.session_state.items():
        parts.append(f"{key}={value!r}")
    return "\n".join(parts)


def plotly_specs(at: app_test.AppTest) -> list[dict]:
    return [json.loads(node.proto.spec) for node in at.get("plotly_chart")]


def values(v: list | dict) -> list:
    """A Plotly trace's data array: a list, or Plotly's base64 typed array."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def files_under(*roots: Path) -> set[Path]:
    return {p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()}


@pytest.fixture
def media(monkeypatch: pytest.MonkeyPatch) -> list[MemoryMediaFileStorage]:
    """The media storages AppTest creates (one per run): download buttons' content."""
    made: list[MemoryMediaFileStorage] = []

    class Recording(MemoryMediaFileStorage):
        def __init__(self, endpoint: str) -> None:
            super().__init__(endpoint)
            made.append(self)

    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Recording)
    return made


def downloaded(media: list[MemoryMediaFileStorage], url: str) -> tuple[str | None, bytes]:
    """(file name, content) of a download button's file."""
    file = media[-1].get_file(url.rsplit("/", 1)[-1])
    return file.filename, file.content


def copy_run(run: Path, dest: Path, data_dir: str) -> Path:
    """A copy of ``run`` (checkpoint linked) whose config names another data folder."""
    out = dest / run.name
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("*.pt"))
    (out / "best.pt").symlink_to(run / "best.pt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["data"]["data_dir"] = data_dir
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("dataset.json", "run.json"):
        if (out / name).is_file():
            doc = json.loads((out / name).read_text())
            if "data_dir" in doc:
                doc["data_dir"] = data_dir
                (out / name).write_text(json.dumps(doc))
    report = out / "report" / "metrics.json"
    doc = json.loads(report.read_text())
    doc["run"]["data_dir"] = data_dir
    report.write_text(json.dumps(doc))
    return out


# ------------------------------------------------------------------- core.preview


def test_preprocessing_steps_use_the_contract() -> None:
    rng = np.random.default_rng(0)
    gray = rng.random((90, 120)).astype(np.float32)
    cfg = PreprocessConfig(img_size=64)
    yy, xx = np.mgrid[:90, :120]
    mask = ((yy - 45) ** 2 / 30**2 + (xx - 35) ** 2 / 20**2 < 1) | (
        (yy - 45) ** 2 / 30**2 + (xx - 85) ** 2 / 20**2 < 1)
    steps = preview.preprocessing_steps(gray, cfg, lung_mask=mask)
    assert [s.name for s in steps] == ["Original", "Letterbox", "CLAHE", "Lung field"]
    assert np.array_equal(steps[0].image, preprocess.to_uint8(gray))
    # letterbox by hand: 120 x 90 -> 64 x 48, padded 8 rows above and below
    small = cv2.resize(gray, (64, 48), interpolation=cv2.INTER_AREA)
    assert steps[1].image.shape == (64, 64)
    assert not steps[1].image[:8].any() and not steps[1].image[56:].any()
    assert np.array_equal(steps[1].image[8:56], preprocess.to_uint8(small))
    assert np.array_equal(steps[2].image, preprocess.prepare(gray, cfg))
    assert np.array_equal(steps[2].image, cv2.createCLAHE(2.0, (8, 8)).apply(steps[1].image))
    outlined = steps[3].image
    assert outlined.shape == (64, 64, 3)
    green = (outlined[..., 1] == 255) & (outlined[..., 0] == 0)
    assert green.any()  # the outline is drawn, and only near the lung field
    inside = preprocess.mask_to_input(mask, cfg)
    near = cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert not (green & ~near).any()


def test_preprocessing_steps_with_a_lung_crop_show_the_view() -> None:
    gray = np.random.default_rng(1).random((100, 100)).astype(np.float32)
    mask = np.zeros((100, 100), bool)
    mask[20:80, 10:90] = True
    cfg = PreprocessConfig(img_size=32, lung_view="crop", clahe=False)
    steps = preview.preprocessing_steps(gray, cfg, lung_mask=mask)
    assert [s.name for s in steps] == ["Original", "Lung view", "Letterbox"]
    view = lungs.apply_lung_view(gray, cfg, mask=mask)
    assert np.array_equal(steps[1].image, preprocess.to_uint8(view.image))
    assert np.array_equal(steps[2].image, preprocess.prepare(gray, cfg, lung_mask=mask))
    assert "model input" in steps[2].caption


def test_display_contrast() -> None:
    img = np.tile(np.arange(100, 200, dtype=np.uint8), (10, 1))
    assert np.array_equal(preview.display_contrast(img), img)
    stretched = preview.display_contrast(img, "Auto-stretch")
    lo, hi = np.percentile(img, (1, 99))
    assert stretched.min() == 0 and stretched.max() == 255
    assert stretched[0, 50] == round((150 - lo) / (hi - lo) * 255)
    equalised = preview.display_contrast(img, "Local equalisation")
    assert np.array_equal(equalised, preprocess.clahe(img))
    with pytest.raises(ValueError, match="not one of"):
        preview.display_contrast(img, "sepia")


# ------------------------------------------------------------------- core.clinical


def test_dicom_header_reads_only_safe_fields() -> None:
    header = clinical.dicom_header(dicom_bytes())
    assert header == {"Modality": "DX", "View position": "PA"}
    assert clinical.dicom_header(b"not a dicom") == {}


def test_content_key_is_the_bytes_hash_not_the_name() -> None:
    assert clinical.content_key(b"abc") == clinical.content_key(b"abc")
    assert clinical.content_key(b"abc") != clinical.content_key(b"abd")


def test_results_table_rows() -> None:
    pred = SimpleNamespace(label="A", decision="B", probabilities={"A": 0.6, "B": 0.4},
                           low_confidence=False, ood=True)
    ok = clinical.Analysis("x.png", "k", pred, np.zeros((2, 2), np.uint8),
                           np.zeros((2, 2), np.float32), None, 1.23456, {}, (), 0.1)
    nan = dataclasses.replace(ok, name="y.png", lung_focus=math.nan)
    table = clinical.results_table([("x.png", ok), ("bad.png", InvalidImageError("Damaged.")),
                                    ("y.png", nan)], ["A", "B"])
    assert list(table.columns) == ["file", "predicted_class", "decision", "prob_A", "prob_B",
                                   "low_confidence", "ood", "lung_focus", "error"]
    assert table.iloc[0].to_dict() == {"file": "x.png", "predicted_class": "A", "decision": "B",
                                       "prob_A": 0.6, "prob_B": 0.4, "low_confidence": False,
                                       "ood": True, "lung_focus": 1.2346, "error": ""}
    assert table.iloc[1]["error"] == "Damaged." and pd.isna(table.iloc[1]["predicted_class"])
    assert pd.isna(table.iloc[2]["lung_focus"])
    back = pd.read_csv(io.BytesIO(clinical.results_csv(table)))
    assert back["file"].tolist() == ["x.png", "bad.png", "y.png"]


def test_analyse_equals_predict_and_reblends_without_the_network(small_run: Path) -> None:
    from core.inference import Predictor

    predictor = Predictor.from_checkpoint(small_run / "best.pt")
    name, data = xray_bytes()
    result = clinical.analyse(predictor, name, data)
    direct = predictor.predict(data, name=name)
    assert result.prediction.label == direct.label
    assert result.prediction.probabilities == direct.probabilities
    assert result.key == clinical.content_key(data)
    assert max(result.gray.shape) <= clinical.DISPLAY_MAX_SIDE
    assert result.heatmap.shape == result.gray.shape
    over = clinical.overlay_image(result, 0.7)
    assert np.array_equal(over, gradcam.overlay(result.gray, result.heatmap, alpha=0.7))
    with pytest.raises(InvalidImageError):
        clinical.analyse(predictor, "bad.png", b"\x89PNG broken")


# ------------------------------------------------------------------- core.gallery


def test_records_and_filters_follow_pandas() -> None:
    raw = pd.DataFrame({
        "path": [f"{c}/images/{i}.png" for i, c in enumerate("AABBC")],
        "true_class": list("AABBC"), "predicted_class": list("ABBAC"),
        "lung_focus": [0.5, 1.5, float("nan"), 0.9, 2.0],
        "ood": ["True", "False", "", "False", "True"]})
    df = gallery.records(raw)
    assert df["correct"].tolist() == [True, False, True, False, True]
    assert gallery.available_filters(df) == {"low_focus": True, "ood": True}
    assert len(gallery.filter_records(df, true_class="A")) == 2
    p = raw["path"].tolist()
    assert gallery.filter_records(df, outcome="Wrong")["path"].tolist() == [p[1], p[3]]
    assert gallery.filter_records(df, low_focus_only=True)["path"].tolist() == [p[0], p[3]]
    assert gallery.filter_records(df, ood_only=True)["path"].tolist() == [raw.path[0], raw.path[4]]
    assert gallery.filter_records(df, predicted_class="B", outcome="Correct")["path"].tolist() == [
        raw.path[2]]
    old = gallery.records(raw.drop(columns=["lung_focus", "ood"]))
    assert gallery.available_filters(old) == {"low_focus": False, "ood": False}


# ------------------------------------------------------------------- core.explore


def test_dataset_record_counts_and_sources_without_dataset_json(tmp_path: Path) -> None:
    rows = pd.DataFrame({
        "path": ["A/1.png", "A/2.png", "A/3.png", "B/1.png", "B/2.png", "B/3.png"],
        "class": list("AAABBB"), "split": ["train", "train", "test", "train", "val", "test"],
        "sha1": list("abcdef"), "phash": list("abcdef"), "dup_group": [0, 0, 1, 2, 3, 3]})
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    run = SimpleNamespace(path=tmp_path, dataset=None, data_dir=str(tmp_path / "gone"),
                          report={"sources": {"available": True, "reason": None, "per_class": {
                              "A": {"n_listed": 3, "sources": [{"source": "x", "count": 3}]},
                              "B": {"n_listed": 3, "sources": [{"source": "y", "count": 3}]}}}})
    record = explore.dataset_record(run)
    counts = explore.class_counts(record, ["A", "B"])
    assert counts.to_dict("records") == [
        {"split": "train", "class": "A", "n": 2}, {"split": "train", "class": "B", "n": 1},
        {"split": "val", "class": "A", "n": 0}, {"split": "val", "class": "B", "n": 1},
        {"split": "test", "class": "A", "n": 1}, {"split": "test", "class": "B", "n": 1}]
    assert record["duplicates"] == {"groups": 2, "images_in_groups": 4, "largest_group": 2,
                                    "examples": [["A/1.png", "A/2.png"], ["B/2.png", "B/3.png"]]}
    assert record["image_sizes"] == {}  # the images are not on this machine
    src = explore.sources(record)
    assert src["per_class"] == {"A": {"x": 3}, "B": {"y": 3}} and src["confounded"]
    run.dataset = {"counts": {"train": {"A": 5}, "test": {"B": 2}},
                   "sources": {"available": True, "reason": None,
                               "per_class": {"A": {"x": 2, "z": 1}, "B": {"z": 4}}}}
    record = explore.dataset_record(run)
    assert explore.class_counts(record, ["A", "B"])["n"].tolist() == [5, 0, 0, 2]
    assert not explore.sources(record)["confounded"]  # source z feeds both classes
    assert explore.sources_frame(explore.sources(record)["per_class"])["n"].sum() == 7
    assert explore.sources({})["available"] is False
    assert explore.dataset_record(SimpleNamespace(path=tmp_path / "none", dataset=None,
                                                  data_dir=None, report=None)) is None


def test_histograms_sizes_and_samples(tmp_path: Path) -> None:
    a = np.zeros((70, 80), np.uint8)
    a[:, :40] = 255
    b = np.full((64, 90), 128, np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    hist = explore.intensity_histograms(tmp_path, {"A": ["a.png"], "B": ["b.png"]}, bins=4)
    share = hist.pivot(index="intensity", columns="class", values="share")
    assert share["A"].tolist() == [0.5, 0.0, 0.0, 0.5]  # half black, half white
    assert share["B"].tolist() == [0.0, 0.0, 1.0, 0.0]  # 128/255 = 0.502 -> third bin
    sizes = explore.image_sizes(tmp_path, {"A": ["a.png"], "B": ["b.png", "b.png"]}, None)
    assert sizes.to_dict("records") == [{"size": "90x64", "class": "B", "n": 2},
                                        {"size": "80x70", "class": "A", "n": 1}]
    recorded = explore.image_sizes(None, None, {"image_sizes": {"10x10": 3, "20x20": 9}})
    assert recorded["n"].tolist() == [9, 3] and set(recorded["class"]) == {"all"}
    assert explore.thumbnail(tmp_path / "b.png", 45).shape == (32, 45)
    manifest = pd.DataFrame({"path": [f"{c}{i}" for c in "AB" for i in range(6)],
                             "class": [c for c in "AB" for _ in range(6)]})
    picked = explore.sample_paths(manifest, per_class=4, seed=3)
    assert picked == explore.sample_paths(manifest, per_class=4, seed=3)
    assert [len(v) for v in picked.values()] == [4, 4]
    assert all(p.startswith(c) for c, ps in picked.items() for p in ps)
    assert not explore.images_available(tmp_path / "nowhere", ["a.png"])
    assert explore.images_available(tmp_path, ["a.png", "b.png"])


def test_upload_limit_matches_the_decoder() -> None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 1024 * 1024 == MAX_FILE_BYTES


# ------------------------------------------------------------------- pages


@pytest.mark.parametrize("page", ("pages/clinical_predictions.py", "pages/explainability.py",
                                  "pages/data_explorer.py"))
def test_pages_show_the_disclaimer_first(page: str, small_models: Path) -> None:
    at = run_page(page, timeout=180)
    assert not at.exception
    assert at.title[0].value and DISCLAIMER in at.warning[0].value


def test_clinical_predictions_uploads(small_models: Path, media: list, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from core.inference import Predictor

    # Writes anywhere a library would put them (tempfile, the working directory) or in the
    # repository and the run folder would show up as new files.
    scratch, cwd = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    watched = (scratch, cwd, ROOT, small_models, REAL_DIR)

    name, png = xray_bytes()
    dcm = dicom_bytes()
    at = run_page("pages/clinical_predictions.py", timeout=180)
    uploader = at.get("file_uploader")[0]
    assert uploader.label == "Upload chest X-rays" and uploader.accept_multiple_files
    assert set(uploader.allowed_type) >= {".png", ".jpg", ".tif", ".bmp", ".dcm"}
    before = files_under(*watched)
    uploader.set_value([(name, png, "image/png"), ("study.dcm", dcm, "application/dicom"),
                        ("corrupt.png", b"\x89PNG\r\n\x1a\n broken", "image/png")])
    at.run()
    assert not at.exception
    assert files_under(*watched) == before

    # each invalid file its own error; the others processed
    assert [e.value.split(":")[0] for e in at.error] == ["corrupt.png"]
    assert [h.value for h in at.subheader][:2] == [name, "study.dcm"]
    predictor = Predictor.from_checkpoint(small_models / "best.pt")
    expected = [predictor.predict(png, name=name), predictor.predict(dcm, name="study.dcm")]
    shown = [m.value for m in at.markdown if "Predicted class: " in m.value]
    assert shown == [f"#### Predicted class: {p.label}" for p in expected]
    bars = [s["data"][0] for s in plotly_specs(at)]
    for bar, p in zip(bars, expected, strict=True):
        assert bar["x"] == pytest.approx([p.probabilities[c] for c in p.classes], abs=1e-12)
    captions = [c for img in at.get("image") for c in img.captions]
    assert captions == ["Original", "Grad-CAM overlay"] * 2
    assert [s.label for s in at.slider] == ["Heatmap opacity"] * 2

    # DICOM: safe fields shown, no patient field anywhere (page or session)
    dicom_text = " ".join(m.value for m in at.markdown if m.value.startswith("**DICOM**"))
    assert "Modality: DX" in dicom_text and "View position: PA" in dicom_text
    assert "Bit depth: 12-bit" in dicom_text
    everything = texts(at)
    assert not [t for t in PATIENT_TEXTS if t in everything]

    # the CSV download: one row per file
    button = at.download_button[0]
    assert button.label == "Download results (CSV)"
    file_name, content = downloaded(media, button.proto.url)
    assert file_name == "cxr-predictions.csv"
    table = pd.read_csv(io.BytesIO(content))
    assert table["file"].tolist() == [name, "study.dcm", "corrupt.png"]
    assert table["predicted_class"].tolist()[:2] == [p.label for p in expected]
    assert table["decision"].tolist()[:2] == [p.decision for p in expected]
    for c in predictor.classes:
        assert table[f"prob_{c}"][:2].tolist() == pytest.approx(
            [p.probabilities[c] for p in expected], abs=1e-6)
    assert table["ood"][:2].tolist() == [p.ood for p in expected]
    assert table["error"].fillna("").tolist()[:2] == ["", ""]
    assert table["error"][2].startswith("The file") or "damaged" in table["error"][2]

    # moving a slider or the display contrast re-blends: no new analysis, same predictions
    cache = at.session_state["_use_analyses"]
    ids = {k: id(v) for k, v in cache.items()}
    urls = [img.value for img in at.get("image")]
    at.slider[0].set_value(0.9)
    at.radio[0].set_value("Auto-stretch")
    at.run()
    assert not at.exception
    assert {k: id(v) for k, v in at.session_state["_use_analyses"].items()} == ids
    new_urls = [img.value for img in at.get("image")]
    assert new_urls[1] != urls[1] and new_urls[0] != urls[0]  # overlay and contrast changed
    assert [m.value for m in at.markdown if "Predicted class: " in m.value] == shown
    assert files_under(*watched) == before

    # the same bytes under other names are recognised by content (analysed once, shown twice)
    at.get("file_uploader")[0].set_value([("renamed.png", png, "image/png"),
                                          ("renamed.png", png, "image/png")])
    at.run()
    assert not at.exception
    assert [h.value for h in at.subheader][:2] == ["renamed.png", "renamed.png"]
    assert {k: id(v) for k, v in at.session_state["_use_analyses"].items()} == {
        k: v for k, v in ids.items() if k[1] == clinical.content_key(png)}


def test_explainability_filters_follow_the_records(small_models: Path) -> None:
    records = pd.read_csv(small_models / "report" / "predictions.csv")
    at = run_page("pages/explainability.py", timeout=180)
    assert not at.exception
    assert at.metric[0].value == f"{len(records)} of {len(records)}"
    cls = SMALL_CLASSES[0]
    boxes = {s.label: s for s in at.selectbox}
    boxes["True class"].set_value(cls)
    boxes["Outcome"].set_value("Correct")
    at.run()
    want = records[(records.true_class == cls) & (records.predicted_class == records.true_class)]
    assert at.metric[0].value == f"{len(want)} of {len(records)}"
    boxes = {s.label: s for s in at.selectbox}
    boxes["Predicted class"].set_value(SMALL_CLASSES[1])
    at.run()
    none = records[(records.true_class == cls) & (records.predicted_class == SMALL_CLASSES[1])
                   & (records.predicted_class == records.true_class)]
    assert at.metric[0].value == f"0 of {len(records)}" == f"{len(none)} of {len(records)}"
    assert any("No test image matches" in i.value for i in at.info)

    # the lung-focus and OOD filters (records written by core.evaluate carry both columns)
    assert {"lung_focus", "ood"} <= set(records.columns)
    at = run_page("pages/explainability.py", timeout=180)
    boxes = {c.label: c for c in at.checkbox}
    assert not boxes["Low lung focus only"].disabled
    boxes["Low lung focus only"].check()
    at.run()
    low = (pd.to_numeric(records["lung_focus"], errors="coerce") < 1.0).sum()
    assert at.metric[0].value == f"{low} of {len(records)}"
    boxes = {c.label: c for c in at.checkbox}
    boxes["Low lung focus only"].uncheck()
    boxes["Out-of-distribution only"].check()
    at.run()
    flagged = (records["ood"].astype(str) == "True").sum()
    assert at.metric[0].value == f"{flagged} of {len(records)}"


def test_explainability_renders_each_method(small_models: Path) -> None:
    at = run_page("pages/explainability.py", timeout=180)
    first = at.get("image")[-1]
    assert first.captions[0].startswith("Grad-CAM at layer4")
    boxes = {s.label: s for s in at.selectbox}
    boxes["CAM method"].set_value("gradcam++")
    boxes["Target layer"].set_value("layer3")
    at.run()
    assert not at.exception
    heat = at.get("image")[-1]
    assert heat.captions[0].startswith("Grad-CAM++ at layer3")
    assert heat.value != first.value
    assert [m.label for m in at.metric][-1] == "Lung focus of this map"


def test_explainability_without_the_images_says_how_to_get_them(small_run: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    models = tmp_path / "models"
    copy_run(small_run, models, str(tmp_path / "not-here"))
    monkeypatch.setenv("CXR_MODELS_DIR", str(models))
    for page in ("pages/explainability.py", "pages/data_explorer.py"):
        at = run_page(page, timeout=180)
        assert not at.exception
        assert any("not on this machine" in i.value and "kaggle.com" in i.value for i in at.info)
        assert not at.get("image")
        assert at.get("plotly_chart") or at.dataframe


def test_data_explorer_counts_and_preview(small_models: Path) -> None:
    manifest = pd.read_csv(small_models / "manifest.csv")
    at = run_page("pages/data_explorer.py", timeout=180)
    assert not at.exception
    counts_fig = plotly_specs(at)[0]
    shown = {(t["name"], x): y for t in counts_fig["data"]
             for x, y in zip(values(t["x"]), values(t["y"]), strict=True)}
    want = manifest.groupby(["class", "split"]).size().to_dict()
    assert shown == {k: want.get(k, 0) for k in shown}
    assert {k for k in shown if shown[k]} == set(want)
    dataset = small_models / "dataset.json"
    if dataset.is_file():
        doc = json.loads(dataset.read_text())
        assert shown == {(c, s): doc["counts"][s][c] for (c, s) in shown}
    captions = [c for img in at.get("image") for c in img.captions]
    steps = [c.split(":")[0] for c in captions if ":" in c]
    assert steps == ["Original", "Letterbox", "CLAHE", "Lung field"]
    n_classes = len(manifest["class"].unique())
    assert len(captions) - len(steps) == 6 * n_classes  # the sample grid
    hist = plotly_specs(at)[1]
    assert [t["name"] for t in hist["data"]] == sorted(manifest["class"].unique())
    for t in hist["data"]:
        assert sum(values(t["y"])) == pytest.approx(1.0)
