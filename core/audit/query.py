"""Reading the audit log: filtered records, counts per day and class, drift against the run's
test figures, CSV export, statistics and retention (purge). Used by the Audit page and
``python -m core.audit``; SQL that runs unchanged on SQLite and PostgreSQL.

Days are UTC days. A date range ``since``..``until`` includes both days.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import Engine, case, delete, func, select

from core.audit.models import incidents, records

REFUSED = "(refused)"
"""The class label under which refusals are counted in per-class figures."""
EXPORT_COLUMNS = ("id", "created_at", "kind", "source", "session_id", "user_name", "run_id",
                  "weights_sha256", "calibration_sha256", "statistics_sha256", "runtime",
                  "precision", "input_sha256", "input_format", "width", "height",
                  "predicted_class", "confidence", "decision", "operating_class", "threshold",
                  "low_confidence", "ood", "ood_score", "lung_focus", "error_class",
                  "error_message")


@dataclass(frozen=True)
class Filters:
    """Which records: a UTC date range (inclusive), runs, predicted classes (``REFUSED``
    selects refusals), and flags (True: only flagged; None: either)."""

    since: dt.date | None = None
    until: dt.date | None = None
    runs: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    ood: bool | None = None
    low_confidence: bool | None = None

    def where(self) -> list[Any]:
        c = records.c
        out: list[Any] = []
        if self.since is not None:
            out.append(c.created_at >= day_start(self.since))
        if self.until is not None:
            out.append(c.created_at < day_start(self.until + dt.timedelta(days=1)))
        if self.runs:
            out.append(c.run_id.in_(list(self.runs)))
        if self.classes:
            named = [k for k in self.classes if k != REFUSED]
            cond = c.predicted_class.in_(named)
            if REFUSED in self.classes:
                cond = cond | (c.kind == "refusal")
            out.append(cond)
        if self.ood is not None:
            out.append(c.ood.is_(self.ood))
        if self.low_confidence is not None:
            out.append(c.low_confidence.is_(self.low_confidence))
        return out


def day_start(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)


def _reader(engine: Engine) -> Any:
    return engine.connect().execution_options(sqlite_deferred=True)


def _flag(col: Any) -> Any:
    """1 where a boolean column is true, else 0 (summable on both engines)."""
    return case((col.is_(True), 1), else_=0)


def _day() -> Any:
    return func.date(records.c.created_at)


def _as_date(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values.astype(str)).dt.date


# ---------------------------------------------------------------- records


def load_records(engine: Engine, filters: Filters = Filters(), limit: int | None = None,
                 classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Records newest first, one column per field of :data:`EXPORT_COLUMNS` and one
    ``prob_<class>`` per class (``classes``, else every class found)."""
    cols = [records.c[n] for n in EXPORT_COLUMNS] + [records.c.probabilities]
    stmt = select(*cols).where(*filters.where()).order_by(records.c.created_at.desc(),
                                                          records.c.id.desc())
    if limit:
        stmt = stmt.limit(limit)
    with _reader(engine) as conn:
        rows = conn.execute(stmt).mappings().all()
    df = pd.DataFrame([dict(r) for r in rows], columns=[*EXPORT_COLUMNS, "probabilities"])
    probs = df.pop("probabilities")
    names = list(classes) if classes is not None else sorted(
        {k for p in probs if isinstance(p, dict) for k in p})
    for k in names:
        df[f"prob_{k}"] = [p.get(k) if isinstance(p, dict) else None for p in probs]
    if len(df):
        df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    return df


def to_csv(df: pd.DataFrame) -> bytes:
    """The records as CSV (UTC times in ISO 8601)."""
    out = df.copy()
    if "created_at" in out and len(out):
        out["created_at"] = out["created_at"].map(lambda t: t.isoformat())
    buf = io.StringIO()
    out.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue().encode()


def choices(engine: Engine) -> dict[str, list[str]]:
    """The runs and predicted classes present (for filter widgets)."""
    with _reader(engine) as conn:
        runs = conn.execute(select(records.c.run_id).distinct()
                            .where(records.c.run_id.is_not(None))).scalars().all()
        classes = conn.execute(select(records.c.predicted_class).distinct()
                               .where(records.c.predicted_class.is_not(None))).scalars().all()
    return {"runs": sorted(runs), "classes": sorted(classes)}


def date_bounds(engine: Engine) -> tuple[dt.date, dt.date] | None:
    """The first and last UTC day with a record (None when the log is empty)."""
    with _reader(engine) as conn:
        lo, hi = conn.execute(select(func.min(records.c.created_at),
                                     func.max(records.c.created_at))).one()
    if lo is None:
        return None
    return lo.date(), hi.date()


# ---------------------------------------------------------------- aggregations


def daily_counts(engine: Engine, filters: Filters = Filters()) -> pd.DataFrame:
    """Records per UTC day and predicted class (refusals as :data:`REFUSED`): columns
    ``day``, ``predicted_class``, ``count``."""
    label = func.coalesce(records.c.predicted_class, REFUSED)
    stmt = (select(_day().label("day"), label.label("predicted_class"),
                   func.count().label("count"))
            .where(*filters.where()).group_by(_day(), label).order_by(_day(), label))
    with _reader(engine) as conn:
        df = pd.DataFrame(conn.execute(stmt).all(), columns=["day", "predicted_class", "count"])
    if len(df):
        df["day"] = _as_date(df["day"])
        df["count"] = df["count"].astype(int)
    return df


def drift(engine: Engine, filters: Filters = Filters()) -> pd.DataFrame:
    """Per UTC day, over predictions only: ``predictions``, ``ood_share`` and
    ``low_confidence_share``, and ``share_<class>`` for each predicted class."""
    c = records.c
    preds = [*filters.where(), c.kind == "prediction"]
    stmt = (select(_day().label("day"), func.count().label("n"),
                   func.sum(_flag(c.ood)).label("ood"),
                   func.sum(_flag(c.low_confidence)).label("low"))
            .where(*preds).group_by(_day()).order_by(_day()))
    per_class = (select(_day().label("day"), c.predicted_class, func.count().label("n"))
                 .where(*preds).group_by(_day(), c.predicted_class))
    with _reader(engine) as conn:
        days = pd.DataFrame(conn.execute(stmt).all(), columns=["day", "n", "ood", "low"])
        by_class = pd.DataFrame(conn.execute(per_class).all(), columns=["day", "cls", "n"])
    if not len(days):
        return pd.DataFrame(columns=["day", "predictions", "ood_share", "low_confidence_share"])
    days["day"] = _as_date(days["day"])
    out = pd.DataFrame({"day": days["day"], "predictions": days["n"].astype(int),
                        "ood_share": days["ood"].astype(float) / days["n"],
                        "low_confidence_share": days["low"].astype(float) / days["n"]})
    by_class["day"] = _as_date(by_class["day"])
    wide = by_class.pivot_table(index="day", columns="cls", values="n", fill_value=0)
    for k in sorted(wide.columns):
        share = wide[k] / wide.sum(axis=1)
        out[f"share_{k}"] = out["day"].map(share).fillna(0.0).astype(float)
    return out.reset_index(drop=True)


def test_reference(predictions: pd.DataFrame | None) -> dict[str, Any]:
    """The run's test figures to hold the drift against, from its per-image records
    (``report/predictions.csv``): ``n``, ``ood_share`` and ``low_confidence_share`` (None
    where the records lack those columns) and ``class_share`` of the predicted classes."""
    if predictions is None or not len(predictions):
        return {"n": 0, "ood_share": None, "low_confidence_share": None, "class_share": {}}

    def share(col: str) -> float | None:
        if col not in predictions:
            return None
        v = predictions[col].map(lambda x: str(x).strip().lower() in ("true", "1", "1.0"))
        return float(v.mean())

    counts = predictions["predicted_class"].value_counts(normalize=True)
    return {"n": int(len(predictions)), "ood_share": share("ood"),
            "low_confidence_share": share("low_confidence"),
            "class_share": {str(k): float(v) for k, v in counts.sort_index().items()}}


def stats(engine: Engine, filters: Filters = Filters()) -> dict[str, Any]:
    """Totals: records, predictions, refusals, first and last time, per class, per source,
    per run, flag shares among predictions, and the incidents (records written late from the
    spool, records rejected)."""
    c = records.c
    where = filters.where()
    with _reader(engine) as conn:
        total, preds, ood, low, first, last = conn.execute(
            select(func.count(), func.sum(case((c.kind == "prediction", 1), else_=0)),
                   func.sum(_flag(c.ood)), func.sum(_flag(c.low_confidence)),
                   func.min(c.created_at), func.max(c.created_at)).where(*where)).one()

        def grouped(col: Any) -> dict[str, int]:
            label = func.coalesce(col, REFUSED if col is c.predicted_class else "(none)")
            rows = conn.execute(select(label, func.count()).where(*where).group_by(label)
                                .order_by(label)).all()
            return {str(k): int(n) for k, n in rows}

        per_class = grouped(c.predicted_class)
        per_source = grouped(c.source)
        per_run = grouped(c.run_id)
        inc = conn.execute(select(incidents.c.kind, func.sum(incidents.c.count))
                           .group_by(incidents.c.kind)).all()
    preds = int(preds or 0)
    return {"records": int(total), "predictions": preds, "refusals": int(total) - preds,
            "first": first.isoformat() if first else None,
            "last": last.isoformat() if last else None,
            "ood_share": (int(ood or 0) / preds) if preds else None,
            "low_confidence_share": (int(low or 0) / preds) if preds else None,
            "per_class": per_class, "per_source": per_source, "per_run": per_run,
            "incidents": {str(k): int(n or 0) for k, n in inc}}


# ---------------------------------------------------------------- retention


def purge(engine: Engine, before: dt.date, dry_run: bool = False) -> int:
    """Delete the records (and incidents) older than ``before`` (00:00 UTC of that day);
    returns the number of records deleted (or that would be, with ``dry_run``)."""
    cut = day_start(before)
    with engine.begin() as conn:
        n = conn.execute(select(func.count()).where(records.c.created_at < cut)).scalar_one()
        if not dry_run:
            conn.execute(delete(records).where(records.c.created_at < cut))
            conn.execute(delete(incidents).where(incidents.c.created_at < cut))
    return int(n)


def count(engine: Engine) -> int:
    with _reader(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(records)).scalar_one())
