"""The audit log in the app: the Audit page (records, counts, CSV, drift) against
core.audit's queries, its off and unavailable states, and the records that Clinical
Predictions writes (once per upload, never a file name or patient field; spooled with a
visible warning when the database is down; the off switch said on the page)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import app_test

from core.audit import AuditLog, ModelIdentity, query
from core.audit import engine as db
from core.audit.log import prediction_row, refusal_row
from core.errors import InvalidImageError
from tests.conftest import blob_image
from tests.test_app import run_page
from tests.test_audit import (
    PATIENT,
    PNG_NAME,
    assert_no_secret,
    dump_database,
    make_prediction,
    png_bytes,
)
from tests.test_imaging import make_dicom

PLAN = [("2026-01-01", "COVID", True, False), ("2026-01-01", "Normal", False, False),
        ("2026-01-02", "Normal", False, True), ("2026-01-02", "Viral Pneumonia", True, True),
        ("2026-01-03", "Normal", False, False)]


@pytest.fixture
def audit_url(tmp_path, monkeypatch) -> str:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    monkeypatch.setenv("CXR_DB_URL", url)
    monkeypatch.setenv("CXR_AUDIT_SPOOL", str(tmp_path / "spool.jsonl"))
    return url


def seed(url: str, run_id: str = "small") -> list[dict]:
    model = ModelIdentity(run_id, "a" * 64, "b" * 64, "c" * 64, "torch-jit on cpu", None)
    rows = []
    for i, (day, cls, ood, low) in enumerate(PLAN):
        row = prediction_row(make_prediction(cls, 0.6, ood=ood, low=low), model=model,
                             input_sha256=f"{i:064x}", input_format="PNG", source="app",
                             session_id="tab")
        row["created_at"] = dt.datetime.fromisoformat(f"{day}T08:00:00+00:00")
        rows.append(row)
    refusal = refusal_row(InvalidImageError("The file is empty"), model=model,
                          input_sha256=None, input_format=None, source="cli", session_id="b")
    refusal["created_at"] = dt.datetime.fromisoformat("2026-01-03T09:00:00+00:00")
    rows.append(refusal)
    log = AuditLog(url)
    assert log.write_many(rows).status.value == "written"
    log.close()
    return rows


@pytest.fixture
def flagged_run(small_run, tmp_path, monkeypatch):
    """A copy of ``small_run`` (checkpoint linked) whose test records carry OOD and
    low-confidence flags (added when its report predates them), as the models folder."""
    out = tmp_path / "models" / "small"
    shutil.copytree(small_run, out, ignore=shutil.ignore_patterns("*.pt"))
    (out / "best.pt").symlink_to(small_run / "best.pt")
    csv = out / "report" / "predictions.csv"
    df = pd.read_csv(csv)
    if "ood" not in df:
        df["ood"] = [i % 4 == 0 for i in range(len(df))]
        df["low_confidence"] = [i % 5 == 0 for i in range(len(df))]
        df.to_csv(csv, index=False)
    monkeypatch.setenv("CXR_MODELS_DIR", str(out.parent))
    return out


def chart(at: app_test.AppTest, key: str) -> dict:
    [spec] = [json.loads(n.proto.spec) for n in at.get("plotly_chart") if key in n.proto.id]
    return spec


def test_audit_page_without_records_says_how_they_come(audit_url, small_models):
    at = run_page("pages/audit.py")
    assert not at.exception
    assert any("No predictions recorded yet" in i.value for i in at.info)


def test_audit_page_when_the_log_is_off(audit_url, monkeypatch, no_models):
    monkeypatch.setenv("CXR_AUDIT", "0")
    at = run_page("pages/audit.py")
    assert not at.exception
    assert any("audit log is off" in i.value and "CXR_AUDIT" in i.value for i in at.info)


def test_audit_page_when_the_database_is_unavailable(tmp_path, monkeypatch, no_models):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CXR_DB_URL", f"sqlite:///{blocker / 'audit.db'}")
    monkeypatch.setenv("CXR_AUDIT_SPOOL", str(tmp_path / "spool.jsonl"))
    at = run_page("pages/audit.py")
    assert not at.exception
    assert any("unavailable" in e.value and "CXR_DB_URL" in e.value for e in at.error)


def test_audit_page_writes_spooled_records_once_the_database_is_back(audit_url, no_models):
    model = ModelIdentity("small", None, None, None, None, None)
    row = prediction_row(make_prediction(), model=model, input_sha256="3" * 64,
                         input_format="PNG", source="cli", session_id="b")
    AuditLog(audit_url).spool.append([row])  # spooled while the database was down
    at = run_page("pages/audit.py")
    assert not at.exception
    assert list(at.dataframe[0].value["id"]) == [row["id"]]
    assert any("written late" in c.value for c in at.caption)
    assert not any("wait in the spool" in w.value for w in at.warning)
    assert any("No trained run" in i.value for i in at.info)  # drift needs a run


def test_audit_page_shows_the_log_as_the_queries_count_it(audit_url, flagged_run):
    rows = seed(audit_url)
    at = run_page("pages/audit.py")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Records"] == "6" and metrics["Predictions"] == "5"
    assert metrics["Refusals"] == "1"
    assert metrics["Out of distribution"] == "40.0%" and metrics["Low confidence"] == "40.0%"
    table = at.dataframe[0].value
    assert sorted(table["id"]) == sorted(r["id"] for r in rows)
    # counts per day and class: the bars add up to query.daily_counts
    engine = db.make_engine(audit_url)
    counts = query.daily_counts(engine)
    bars = chart(at, "audit_counts")["data"]
    got = {(d[:10], t["name"]): y for t in bars for d, y in zip(t["x"], t["y"], strict=True)}
    want = {(str(d), c.replace("_", " ")): n for d, c, n in counts.itertuples(index=False)}
    assert got == want and sum(got.values()) == 6
    # drift: the daily shares and the run's test figures as dashed lines
    reference = query.test_reference(pd.read_csv(flagged_run / "report" / "predictions.csv"))
    drift = query.drift(engine, query.Filters(runs=("small",)))
    flags = chart(at, "audit_drift_flags")
    ood = next(t for t in flags["data"] if t["name"] == "Out of distribution")
    assert ood["y"] == pytest.approx(drift["ood_share"].tolist())
    lines = [s["y0"] for s in flags["layout"]["shapes"]]
    assert lines == pytest.approx([reference["ood_share"], reference["low_confidence_share"]])
    classes = chart(at, "audit_drift_classes")
    normal = next(t for t in classes["data"] if t["name"] == "Normal")
    assert normal["y"] == pytest.approx(drift["share_Normal"].tolist())
    test_shares = [s["y0"] for s in classes["layout"]["shapes"]]
    assert test_shares == pytest.approx([reference["class_share"][c]
                                         for c in ("COVID", "Normal", "Viral Pneumonia")
                                         if c in reference["class_share"]])
    engine.dispose()


def test_audit_page_filters_and_exports_csv(audit_url, small_models, monkeypatch):
    rows = seed(audit_url)
    made = []

    class Recording(app_test.MemoryMediaFileStorage):
        def __init__(self, endpoint: str) -> None:
            super().__init__(endpoint)
            made.append(self)

    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Recording)
    at = run_page("pages/audit.py")
    at.multiselect(key="audit_classes").set_value(["Normal"]).run()
    at.multiselect(key="audit_flags").set_value(["Low confidence"]).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["id"]) == [rows[2]["id"]]  # Normal and low confidence: one record
    button = at.get("download_button")[0]
    assert button.proto.label == "Download records (CSV)"
    file = made[-1].get_file(button.proto.url.rsplit("/", 1)[-1])
    assert file.filename == "cxr-audit.csv"
    engine = db.make_engine(audit_url)
    filters = query.Filters(since=dt.date(2026, 1, 1), until=dt.date(2026, 1, 3),
                            classes=("Normal",), low_confidence=True)
    want = query.to_csv(query.load_records(engine, filters, classes=["COVID", "Normal",
                                                                      "Viral Pneumonia"]))
    assert file.content == want
    engine.dispose()
    at.date_input(key="audit_dates").set_value((dt.date(2026, 1, 3), dt.date(2026, 1, 3))).run()
    assert any("No records match" in i.value for i in at.info)


# ---------------------------------------------------------------- Clinical Predictions

def clinical_uploads() -> list[tuple[str, bytes, str]]:
    """A DICOM with patient name, ID and birth date, a distinctively named PNG, and a broken
    file with a distinctive name (a refusal)."""
    pixels = blob_image(np.random.default_rng(5), 1, 128).astype(np.uint16) * 16
    return [(PNG_NAME, png_bytes(7), "image/png"),
            ("Qzwxly_Vopjuk_PIDXQZ8642.dcm", make_dicom(pixels, **PATIENT), "application/dicom"),
            ("Kqrvzt_Wjxpyq_broken.png", b"\x89PNG\r\n\x1a\n" + b"Qzwxly PIDXQZ8642" * 3,
             "image/png")]


def upload(at: app_test.AppTest, files: list[tuple[str, bytes, str]]) -> app_test.AppTest:
    at.get("file_uploader")[0].set_value(files).run()
    assert not at.exception
    return at


def records(url: str) -> pd.DataFrame:
    engine = db.make_engine(url)
    try:
        return query.load_records(engine).sort_values("created_at").reset_index(drop=True)
    finally:
        engine.dispose()


def test_clinical_predictions_are_recorded_once_and_without_patient_data(
        audit_url, small_models, tmp_path, monkeypatch, caplog):
    caplog.set_level("DEBUG")
    files = clinical_uploads()
    at = upload(run_page("pages/clinical_predictions.py"), files)
    df = records(audit_url)
    assert sorted(df["kind"]) == ["prediction", "prediction", "refusal"]
    assert set(df["source"]) == {"app"} and df["session_id"].nunique() == 1
    assert df["user_name"].isna().all()  # no sign-in in this deployment
    import hashlib

    assert set(df["input_sha256"]) == {hashlib.sha256(data).hexdigest() for _, data, _ in files}
    preds = df[df["kind"] == "prediction"].set_index("input_format")
    shown = [m.value for m in at.markdown if "Predicted class:" in m.value]
    assert sorted(v.split("Predicted class: ")[1].strip() for v in shown) == sorted(
        preds["predicted_class"])
    assert preds.loc["DICOM", "run_id"] == "small" and preds.loc["DICOM", "width"] == 128
    refusal = df[df["kind"] == "refusal"].iloc[0]
    assert refusal["error_class"] == "InvalidImageError" and refusal["error_message"]

    at.slider[0].set_value(0.9).run()  # a rerun shows the same results: nothing new recorded
    assert not at.exception and len(records(audit_url)) == 3
    other_tab = upload(run_page("pages/clinical_predictions.py"), files[:1])
    assert not other_tab.exception
    df2 = records(audit_url)
    assert len(df2) == 4 and df2["session_id"].nunique() == 2  # one id per tab

    # The database down: the page still predicts, says so, and the records are spooled.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the database's folder should be")
    monkeypatch.setenv("CXR_DB_URL", f"sqlite:///{blocker / 'audit.db'}")
    down = upload(run_page("pages/clinical_predictions.py"), files)
    assert any("spool" in w.value for w in down.warning)
    assert any("Predicted class:" in m.value for m in down.markdown)
    spool = Path(os.environ["CXR_AUDIT_SPOOL"]).read_text()
    assert len(spool.splitlines()) == 3

    assert_no_secret("the database", dump_database(audit_url))
    assert_no_secret("the spool file", spool)
    assert_no_secret("the application log", "\n".join(r.getMessage() for r in caplog.records))


def test_clinical_predictions_record_the_signed_in_user(audit_url, small_models):
    at = run_page("pages/clinical_predictions.py")
    at.user = {"is_logged_in": True, "email": "dr.house@example.org"}
    upload(at, clinical_uploads()[:1])
    assert list(records(audit_url)["user_name"]) == ["dr.house@example.org"]


def test_clinical_predictions_say_when_the_log_is_off(audit_url, small_models, monkeypatch,
                                                      tmp_path):
    monkeypatch.setenv("CXR_AUDIT", "0")
    at = upload(run_page("pages/clinical_predictions.py"), clinical_uploads()[:1])
    assert any("audit log is off" in c.value for c in at.caption)
    assert any("Predicted class:" in m.value for m in at.markdown)
    assert not (tmp_path / "audit.db").exists()
