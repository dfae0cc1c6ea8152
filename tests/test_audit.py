"""The prediction audit log (core.audit) on SQLite, and on PostgreSQL when CXR_TEST_PG_URL
is set (``.ci/start-postgres`` starts a throwaway cluster and sets it; skipped otherwise).

Concurrency without loss or duplicates, a writer killed with SIGKILL, the spool when the
database is full or down and its replay, the off switch, migrations up and down, the CLI
(stats, export, purge), and that no patient field or file name reaches a record, the spool or
the log when ``core.predict`` runs on a DICOM and a distinctively named PNG.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, event, insert, inspect, text
from sqlalchemy.exc import OperationalError

from core.audit import AuditLog, AuditStatus, ModelIdentity, query, scrub, sniff_format
from core.audit import engine as db
from core.audit.__main__ import main as audit_main
from core.audit.log import prediction_row, refusal_row
from core.audit.models import Base, records
from core.errors import InvalidImageError
from core.inference import Prediction
from tests.conftest import ROOT, blob_image
from tests.test_imaging import make_dicom

PG_URL = os.environ.get("CXR_TEST_PG_URL")
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not PG_URL, reason="CXR_TEST_PG_URL is not set (.ci/start-postgres starts a throwaway "
                       "PostgreSQL and sets it)"))]
MODEL = ModelIdentity(run_id="small", weights_sha256="a" * 64, calibration_sha256="b" * 64,
                      statistics_sha256="c" * 64, runtime="torch-int8 on cpu", precision=None,
                      operating_class="COVID", threshold=0.25)


def make_prediction(label: str = "COVID", p: float = 0.7, ood: bool = False,
                    low: bool = False) -> Prediction:
    rest = (1 - p) / 2
    probs = {"COVID": rest, "Normal": rest, "Viral Pneumonia": rest}
    probs[label] = p
    return Prediction(label=label, probabilities=probs, decision=label, low_confidence=low,
                      ood=ood, ood_score=1.5, classes=tuple(probs), original_size=(300, 200),
                      confidence=p, calibrated=True, ood_available=True,
                      low_confidence_available=True, ood_threshold=3.0,
                      low_confidence_threshold=0.5, decision_rule="argmax", network="int8")


@contextlib.contextmanager
def pg_database(prefix: str = "cxr_audit") -> Iterator[str]:
    """A fresh PostgreSQL database on the test server, dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(db.normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = db.normalise_url(PG_URL).rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        with pg_database() as url:
            yield url


@pytest.fixture
def audit(db_url: str, tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(db_url, spool_path=tmp_path / "spool.jsonl", retry_after_s=0)
    yield log
    log.close()


def all_ids(url: str) -> list[str]:
    """Every record's id (but the filler records of an outage test)."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT id FROM audit_records WHERE session_id IS NULL OR session_id <> :f"),
                {"f": FILLER}).scalars())
    finally:
        engine.dispose()


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(blob_image(np.random.default_rng(seed), seed % 3, 96)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- what a record holds


def test_a_prediction_record_holds_what_answered_and_the_input_hash(audit):
    data = png_bytes()
    pred = make_prediction("Normal", 0.8, ood=True)
    result = audit.record_prediction(pred, model=MODEL, input=data, source="api",
                                     session_id="tab1", user="dr.who", lung_focus=1.25)
    assert result.status is AuditStatus.WRITTEN and not result.warning and result.message == ""
    df = query.load_records(audit.engine)
    assert len(df) == 1
    r = df.iloc[0]
    import hashlib

    assert r["id"] == result.record_id and len(r["id"]) == 32
    assert r["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert (r["input_format"], r["width"], r["height"]) == ("PNG", 200, 300)
    assert (r["predicted_class"], r["decision"], r["kind"], r["source"]) == (
        "Normal", "Normal", "prediction", "api")
    assert (r["run_id"], r["weights_sha256"], r["calibration_sha256"],
            r["statistics_sha256"]) == ("small", "a" * 64, "b" * 64, "c" * 64)
    assert (r["runtime"], r["precision"]) == ("torch-int8 on cpu", "int8")  # from the network
    assert (r["operating_class"], r["threshold"]) == ("COVID", 0.25)
    assert r["prob_Normal"] == pytest.approx(0.8) and r["prob_COVID"] == pytest.approx(0.1)
    assert bool(r["ood"]) is True and bool(r["low_confidence"]) is False
    assert r["ood_score"] == pytest.approx(1.5) and r["lung_focus"] == pytest.approx(1.25)
    assert (r["session_id"], r["user_name"]) == ("tab1", "dr.who")
    age = dt.datetime.now(dt.timezone.utc) - r["created_at"].to_pydatetime()
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=1)  # stored and read back as UTC


def test_refusal_records_error_class_and_scrubbed_message(audit):
    err = InvalidImageError("Smith_John_1961.png could not be read: /scans/Smith_John_1961.png "
                            "is damaged")
    res = audit.record_refusal(err, input=b"not an image", source="cli", model=MODEL,
                               name="Smith_John_1961.png")
    assert res.status is AuditStatus.WRITTEN
    r = query.load_records(audit.engine).iloc[0]
    assert (r["kind"], r["error_class"], r["input_format"]) == ("refusal", "InvalidImageError",
                                                                "unknown")
    assert r["error_message"] == "[file] could not be read: /scans/[file] is damaged"
    assert r["predicted_class"] is None or r["predicted_class"] != r["predicted_class"]


def test_scrub_removes_given_names_and_anything_like_an_image_file_name():
    assert scrub("bad: Doe_Jane.PNG and x/y/z.dcm", ["nothing"]) == "bad: [file] and [file]"
    assert scrub("Doe_Jane_scan failed", ["/a/Doe_Jane_scan.tif"]) == "[file] failed"
    assert scrub("The file is empty (0 bytes).") == "The file is empty (0 bytes)."


def test_imaging_refusals_never_carry_the_file_name():
    """core.imaging's messages (what a refusal record keeps) do not embed the name."""
    from core.imaging import decode

    name = "Zyxwv_Qwerty_patient.png"
    for data in (b"", b"plain text, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                 png_bytes()[:200]):
        with pytest.raises(InvalidImageError) as info:
            decode(data, name=name)
        assert "Zyxwv" not in str(info.value) and "Qwerty" not in str(info.value)


def test_sniff_format():
    assert sniff_format(png_bytes()[:132]) == "PNG"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"\0" * 128 + b"DICM") == "DICOM"
    assert sniff_format(b"\0" * 10, "x.dcm") == "DICOM"
    assert sniff_format(b"hello") == "unknown"


def test_a_retried_write_is_not_duplicated(audit):
    row = prediction_row(make_prediction(), model=MODEL, input_sha256="0" * 64,
                         input_format="PNG", source="api", session_id="s")
    assert audit.write(row).status is AuditStatus.WRITTEN
    assert audit.write(row).status is AuditStatus.WRITTEN  # the retry
    assert audit.write_many([row, row]).status is AuditStatus.WRITTEN
    assert all_ids(audit.url) == [row["id"]]


# ---------------------------------------------------------------- concurrency and crashes


@pytest.mark.timeout(600)
def test_eight_threads_of_1000_records_lose_and_duplicate_nothing(audit):
    audit.check()
    pred = make_prediction()
    data = png_bytes()
    got: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(k: int) -> None:
        try:
            start.wait()
            ids = []
            for _ in range(1000):
                res = audit.record_prediction(pred, model=MODEL, input=data, source="api",
                                              session_id=f"thread-{k}")
                assert res.status is AuditStatus.WRITTEN, res.message
                ids.append(res.record_id)
            got[k] = ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    written = [i for ids in got.values() for i in ids]
    stored = all_ids(audit.url)
    assert len(written) == len(set(written)) == 8000
    assert len(stored) == len(set(stored)) == 8000  # none lost, none duplicated
    assert set(stored) == set(written)
    assert not audit.spool.has_pending()
    per_session = query.stats(audit.engine)
    assert per_session["records"] == 8000 and per_session["per_source"] == {"api": 8000}


WRITER = """
import sys
from types import SimpleNamespace
from core.audit import AuditLog, ModelIdentity
from core.audit.log import prediction_row

log = AuditLog(sys.argv[1], spool_path=sys.argv[2])
pred = SimpleNamespace(label="COVID", probabilities={"COVID": 0.7, "Normal": 0.3},
                       decision="COVID", low_confidence=False, ood=False, ood_score=1.0,
                       original_size=(300, 200), confidence=0.7, network="fp32")
MODEL = ModelIdentity("small", "a" * 64, "b" * 64, "c" * 64, "torch-jit on cpu", None)
while True:
    rows = [prediction_row(pred, model=MODEL, input_sha256="0" * 64, input_format="PNG",
                           source="api", session_id="killed") for _ in range(5)]
    res = log.write_many(rows)
    assert res.status.value == "written", res
    print(" ".join(r["id"] for r in rows), flush=True)
"""


@pytest.mark.timeout(300)
def test_a_writer_killed_with_sigkill_leaves_every_committed_record(db_url, tmp_path):
    AuditLog(db_url, spool_path=tmp_path / "s.jsonl").check()  # schema first
    proc = subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(tmp_path / "s.jsonl")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    committed: list[str] = []
    try:
        while len(committed) < 500:
            line = proc.stdout.readline()
            assert line, "the writer stopped on its own"
            committed += line.split()
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-write: it never stops between batches
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed += proc.stdout.read().split()  # ids printed before the kill landed
    if db_url.startswith("sqlite"):
        engine = create_engine(db_url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        engine.dispose()
    stored = set(all_ids(db_url))  # readable
    assert set(committed) <= stored
    assert len(stored) % 5 == 0  # whole transactions only, the last one in or out entirely


# ---------------------------------------------------------------- outages and the spool


FILLER = "filler"


@contextlib.contextmanager
def outage(log: AuditLog, kind: str) -> Iterator[None]:
    """The database cannot take records, then is back on exit. ``full``: SQLite's file is full
    (SQLITE_FULL: ``max_page_count`` at its size, the last free bytes taken by filler records
    of session ``FILLER``); ``gone``: SQLite's folder is gone (a storage that is unmounted);
    ``down``: the PostgreSQL database refuses connections."""
    engine = log.engine
    if kind == "full":
        with engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

        def full(dbapi_conn, _record):
            dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

        event.listen(engine, "connect", full)
        engine.dispose()
        size = 2048
        while size >= 1:
            row = refusal_row(InvalidImageError("x"), model=None, input_sha256=None,
                              input_format=None, source="api", session_id=FILLER)
            row["error_message"] = "x" * size
            try:
                with engine.begin() as conn:
                    conn.execute(insert(records), [row])
            except OperationalError as err:
                assert "full" in str(err.orig)
                size //= 2
        try:
            yield
        finally:
            event.remove(engine, "connect", full)
            engine.dispose()
    elif kind == "gone":
        folder = db.sqlite_path(log.url).parent
        away = folder.with_name(folder.name + "-unmounted")
        engine.dispose()
        folder.rename(away)
        folder.write_text("not the database's folder")
        try:
            yield
        finally:
            folder.unlink()
            away.rename(folder)
            engine.dispose()
    else:
        name = engine.url.database
        admin = create_engine(engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n"), {"n": name})
        try:
            yield
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
            admin.dispose()


OUTAGES = ["full", "gone", pytest.param("down", marks=ENGINES[1].marks)]


@pytest.mark.parametrize("kind", OUTAGES)
def test_database_full_or_down_spools_with_a_warning_then_replays(kind, tmp_path, caplog):
    if kind == "down":
        ctx = pg_database()
        url = ctx.__enter__()
    else:
        ctx, url = None, f"sqlite:///{tmp_path / 'db' / 'audit.db'}"
    audit = AuditLog(url, spool_path=tmp_path / "spool.jsonl", retry_after_s=0)
    try:
        check_outage_and_replay(audit, kind, caplog)
    finally:
        audit.close()
        if ctx is not None:
            ctx.__exit__(None, None, None)


def check_outage_and_replay(audit: AuditLog, kind: str, caplog) -> None:
    first = audit.record_prediction(make_prediction(), model=MODEL, input=png_bytes(1),
                                    source="api")
    assert first.status is AuditStatus.WRITTEN
    with outage(audit, kind):
        spooled = [audit.record_prediction(make_prediction("Normal", 0.9), model=MODEL,
                                           input=png_bytes(2), source="app", session_id="t")
                   for _ in range(3)]
        spooled.append(audit.record_refusal(InvalidImageError("The file is empty"), input=b"",
                                            source="cli", model=MODEL))
        assert audit.health().available is False
    assert [r.status for r in spooled] == [AuditStatus.SPOOLED] * 4
    assert all(r.warning and "unavailable" in r.message for r in spooled)
    assert any("unavailable" in m for m in caplog.messages)
    assert audit.spool.pending() == 4 and all_ids(audit.url) == [first.record_id]
    lines = audit.spool.path.read_text().splitlines()
    assert [json.loads(ln)["id"] for ln in lines] == [r.record_id for r in spooled]

    back = audit.record_prediction(make_prediction(), model=MODEL, input=png_bytes(3),
                                   source="api")  # the database is back: this replays the spool
    assert back.status is AuditStatus.WRITTEN
    assert sorted(all_ids(audit.url)) == sorted([first.record_id, back.record_id,
                                                 *(r.record_id for r in spooled)])
    assert audit.spool.pending() == 0 and audit.spool.path.stat().st_size == 0
    assert (audit.counters.spooled, audit.counters.replayed, audit.counters.written) == (4, 4, 2)
    assert query.stats(audit.engine)["incidents"] == {"replayed": 4}
    df = query.load_records(audit.engine)
    assert sorted(df[df["session_id"] != FILLER]["kind"]) == ["prediction"] * 5 + ["refusal"]
    replayed = query.load_records(audit.engine, query.Filters(classes=("Normal",)))
    assert len(replayed) == 3 and set(replayed["session_id"]) == {"t"}


def test_replay_is_idempotent_and_rejects_lines_cut_by_a_crash(audit, caplog):
    audit.check()
    rows = [prediction_row(make_prediction(), model=MODEL, input_sha256="1" * 64,
                           input_format="PNG", source="cli", session_id="b") for _ in range(3)]
    audit.write(rows[0])  # already in the database: replaying it must not duplicate it
    audit.spool.append(rows)
    with audit.spool.path.open("ab") as fh:
        fh.write(b'{"id": "cut-by-a-cra')  # a line cut by a crash while appending
    assert audit.replay() == (3, 1)
    assert sorted(all_ids(audit.url)) == sorted(r["id"] for r in rows)
    assert audit.spool.pending() == 0 and audit.spool.rejected() == 1
    assert "cut-by-a-cra" in audit.spool.rejected_path.read_text()
    assert query.stats(audit.engine)["incidents"] == {"replayed": 3, "rejected": 1}
    assert audit.health().rejected == 1 and audit.counters.rejected == 1
    assert any("REJECTED" in m for m in caplog.messages)


def test_nowhere_to_write_is_failed_and_loud(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    log = AuditLog(f"sqlite:///{blocker}/audit.db", spool_path=blocker / "spool.jsonl")
    res = log.record_prediction(make_prediction(), model=MODEL, input=b"x", source="api")
    assert res.status is AuditStatus.FAILED and res.warning and "could not be recorded" in res.message
    assert log.counters.failed == 1
    assert any("AUDIT RECORD LOST" in m for m in caplog.messages)


def test_unreachable_server_spools_quickly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connection refused
    log = AuditLog(f"postgresql://nobody@127.0.0.1:{port}/cxr", spool_path=tmp_path / "s.jsonl")
    res = log.record_prediction(make_prediction(), model=MODEL, input=b"x", source="api")
    assert res.status is AuditStatus.SPOOLED
    again = log.record_prediction(make_prediction(), model=MODEL, input=b"y", source="api")
    assert again.status is AuditStatus.SPOOLED and log.spool.pending() == 2
    assert "127.0.0.1" in log.health().database and log.health().available is False


def test_off_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_AUDIT", "0")
    monkeypatch.setenv("CXR_DB_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    log = AuditLog.from_env()
    assert not log.enabled
    res = log.record_prediction(make_prediction(), model=MODEL, input=b"x", source="api")
    assert res.status is AuditStatus.OFF and not res.warning
    assert log.record_refusal(ValueError("x"), input=b"", source="api").status is AuditStatus.OFF
    assert not (tmp_path / "audit.db").exists() and not log.spool.has_pending()
    monkeypatch.setenv("CXR_AUDIT", "1")
    assert AuditLog.from_env().enabled


def test_default_database_is_sqlite_in_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_DB_URL", raising=False)
    monkeypatch.setenv("CXR_DATA_HOME", str(tmp_path / "home"))
    log = AuditLog.from_env()
    assert log.url == f"sqlite:///{tmp_path / 'home' / 'audit.db'}"
    assert log.spool.path == tmp_path / "home" / "audit-spool.jsonl"
    assert log.record_prediction(make_prediction(), model=MODEL, input=b"x",
                                 source="api").status is AuditStatus.WRITTEN
    assert (tmp_path / "home" / "audit.db").is_file()  # created on first use
    with log.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    monkeypatch.setenv("CXR_DB_URL", "postgresql://u:secret@db.example:5432/cxr")
    assert db.default_url() == "postgresql+psycopg://u:secret@db.example:5432/cxr"
    assert "secret" not in AuditLog.from_env().database


# ---------------------------------------------------------------- migrations


def test_migrations_upgrade_and_downgrade(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = db.make_engine(db_url)
    try:
        assert db.current_revision(engine) is None
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision()
        names = set(inspect(engine).get_table_names())
        assert {"audit_records", "audit_incidents", "alembic_version"} <= names
        with engine.connect() as conn:  # the migrations make exactly the models' schema
            diff = compare_metadata(MigrationContext.configure(conn, opts={
                "compare_type": True}), Base.metadata)
        assert diff == []
        db.downgrade(engine, "base")
        assert db.current_revision(engine) is None
        assert not {"audit_records", "audit_incidents"} & set(inspect(engine).get_table_names())
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision()
    finally:
        engine.dispose()


def test_an_older_database_is_upgraded_on_first_use(db_url, tmp_path):
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    db.downgrade(engine, "base")  # as an older version left it: no schema yet
    engine.dispose()
    log = AuditLog(db_url, spool_path=tmp_path / "s.jsonl")
    res = log.record_prediction(make_prediction(), model=MODEL, input=b"x", source="api")
    assert res.status is AuditStatus.WRITTEN
    assert db.current_revision(log.engine) == db.head_revision()
    log.close()


def test_a_database_of_a_newer_version_is_not_written_but_spooled(db_url, tmp_path):
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    log = AuditLog(db_url, spool_path=tmp_path / "s.jsonl")
    res = log.record_prediction(make_prediction(), model=MODEL, input=b"x", source="api")
    assert res.status is AuditStatus.SPOOLED and "9999" in res.message
    assert log.spool.pending() == 1


# ---------------------------------------------------------------- reading and the CLI


def seed(log: AuditLog) -> list[dict]:
    """Records on three UTC days: (day, class, flags)."""
    plan = [("2026-01-01", "COVID", True, False), ("2026-01-01", "Normal", False, False),
            ("2026-01-02", "Normal", False, True), ("2026-01-02", "Normal", True, True),
            ("2026-01-03", "Viral Pneumonia", False, False)]
    rows = []
    for i, (day, cls, ood, low) in enumerate(plan):
        row = prediction_row(make_prediction(cls, 0.6, ood=ood, low=low), model=MODEL,
                             input_sha256=f"{i:064x}", input_format="PNG", source="cli",
                             session_id="seed")
        row["created_at"] = dt.datetime.fromisoformat(f"{day}T12:00:00+00:00")
        rows.append(row)
    refusal = refusal_row(InvalidImageError("empty"), model=MODEL, input_sha256=None,
                          input_format=None, source="app", session_id="seed")
    refusal["created_at"] = dt.datetime.fromisoformat("2026-01-02T23:59:59+00:00")
    rows.append(refusal)
    assert log.write_many(rows).status is AuditStatus.WRITTEN
    return rows


def test_queries_count_per_day_class_and_drift(audit):
    seed(audit)
    counts = query.daily_counts(audit.engine)
    got = {(str(d), c): n for d, c, n in counts.itertuples(index=False)}
    assert got == {("2026-01-01", "COVID"): 1, ("2026-01-01", "Normal"): 1,
                   ("2026-01-02", "Normal"): 2, ("2026-01-02", query.REFUSED): 1,
                   ("2026-01-03", "Viral Pneumonia"): 1}
    d = query.drift(audit.engine).set_index(query.drift(audit.engine)["day"].astype(str))
    assert d.loc["2026-01-01", "ood_share"] == 0.5 and d.loc["2026-01-02", "ood_share"] == 0.5
    assert d.loc["2026-01-02", "low_confidence_share"] == 1.0
    assert d.loc["2026-01-02", "share_Normal"] == 1.0 and d.loc["2026-01-01", "share_COVID"] == 0.5
    assert d.loc["2026-01-03", "predictions"] == 1
    f = query.Filters(since=dt.date(2026, 1, 2), until=dt.date(2026, 1, 2), ood=True)
    assert len(query.load_records(audit.engine, f)) == 1
    f = query.Filters(classes=(query.REFUSED,))
    assert list(query.load_records(audit.engine, f)["kind"]) == ["refusal"]
    assert query.date_bounds(audit.engine) == (dt.date(2026, 1, 1), dt.date(2026, 1, 3))
    assert query.choices(audit.engine) == {"runs": ["small"],
                                           "classes": ["COVID", "Normal", "Viral Pneumonia"]}


def test_test_reference_from_the_runs_records():
    import pandas as pd

    preds = pd.DataFrame({"predicted_class": ["A", "A", "B", "C"],
                          "ood": [True, False, False, False],
                          "low_confidence": [False, False, True, True]})
    ref = query.test_reference(preds)
    assert ref == {"n": 4, "ood_share": 0.25, "low_confidence_share": 0.5,
                   "class_share": {"A": 0.5, "B": 0.25, "C": 0.25}}
    assert query.test_reference(preds[["predicted_class"]])["ood_share"] is None


def test_cli_stats_export_purge(audit, capsys, tmp_path):
    rows = seed(audit)
    url = audit.url
    assert audit_main(["stats", "--db-url", url, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["records"], s["predictions"], s["refusals"]) == (6, 5, 1)
    assert s["per_class"] == {query.REFUSED: 1, "COVID": 1, "Normal": 3, "Viral Pneumonia": 1}
    assert s["ood_share"] == pytest.approx(2 / 5) and s["low_confidence_share"] == pytest.approx(2 / 5)
    assert audit_main(["stats", "--db-url", url]) == 0
    assert "Records: 6 (5 predictions, 1 refusals)" in capsys.readouterr().out

    out = tmp_path / "jan2.csv"
    assert audit_main(["export", "--db-url", url, "--since", "2026-01-02", "--until",
                       "2026-01-02", "--csv", str(out)]) == 0
    got = list(csv.DictReader(out.open()))
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows[2:4] + rows[5:])
    normal = [r for r in got if r["kind"] == "prediction"]
    assert all(float(r["prob_Normal"]) == pytest.approx(0.6) for r in normal)
    assert all(r["created_at"].startswith("2026-01-02T") for r in got)

    assert audit_main(["purge", "--db-url", url, "--before", "2026-01-02", "--dry-run"]) == 0
    assert "Would delete 2 record(s)" in capsys.readouterr().out
    assert len(all_ids(url)) == 6
    assert audit_main(["purge", "--db-url", url, "--before", "2026-01-02"]) == 0
    assert sorted(all_ids(url)) == sorted(r["id"] for r in rows[2:])
    assert audit_main(["current", "--db-url", url]) == 0
    assert f"revision {db.head_revision()}" in capsys.readouterr().out


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        audit_main(["--help"])
    assert info.value.code == 0
    top = capsys.readouterr().out
    assert all(c in top for c in ("stats", "export", "purge", "replay", "bench"))
    with pytest.raises(SystemExit):
        audit_main(["export", "--help"])
    sub = capsys.readouterr().out
    assert "records:" in sub and "output:" in sub and "database:" in sub
    with pytest.raises(SystemExit) as info:
        audit_main(["purge", "--before", "yesterday"])
    assert info.value.code == 2 and "YYYY-MM-DD" in capsys.readouterr().err


def test_cli_replay_reports_what_is_outstanding(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    spool = tmp_path / "spool.jsonl"
    log = AuditLog(url, spool_path=spool)
    row = prediction_row(make_prediction(), model=MODEL, input_sha256="2" * 64,
                         input_format="PNG", source="cli", session_id="b")
    log.spool.append([row])
    os.environ["CXR_AUDIT_SPOOL"] = str(spool)
    try:
        assert audit_main(["replay", "--db-url", url]) == 0
    finally:
        del os.environ["CXR_AUDIT_SPOOL"]
    assert "Replayed 1 record(s)" in capsys.readouterr().out
    assert all_ids(url) == [row["id"]]


# ---------------------------------------------------------------- privacy, end to end (CLI)

PATIENT = {"PatientName": "Qzwxly^Vopjuk", "PatientID": "PIDXQZ8642",
           "PatientBirthDate": "19700101"}
SECRETS = ("Qzwxly", "Vopjuk", "PIDXQZ8642", "19700101", "Kqrvzt", "Wjxpyq")
PNG_NAME = "Kqrvzt_Wjxpyq_19700101_chest.png"


def secret_inputs(folder: Path) -> list[Path]:
    """A DICOM with patient name, ID and birth date, a PNG with a distinctive name, and a
    broken file with a distinctive name (a refusal)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = blob_image(np.random.default_rng(5), 1, 128).astype(np.uint16) * 16
    dcm = folder / "Qzwxly_Vopjuk_PIDXQZ8642.dcm"
    dcm.write_bytes(make_dicom(pixels, **PATIENT))
    png = folder / PNG_NAME
    png.write_bytes(png_bytes(7))
    broken = folder / "Kqrvzt_Wjxpyq_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"Qzwxly PIDXQZ8642" * 3)
    return [dcm, png, broken]


def dump_database(url: str) -> str:
    """Every column of every table, as text."""
    engine = db.make_engine(url)
    parts = []
    try:
        with engine.connect() as conn:
            for table in inspect(engine).get_table_names():
                for row in conn.execute(text(f'SELECT * FROM "{table}"')).mappings():
                    parts.append(" ".join(f"{k}={v}" for k, v in row.items()))
    finally:
        engine.dispose()
    return "\n".join(parts)


def assert_no_secret(where: str, content: str) -> None:
    low = content.lower()
    for s in SECRETS:
        assert s.lower() not in low, f"{s!r} found in {where}"


def test_cli_records_no_patient_field_or_file_name(small_run, tmp_path, monkeypatch, caplog):
    from core.predict import main as predict_main

    caplog.set_level("DEBUG")
    inputs = secret_inputs(tmp_path / "in")
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    spool = tmp_path / "spool.jsonl"
    monkeypatch.setenv("CXR_DB_URL", url)
    monkeypatch.setenv("CXR_AUDIT_SPOOL", str(spool))
    args = ["--checkpoint", str(small_run / "best.pt"), *map(str, inputs), "--csv",
            str(tmp_path / "out.csv"), "--no-progress", "--heatmaps", str(tmp_path / "heat")]
    assert predict_main(args) == 1  # the broken file fails, the others are predicted
    df = query.load_records(db.make_engine(url))
    assert sorted(df["kind"]) == ["prediction", "prediction", "refusal"]
    assert sorted(df["input_format"]) == ["DICOM", "PNG", "PNG"]
    assert set(df["source"]) == {"cli"} and df["session_id"].nunique() == 1
    preds = df[df["kind"] == "prediction"]
    assert preds["lung_focus"].notna().sum() + preds["lung_focus"].isna().sum() == 2
    import hashlib

    assert set(df["input_sha256"]) == {hashlib.sha256(p.read_bytes()).hexdigest()
                                       for p in inputs}
    weights = hashlib.sha256((small_run / "best.pt").read_bytes()).hexdigest()
    assert set(preds["weights_sha256"]) == {weights} and set(preds["run_id"]) == {"small"}

    # The same batch with the database down: the records go to the spool.
    monkeypatch.setenv("CXR_DB_URL", f"sqlite:///{tmp_path / 'blocker' / 'audit.db'}")
    (tmp_path / "blocker").write_text("a file where the database's folder should be")
    assert predict_main(args) == 1
    assert len(spool.read_text().splitlines()) == 3
    assert any("spool" in m for m in caplog.messages)

    dump = dump_database(url)
    assert hashlib.sha256(inputs[0].read_bytes()).hexdigest() in dump  # the dump holds the records
    assert_no_secret("the database", dump)
    assert_no_secret("the spool file", spool.read_text())
    assert_no_secret("the application log", "\n".join(r.getMessage() for r in caplog.records))


def test_cli_says_when_the_log_is_off(small_run, tmp_path, monkeypatch, caplog):
    from core.predict import main as predict_main

    monkeypatch.setenv("CXR_AUDIT", "off")
    monkeypatch.setenv("CXR_DB_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    png = tmp_path / "x.png"
    png.write_bytes(png_bytes())
    assert predict_main(["--checkpoint", str(small_run / "best.pt"), str(png), "--csv",
                         str(tmp_path / "o.csv"), "--no-progress"]) == 0
    assert any("audit log is off" in m for m in caplog.messages)
    assert not (tmp_path / "audit.db").exists()


def test_model_identity_from_a_predictor(small_run):
    import hashlib

    from core.inference import Predictor
    from core.sidecars import sidecar_path

    predictor = Predictor.from_checkpoint(small_run / "best.pt")
    ident = ModelIdentity.from_predictor(predictor)
    assert ident.weights_sha256 == hashlib.sha256((small_run / "best.pt").read_bytes()).hexdigest()
    assert ident.run_id == "small"  # the folder's name outside the models folder
    assert ident.runtime == f"{predictor.network.rpartition('-')[0]} on cpu"
    assert ident.precision == predictor.network.rpartition("-")[2]
    for part, value in (("calibration", ident.calibration_sha256),
                        ("ood", ident.statistics_sha256)):  # the sidecar files that answered
        sidecar = sidecar_path(small_run / "best.pt", part)
        assert sidecar.is_file()
        assert value == hashlib.sha256(sidecar.read_bytes()).hexdigest()
    op = predictor.operating_point
    assert ident.threshold == (float(op["threshold"]) if op else None)
    again = ModelIdentity.from_predictor(predictor)
    assert again == ident  # stable


def test_an_api_caller_opts_in_with_audit_predict(small_run, tmp_path):
    from core.inference import Predictor

    predictor = Predictor.from_checkpoint(small_run / "best.pt")
    model = ModelIdentity.from_predictor(predictor)
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", spool_path=tmp_path / "s.jsonl")
    data = png_bytes(4)
    prediction, result = log.predict(predictor, data, model=model, session_id="job-1")
    assert result.status is AuditStatus.WRITTEN
    assert prediction == predictor.predict(data)
    with pytest.raises(InvalidImageError):
        log.predict(predictor, b"Zyxwv not an image", model=model, name="Zyxwv.png")
    df = query.load_records(log.engine).sort_values("created_at")
    assert list(df["kind"]) == ["prediction", "refusal"] and set(df["source"]) == {"api"}
    row = df.iloc[0]
    assert row["predicted_class"] == prediction.label and row["decision"] == prediction.decision
    assert row["confidence"] == pytest.approx(prediction.confidence)
    assert [row[f"prob_{c}"] for c in predictor.classes] == pytest.approx(
        [prediction.probabilities[c] for c in predictor.classes])
    assert (row["height"], row["width"]) == prediction.original_size
    assert row["precision"] == prediction.network.rpartition("-")[2]  # e.g. fp32 of onnx-fp32
    assert "Zyxwv" not in dump_database(log.url)
