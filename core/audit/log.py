"""Writing the audit log: one record per prediction or refusal, committed before the answer
is returned, spooled to a local file when the database cannot take it.

>>> log = AuditLog.from_env()                                       # doctest: +SKIP
>>> model = ModelIdentity.from_predictor(predictor)                 # once per loaded run
>>> result = log.record_prediction(prediction, model=model, input=data, source="api",
...                                session_id=batch)                # doctest: +SKIP
>>> result.status          # written | spooled | off | failed       # doctest: +SKIP

Guarantees
----------
* **Committed first.** ``record_*`` returns after the database committed the record (or the
  spool file was flushed and fsync'ed); callers show the prediction after that.
* **Never the image, a file name or a patient field.** The input is its SHA-256, format and
  pixel size; a refusal's message is scrubbed of the file name it may carry (:func:`scrub`).
* **Idempotent.** The writer makes the record id (time-ordered, 80 random bits) and inserts
  with ``ON CONFLICT DO NOTHING``: a retried or replayed write never duplicates a record.
* **Never lost silently.** When the database is down, full or of an unknown schema, the
  record goes to the spool (JSON lines, ``CXR_AUDIT_SPOOL`` or ``audit-spool.jsonl`` in the
  data folder) and the caller gets ``spooled`` with a message to show. The spool is replayed
  into the database by the next successful write (and by ``python -m core.audit replay``);
  each replay writes an ``audit_incidents`` row. Lines the database refuses, or that cannot
  be parsed (a line cut by a crash), go to ``<spool>.rejected`` and are counted. Only when the
  spool cannot be written either is the status ``failed`` (logged as an error, counted).
* **Off switch.** ``CXR_AUDIT=0`` (a deployment setting) turns the log off: every call
  returns ``off`` and the app says that the log is off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, exc, insert

from core.audit import engine as db
from core.audit.models import incidents, records

log = logging.getLogger(__name__)

OFF_VALUES = ("0", "off", "false", "no")
RETRY_AFTER_S = 5.0
"""After a failed write, records go straight to the spool for this long before the database
is tried again (a database that is down must not slow every prediction down)."""
REPLAY_BATCH = 500
MAX_MESSAGE = 500

_DOWN_ERRORS = (exc.OperationalError, exc.InterfaceError, exc.ProgrammingError,
                exc.InternalError, exc.TimeoutError, db.AuditSchemaError, OSError)
"""The database cannot take records now (down, full, locked for too long, schema missing or
newer): spool and try again later."""
_REFUSED_ERRORS = (exc.IntegrityError, exc.DataError)
"""The database refuses this record itself: replaying it would fail forever (rejected)."""


class AuditStatus(str, enum.Enum):
    WRITTEN = "written"
    SPOOLED = "spooled"
    OFF = "off"
    FAILED = "failed"


@dataclass(frozen=True)
class AuditResult:
    """What happened to one record; ``message`` is for the user (empty when written)."""

    status: AuditStatus
    record_id: str | None = None
    message: str = ""

    @property
    def warning(self) -> bool:
        return self.status in (AuditStatus.SPOOLED, AuditStatus.FAILED)


@dataclass
class Counters:
    """What this process's log did (``written`` counts records, not replays)."""

    written: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Health:
    """The log's state for a status line: where it writes and what is outstanding."""

    enabled: bool
    database: str
    available: bool | None  # None: not tried yet in this process
    last_error: str
    spool: str
    pending: int  # records in the spool, waiting for the database
    rejected: int  # records the database refused (in <spool>.rejected)
    counters: Counters = field(default_factory=Counters)


# ---------------------------------------------------------------- what is recorded


def new_id() -> str:
    """A record id: 48-bit milliseconds then 80 random bits, 32 hex digits (time-ordered,
    so the primary key index grows at its end)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def new_session_id() -> str:
    """A per-tab or per-batch id (random, says nothing about who or what)."""
    return secrets.token_hex(8)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _canonical_sha256(obj: Any) -> str:
    """SHA-256 of a JSON-able structure in canonical form (sorted keys, exact floats); NumPy
    arrays are hashed by dtype, shape and bytes."""
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if hasattr(o, "dtype") and hasattr(o, "tobytes"):
            import numpy as np

            a = np.ascontiguousarray(o)
            h.update(f"array:{a.dtype.str}:{a.shape}:".encode())
            h.update(a.tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(json.dumps(str(k)).encode() + b":")
                feed(o[k])
                h.update(b",")
            h.update(b"}")
        elif isinstance(o, list | tuple):
            h.update(b"[")
            for v in o:
                feed(v)
                h.update(b",")
            h.update(b"]")
        elif isinstance(o, float):
            h.update(float(o).hex().encode())
        else:
            h.update(json.dumps(o, default=str).encode())

    feed(obj)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """The run that answered: made once per loaded predictor (:meth:`from_predictor`)."""

    run_id: str | None
    weights_sha256: str | None
    calibration_sha256: str | None
    statistics_sha256: str | None
    runtime: str | None
    precision: str | None  # the predictor's; a record's comes from the network that answered it
    operating_class: str | None = None
    threshold: float | None = None

    @classmethod
    def from_predictor(cls, predictor: Any, run_id: str | None = None) -> ModelIdentity:
        """Hashes of what answered: ``weights_sha256`` is the SHA-256 of the checkpoint file
        (``best.pt``, as ``run.json`` states it); ``calibration_sha256`` and
        ``statistics_sha256`` those of its sidecar files ``best.calibration.json`` and
        ``best.ood.safetensors`` (:mod:`core.sidecars`). For an older run that keeps these
        inside ``best.pt``, they are the SHA-256 of the values in use instead (temperature and
        operating point; OOD statistics and the OOD and low-confidence cut-offs)."""
        from core.sidecars import sidecar_path

        source = Path(str(getattr(predictor, "source", "") or ""))
        weights = None
        if source.is_file():
            weights = _file_sha256(source)
        if run_id is None and source.name:
            run_id = _run_id(source)
        op = predictor.operating_point
        calibration = stats = None
        if source.name and sidecar_path(source, "calibration").is_file():
            calibration = _file_sha256(sidecar_path(source, "calibration"))
        elif predictor.calibrated or op:
            calibration = _canonical_sha256({"temperature": float(predictor.temperature),
                                             "calibrated": bool(predictor.calibrated),
                                             "operating_point": dict(op) if op else None})
        if source.name and sidecar_path(source, "ood").is_file():
            stats = _file_sha256(sidecar_path(source, "ood"))
        elif predictor.has_ood or predictor.has_low_confidence:
            stats = _canonical_sha256({"ood": predictor.ood_stats,
                                       "ood_threshold": float(predictor.ood_threshold),
                                       "low_confidence_threshold":
                                           float(predictor.low_confidence_threshold)})
        # Predictor.network names the runtime and precision that answer, e.g. "onnx-fp32"
        network = str(predictor.network)
        runtime, _, precision = network.rpartition("-")
        device = getattr(predictor, "device", None)
        if device is not None:
            runtime = f"{runtime or network} on {getattr(device, 'type', device)}"
        return cls(run_id=run_id, weights_sha256=weights, calibration_sha256=calibration,
                   statistics_sha256=stats, runtime=str(runtime)[:64],
                   precision=precision or None,
                   operating_class=str(op["class"]) if op else None,
                   threshold=float(op["threshold"]) if op else None)


_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, cached by path, size and modification time."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key not in _HASH_CACHE:
            from core.files import file_sha256

            _HASH_CACHE[key] = file_sha256(path)
        return _HASH_CACHE[key]


def _run_id(checkpoint: Path) -> str:
    """The run's name as the dashboard shows it (its folder under the models folder)."""
    from core.runs import models_dir

    folder = checkpoint.resolve().parent
    try:
        return folder.relative_to(models_dir().resolve()).as_posix()
    except ValueError:
        return folder.name


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def sniff_format(head: bytes, name: str | None = None) -> str:
    """The input's format from its first bytes (``name``'s ``.dcm`` suffix, as the decoder
    uses it, for DICOM files without a preamble; the name is not kept)."""
    if head[128:132] == b"DICM":
        return "DICOM"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if name and name.lower().endswith((".dcm", ".dicom")):
        return "DICOM"
    return "unknown"


def describe_input(source: bytes | bytearray | memoryview | str | os.PathLike[str] | None,
                   name: str | None = None) -> tuple[str | None, str | None]:
    """(SHA-256 of the bytes, format) of an input given as bytes or a path; (None, None) for
    a path that cannot be read (e.g. missing) or an input that is not a file's bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return hashlib.sha256(data).hexdigest(), sniff_format(data[:132], name)
    if isinstance(source, str | os.PathLike):
        from core.files import file_sha256

        path = Path(source)
        try:
            with path.open("rb") as fh:
                head = fh.read(132)
            digest = file_sha256(path)
        except OSError:
            return None, None
        return digest, sniff_format(head, name or path.name)
    return None, None


_FILE_TOKEN = re.compile(r"[^\s'\"()\[\]<>]*\.(?:png|jpe?g|bmp|tiff?|dcm|dicom)\b", re.IGNORECASE)


def scrub(message: str, names: Sequence[str | os.PathLike[str] | None] = ()) -> str:
    """``message`` without file names: each of ``names`` (as given, its base name and its
    stem) and anything that looks like an image file's name become ``[file]``."""
    out = str(message)
    variants: set[str] = set()
    for n in names:
        if not n:
            continue
        p = Path(str(n))
        variants.update({str(n), p.name, p.stem} if len(p.stem) >= 3 else {str(n), p.name})
    for v in sorted(variants, key=len, reverse=True):
        if v:
            out = out.replace(v, "[file]")
    out = _FILE_TOKEN.sub("[file]", out)
    return out[:MAX_MESSAGE]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def prediction_row(prediction: Any, *, model: ModelIdentity, input_sha256: str | None,
                   input_format: str | None, source: str, session_id: str | None,
                   user: str | None = None, lung_focus: float | None = None,
                   size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The record of one :class:`core.inference.Prediction` (``size``: (height, width), by
    default the prediction's ``original_size``)."""
    h, w = size or prediction.original_size
    return {**_base_row("prediction", model, source, session_id, user),
            "input_sha256": input_sha256, "input_format": input_format,
            "width": int(w), "height": int(h),
            "predicted_class": prediction.label,
            "probabilities": {str(k): float(v) for k, v in prediction.probabilities.items()},
            "confidence": float(prediction.confidence),
            "decision": prediction.decision,
            "precision": prediction.network.rpartition("-")[2] or model.precision,
            "low_confidence": bool(prediction.low_confidence),
            "ood": bool(prediction.ood),
            "ood_score": _finite(prediction.ood_score),
            "lung_focus": _finite(lung_focus)}


def refusal_row(error: BaseException, *, model: ModelIdentity | None, input_sha256: str | None,
                input_format: str | None, source: str, session_id: str | None,
                user: str | None = None, names: Sequence[str | None] = ()) -> dict[str, Any]:
    """The record of an input that was refused (its message scrubbed of ``names``)."""
    return {**_base_row("refusal", model, source, session_id, user),
            "input_sha256": input_sha256, "input_format": input_format,
            "precision": model.precision if model else None,
            "error_class": type(error).__name__[:64],
            "error_message": scrub(str(error), names)}


def _base_row(kind: str, model: ModelIdentity | None, source: str, session_id: str | None,
              user: str | None) -> dict[str, Any]:
    from core.audit.models import SOURCES

    if source not in SOURCES:
        raise ValueError(f"source={source!r}; choose one of {', '.join(SOURCES)}")
    m = model or ModelIdentity(None, None, None, None, None, None)
    return {"id": new_id(), "created_at": utcnow(), "kind": kind, "source": source,
            "session_id": session_id, "user_name": user[:255] if user else None,
            "run_id": m.run_id, "weights_sha256": m.weights_sha256,
            "calibration_sha256": m.calibration_sha256,
            "statistics_sha256": m.statistics_sha256, "runtime": m.runtime,
            "operating_class": m.operating_class, "threshold": m.threshold}


def _to_json(row: dict[str, Any]) -> str:
    return json.dumps({k: (v.isoformat() if isinstance(v, dt.datetime) else v)
                       for k, v in row.items()}, separators=(",", ":"), allow_nan=False)


_COLUMNS = {c.name for c in records.columns}
_EMPTY_ROW: dict[str, Any] = dict.fromkeys(sorted(_COLUMNS))


def _from_json(line: bytes) -> dict[str, Any]:
    row = json.loads(line)
    if not isinstance(row, dict) or not row.get("id") or set(row) - _COLUMNS:
        raise ValueError("not an audit record")
    row["created_at"] = dt.datetime.fromisoformat(row["created_at"])
    return _complete(row)


def _complete(row: dict[str, Any]) -> dict[str, Any]:
    """Every column present (None where not given): one statement serves mixed batches."""
    return {**_EMPTY_ROW, **row}


# ---------------------------------------------------------------- the spool file


class Spool:
    """The local JSON-lines file that holds records the database could not take.

    Appends are one ``write`` on an ``O_APPEND`` descriptor, then ``fsync``, under a shared
    ``flock`` (many writers at once); a replay holds the exclusive lock from reading to
    truncating, so no line is appended in between and lost."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rejected_path = self.path.with_name(self.path.name + ".rejected")

    @contextlib.contextmanager
    def _locked(self, path: Path, flags: int, shared: bool) -> Iterator[int]:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        fd = os.open(path, flags | os.O_CREAT, 0o600)
        try:
            if not existed:  # the new directory entry must survive a crash too
                _fsync_dir(path.parent)
            _flock(fd, shared)
            yield fd
        finally:
            os.close(fd)  # also releases the lock

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        self._append(self.path, "".join(_to_json(r) + "\n" for r in rows).encode())

    def _append(self, path: Path, data: bytes) -> None:
        with self._locked(path, os.O_WRONLY | os.O_APPEND, shared=True) as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)

    def reject(self, lines: Sequence[bytes], reason: str) -> None:
        stamp = utcnow().isoformat()
        self._append(self.rejected_path, b"".join(
            json.dumps({"rejected_at": stamp, "reason": reason,
                        "line": line.decode("utf-8", "replace")}).encode() + b"\n"
            for line in lines))

    def has_pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def pending(self) -> int:
        return _count_lines(self.path)

    def rejected(self) -> int:
        return _count_lines(self.rejected_path)

    @contextlib.contextmanager
    def draining(self) -> Iterator[tuple[list[bytes], Any]]:
        """(the spool's lines, ``done()``) under the exclusive lock; ``done()`` empties it."""
        with self._locked(self.path, os.O_RDWR, shared=False) as fd:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            lines = [ln for ln in b"".join(chunks).split(b"\n") if ln.strip()]

            def done() -> None:
                os.ftruncate(fd, 0)
                os.fsync(fd)

            yield lines, done


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for ln in fh if ln.strip())
    except FileNotFoundError:
        return 0


def _flock(fd: int, shared: bool) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: appends are still single writes on an O_APPEND file
        return
    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the log


def audit_enabled() -> bool:
    """``CXR_AUDIT`` unset or anything but 0/off/false/no: the log is on."""
    return os.environ.get("CXR_AUDIT", "1").strip().lower() not in OFF_VALUES


def default_spool_path() -> Path:
    return Path(os.environ.get("CXR_AUDIT_SPOOL") or db.data_dir() / db.SPOOL_FILE)


class AuditLog:
    """The audit log of one process (thread-safe; share one per process).

    ``url``: an SQLAlchemy URL (see :mod:`core.audit.engine`); ``enabled=False``: every
    ``record_*`` returns ``off``. The database is opened, and its schema upgraded, on first
    use."""

    def __init__(self, url: str | None = None, *, enabled: bool = True,
                 spool_path: str | Path | None = None,
                 retry_after_s: float = RETRY_AFTER_S) -> None:
        self.enabled = enabled
        self.url = db.normalise_url(url) if url else db.default_url()
        self.spool = Spool(spool_path or default_spool_path())
        self.retry_after_s = retry_after_s
        self.counters = Counters()
        self._engine: Engine | None = None
        self._ready = False
        self._lock = threading.Lock()  # opening and counters
        self._replay_lock = threading.Lock()
        self._down_since: float | None = None
        self._last_error = ""
        self._stmt: Any = None

    @classmethod
    def from_env(cls) -> AuditLog:
        """The deployment's log: ``CXR_AUDIT`` (on unless 0/off/false/no), ``CXR_DB_URL``
        (default: SQLite in the data folder), ``CXR_AUDIT_SPOOL``."""
        return cls(enabled=audit_enabled())

    @property
    def database(self) -> str:
        return db.describe(self.url)

    @property
    def engine(self) -> Engine:
        """The engine, schema upgraded on first use (raises the database's errors)."""
        with self._lock:
            if self._engine is None:
                self._engine = db.make_engine(self.url)
            if not self._ready:
                db.ensure_schema(self._engine)
                self._ready = True
                self._stmt = _insert_stmt(self._engine)
            return self._engine

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine, self._ready = None, False

    # -- writing

    def record_prediction(self, prediction: Any, *, model: ModelIdentity, input: Any,
                          source: str, session_id: str | None = None, user: str | None = None,
                          fmt: str | None = None, name: str | None = None,
                          lung_focus: float | None = None,
                          size: tuple[int, int] | None = None) -> AuditResult:
        """Record a prediction; returns after the record is committed (or spooled).

        ``input``: the image file's bytes or path (only its SHA-256 and format are kept);
        ``fmt``: its format when known (else read from its first bytes); ``name``: the file
        name, used only to tell a DICOM by its suffix; ``lung_focus``: where a heatmap was
        made; ``size``: (height, width), by default the prediction's."""
        if not self.enabled:
            return AuditResult(AuditStatus.OFF)
        digest, sniffed = describe_input(input, name)
        row = prediction_row(prediction, model=model, input_sha256=digest,
                             input_format=fmt or sniffed, source=source,
                             session_id=session_id, user=user, lung_focus=lung_focus, size=size)
        return self.write(row)

    def record_refusal(self, error: BaseException, *, input: Any, source: str,
                       model: ModelIdentity | None = None, session_id: str | None = None,
                       user: str | None = None, name: str | None = None) -> AuditResult:
        """Record an input that was refused: its SHA-256 and format, the error's class and
        message (``name``, the file's name, is scrubbed from the message and not kept)."""
        if not self.enabled:
            return AuditResult(AuditStatus.OFF)
        digest, sniffed = describe_input(input, name)
        names = [name, str(input) if isinstance(input, str | os.PathLike) else None]
        row = refusal_row(error, model=model, input_sha256=digest, input_format=sniffed,
                          source=source, session_id=session_id, user=user, names=names)
        return self.write(row)

    def record_result(self, result: Any, *, input: Any, source: str,
                      model: ModelIdentity | None, session_id: str | None = None,
                      user: str | None = None, name: str | None = None,
                      fmt: str | None = None) -> AuditResult:
        """One call per image for what a :class:`core.inference.Predictor` gave: a
        ``Prediction``, an ``Explanation`` (its prediction and lung focus are recorded) or the
        exception in the image's place (``on_error="return"``): a refusal."""
        if not self.enabled:
            return AuditResult(AuditStatus.OFF)
        if isinstance(result, BaseException):
            return self.record_refusal(result, input=input, source=source, model=model,
                                       session_id=session_id, user=user, name=name)
        if model is None:
            raise ValueError("record_result needs the ModelIdentity of the predictor")
        prediction = getattr(result, "prediction", result)
        return self.record_prediction(prediction, model=model, input=input, source=source,
                                      session_id=session_id, user=user, fmt=fmt, name=name,
                                      lung_focus=getattr(result, "lung_focus", None))

    def predict(self, predictor: Any, data: bytes, *, model: ModelIdentity,
                source: str = "api", session_id: str | None = None, user: str | None = None,
                name: str | None = None) -> tuple[Any, AuditResult]:
        """``predictor.predict`` on a file's bytes, recorded before it is returned: for any
        caller of :class:`core.inference.Predictor` that opts in. A refused input is recorded
        and its :class:`~core.errors.InvalidImageError` raised."""
        from core.errors import InvalidImageError

        try:
            prediction = predictor.predict(data, name=name)
        except InvalidImageError as err:
            self.record_refusal(err, input=data, source=source, model=model,
                                session_id=session_id, user=user, name=name)
            raise
        return prediction, self.record_prediction(prediction, model=model, input=data,
                                                  source=source, session_id=session_id,
                                                  user=user, name=name)

    def write(self, row: dict[str, Any]) -> AuditResult:
        """Commit one record (a row as :func:`prediction_row` makes it), else spool it."""
        return self.write_many([row])

    def write_many(self, rows: Sequence[dict[str, Any]]) -> AuditResult:
        """Commit records in one transaction (batch logging), else spool them all."""
        if not self.enabled:
            return AuditResult(AuditStatus.OFF)
        rows = [_complete(r) for r in rows]
        first = rows[0]["id"] if rows else None
        if self._should_try():
            try:
                engine = self.engine
                with engine.begin() as conn:
                    conn.execute(self._stmt, rows)
            except _DOWN_ERRORS as err:
                self._mark_down(err)
            else:
                self._mark_up(len(rows))
                if self.spool.has_pending():
                    self._replay_quietly()
                return AuditResult(AuditStatus.WRITTEN, first)
        try:
            self.spool.append(rows)
        except OSError as err:
            with self._lock:
                self.counters.failed += len(rows)
            log.error("AUDIT RECORD LOST: %d record(s) could neither be written to %s (%s) nor "
                      "spooled to %s (%s)", len(rows), self.database, self._last_error,
                      self.spool.path, err.strerror or type(err).__name__)
            return AuditResult(AuditStatus.FAILED, first,
                               "This prediction could not be recorded in the audit log: the "
                               f"database is unavailable ({self._last_error}) and the local "
                               f"spool file cannot be written ({err.strerror or err}). Tell "
                               "the administrator.")
        with self._lock:
            self.counters.spooled += len(rows)
        log.info("Audit database unavailable (%s): %d record(s) spooled to %s",
                 self._last_error, len(rows), self.spool.path)
        return AuditResult(AuditStatus.SPOOLED, first,
                           "The audit database is unavailable, so this prediction was recorded "
                           "in the local spool file instead; it will be written to the "
                           f"database when it is back ({self._last_error}).")

    def _should_try(self) -> bool:
        down = self._down_since
        return down is None or time.monotonic() - down >= self.retry_after_s

    def _mark_down(self, err: BaseException) -> None:
        text = error_text(err)
        with self._lock:
            if self._down_since is None or self._last_error != text:
                log.warning("Audit database %s unavailable: %s; records go to the spool %s "
                            "until it is back", self.database, text, self.spool.path)
            self._down_since = time.monotonic()
            self._last_error = text

    def _mark_up(self, n: int) -> None:
        with self._lock:
            self.counters.written += n
            if self._down_since is not None:
                log.info("Audit database %s is available again", self.database)
            self._down_since = None

    # -- replaying the spool

    def _replay_quietly(self) -> None:
        try:
            self.replay()
        except _DOWN_ERRORS as err:  # stays in the spool for the next attempt
            self._mark_down(err)

    def replay(self) -> tuple[int, int]:
        """Write the spooled records into the database (idempotent: records already there are
        skipped); lines that cannot be parsed or that the database refuses are moved to
        ``<spool>.rejected``. Returns (replayed, rejected). Raises the database's error when
        it is still unavailable (the spool is then left as it was)."""
        if not self.spool.has_pending():
            return 0, 0
        with self._replay_lock, self.spool.draining() as (lines, done):
            good: list[tuple[bytes, dict[str, Any]]] = []
            bad: list[bytes] = []
            for line in lines:
                try:
                    good.append((line, _from_json(line)))
                except (ValueError, TypeError, KeyError):
                    bad.append(line)
            engine = self.engine
            replayed, refused = 0, []
            for start in range(0, len(good), REPLAY_BATCH):
                batch = good[start : start + REPLAY_BATCH]
                try:
                    replayed += self._insert_replayed(engine, [r for _, r in batch])
                except _REFUSED_ERRORS:  # find the culprits one by one
                    for line, row in batch:
                        try:
                            replayed += self._insert_replayed(engine, [row])
                        except _REFUSED_ERRORS:
                            refused.append(line)
            rejected = bad + refused
            if rejected:
                self.spool.reject(rejected, "unparseable line or refused by the database")
                with engine.begin() as conn:
                    conn.execute(insert(incidents), [{
                        "id": new_id(), "created_at": utcnow(), "kind": "rejected",
                        "count": len(rejected), "first_at": None, "last_at": None,
                        "detail": f"{len(rejected)} spooled line(s) could not be written; kept "
                                  f"in {self.spool.rejected_path.name}"}])
                log.error("AUDIT RECORDS REJECTED: %d spooled line(s) could not be written to "
                          "the database; kept in %s", len(rejected), self.spool.rejected_path)
            done()
        with self._lock:
            self.counters.replayed += replayed
            self.counters.rejected += len(rejected)
        log.info("Replayed %d spooled audit record(s) into %s", replayed, self.database)
        return replayed, len(rejected)

    def _insert_replayed(self, engine: Engine, rows: list[dict[str, Any]]) -> int:
        """Insert spooled rows and their ``replayed`` incident in one transaction."""
        times = [r["created_at"] for r in rows]
        with engine.begin() as conn:
            conn.execute(self._stmt, rows)
            conn.execute(insert(incidents), [{
                "id": new_id(), "created_at": utcnow(), "kind": "replayed", "count": len(rows),
                "first_at": min(times), "last_at": max(times),
                "detail": f"{len(rows)} record(s) spooled while the database was unavailable "
                          "and written late"}])
        return len(rows)

    # -- state

    def health(self) -> Health:
        """Where the log writes and what is outstanding (for a status line)."""
        if not self.enabled:
            return Health(False, self.database, None, "", str(self.spool.path), 0, 0,
                          dataclasses.replace(self.counters))
        available = None if self._engine is None and self._down_since is None else \
            self._down_since is None
        return Health(True, self.database, available, self._last_error, str(self.spool.path),
                      self.spool.pending(), self.spool.rejected(),
                      dataclasses.replace(self.counters))

    def check(self) -> bool:
        """Open the database now (creating or upgrading its schema) and replay the spool into
        it; False, with the reason in ``health().last_error``, when it is unavailable."""
        if not self.enabled:
            return False
        try:
            with self.engine.connect().execution_options(sqlite_deferred=True) as conn:
                conn.exec_driver_sql("SELECT 1")
        except _DOWN_ERRORS as err:
            self._mark_down(err)
            return False
        with self._lock:
            self._down_since = None
        if self.spool.has_pending():
            self._replay_quietly()
        return True


def _insert_stmt(engine: Engine) -> Any:
    """``INSERT ... ON CONFLICT (id) DO NOTHING`` on SQLite and PostgreSQL."""
    name = engine.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        raise db.AuditSchemaError(f"The audit log supports SQLite and PostgreSQL, not {name}.")
    return dialect_insert(records).on_conflict_do_nothing(index_elements=["id"])


def error_text(err: BaseException) -> str:
    """A short reason (the driver's first line; never the statement's parameters)."""
    orig = getattr(err, "orig", None)
    base = orig if orig is not None else err
    text = str(base).strip().splitlines()[0] if str(base).strip() else ""
    return f"{type(base).__name__}: {text}"[:300] if text else type(base).__name__
