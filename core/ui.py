"""UI glue: the only module of ``core`` that imports Streamlit.

Cached loaders (a predictor is loaded once per process and shared by every session;
run artefacts are cached by path and modification time) and the small shared widgets that
every page uses: the disclaimer, the run picker, KPI cards with confidence intervals and the
empty states that stop a page with guidance instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from core import runs

DISCLAIMER = (
    "Research and education only. CXR Insight is not a medical device and must not be used "
    "for diagnosis or treatment decisions."
)
TRAIN_COMMAND = "python -m core.train --data-dir <dataset> --output models/<run>"

# One colour per class on every page: the Okabe-Ito palette (colour-blind safe).
CLASS_COLOURS = {
    "COVID": "#D55E00",  # vermillion
    "Lung_Opacity": "#E69F00",  # orange
    "Normal": "#0072B2",  # blue
    "Viral Pneumonia": "#009E73",  # bluish green
}
_SPARE_COLOURS = ("#CC79A7", "#56B4E9", "#F0E442", "#000000", "#999999")


def class_colours(classes: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The colour of each class: the database's classes keep theirs, others take the rest of
    the palette in order."""
    spare = iter(c for c in _SPARE_COLOURS)
    return {c: CLASS_COLOURS.get(c) or next(spare, "#999999") for c in classes}


def disclaimer() -> None:
    st.warning(DISCLAIMER, icon="⚠️")


@st.cache_resource(show_spinner="Loading the model…")
def load_predictor(checkpoint: str) -> Any:
    from core.inference import Predictor

    return Predictor.from_checkpoint(checkpoint)


@st.cache_data(show_spinner=False)
def load_report(path: str, mtime: float) -> dict[str, Any]:
    """``mtime`` is part of the cache key, so a rewritten report is read again."""
    return runs.read_json(path)


@st.cache_data(ttl=30, show_spinner=False)
def available_runs(models_dir: str) -> list[runs.RunInfo]:
    return runs.list_runs(models_dir)


@st.cache_data(show_spinner=False, max_entries=16)
def _load_run(path: str, stamp: tuple[float, ...]) -> runs.RunArtifacts:
    """``stamp`` (the files' modification times) is part of the key: a rewritten file is
    read again."""
    return runs.load_run(path)


def _stamp(run_dir: Path) -> tuple[float, ...]:
    files = ("best.pt", "run.json", "config.json", "history.json", "dataset.json", "int8.json",
             "report/metrics.json", "report/predictions.csv")
    return tuple((run_dir / f).stat().st_mtime if (run_dir / f).exists() else 0.0 for f in files)


def pick_run(models_dir: str | Path | None = None) -> runs.RunArtifacts | None:
    """Sidebar run selector (shared by every page through ``st.session_state['run']``);
    None when no run exists yet."""
    found = available_runs(str(models_dir or runs.models_dir()))
    if not found:
        return None
    names = [r.name for r in found]
    if st.session_state.get("run") not in names:
        st.session_state["run"] = names[0]
    choice = st.sidebar.selectbox("Model run", names, key="run",
                                  help="Runs found under models/, newest first.")
    info = found[names.index(choice)]
    return _load_run(str(info.path), _stamp(info.path))


def require_run() -> runs.RunArtifacts:
    """The selected run, or guidance and ``st.stop()`` when there is none."""
    run = pick_run()
    if run is None:
        st.info(f"No trained model yet. Train one with `{TRAIN_COMMAND}`; it appears here when "
                "`models/<run>/best.pt` exists.")
        st.stop()
    return run


def require_report(run: runs.RunArtifacts) -> dict[str, Any]:
    """The run's evaluation report, or guidance and ``st.stop()`` when it has none."""
    if run.report is None:
        st.info(f"Run **{run.name}** has no evaluation report yet. Write it with "
                f"`python -m core.evaluate --checkpoint {run.checkpoint}`.")
        st.stop()
    return run.report


def fmt_metric(item: Any, pct: bool = False) -> str:
    """A report metric ``{value, ci95}`` as text: ``0.912 [0.871, 0.945]``."""
    value = item.get("value") if isinstance(item, dict) else item
    if value is None:
        return "undefined"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    ci = item.get("ci95") if isinstance(item, dict) else None
    return f"{f(value)} [{f(ci[0])}, {f(ci[1])}]" if ci else f(value)


def kpi(column: Any, label: str, item: Any, pct: bool = False, help: str | None = None) -> None:
    """A KPI card: the value, and its 95% CI underneath."""
    value = item.get("value") if isinstance(item, dict) else item
    ci = item.get("ci95") if isinstance(item, dict) else None
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    column.metric(label, "undefined" if value is None else f(value), help=help)
    if ci:
        column.caption(f"95% CI {f(ci[0])} – {f(ci[1])}")


# ---- business impact ----

# Tornado bars: two Okabe-Ito colours that no class uses, so they are not read as classes.
TORNADO_COLOURS = {"low": "#56B4E9", "high": "#CC79A7"}  # sky blue, reddish purple


def roi_input(container: Any, spec: dict[str, Any]) -> float:
    """A number input built from one of :func:`core.roi.input_fields` (label, bounds, step,
    format, help), keyed ``roi_<name>``."""
    if spec["integer"]:
        bounds: dict[str, Any] = {"min_value": int(spec["lo"]), "value": int(spec["default"]),
                                  "step": 1, "format": "%d"}
        if spec["hi"] is not None:
            bounds["max_value"] = int(spec["hi"])
    else:
        bounds = {"min_value": float(spec["lo"]), "value": float(spec["default"]),
                  "step": float(spec["step"]), "format": spec["format"]}
        if spec["hi"] is not None:
            bounds["max_value"] = float(spec["hi"])
    return container.number_input(spec["label"], help=spec["help"], key=f"roi_{spec['name']}",
                                  **bounds)


def tornado_chart(bars: list[Any], base_npv: float, swing: float = 0.3) -> Any:
    """A Plotly tornado chart of :func:`core.roi.tornado`'s bars: NPV with each input moved
    down and up by ``swing``, widest spread on top, around the base NPV. Draw it with
    ``theme=None`` so that its larger, darker axis labels stay legible."""
    import plotly.graph_objects as go

    from core.roi import money

    def fmt(v: float) -> str:
        return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.0f}"

    axis_font = {"size": 14, "color": "#262730"}
    labels = [f"{b.label}: {fmt(b.low_value)} to {fmt(b.high_value)}" for b in bars]
    fig = go.Figure()
    for key, name, attr in (("low", f"Input −{swing:.0%}", "npv_low"),
                            ("high", f"Input +{swing:.0%}", "npv_high")):
        values = [getattr(b, attr) for b in bars]
        fig.add_trace(go.Bar(
            y=labels, x=[v - base_npv for v in values], base=base_npv, orientation="h",
            name=name, marker_color=TORNADO_COLOURS[key],
            customdata=[money(v) for v in values],
            hovertemplate="%{y}<br>NPV %{customdata}<extra>" + name + "</extra>"))
    fig.add_vline(x=base_npv, line_color="#000000", line_width=1.5)
    fig.update_layout(template="plotly_white", barmode="overlay", height=140 + 34 * len(bars),
                      margin={"l": 10, "r": 20, "t": 70, "b": 10}, font={"size": 14},
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0,
                              "yanchor": "bottom", "font": axis_font},
                      xaxis={"title": {"text": f"Net present value; the black line is the base, {money(base_npv)}",
                                       "font": axis_font},
                             "tickformat": "$.3~s", "tickfont": axis_font},
                      yaxis={"autorange": "reversed", "tickfont": axis_font, "automargin": True})
    return fig


def change_metric(column: Any, label: str, value: float, baseline: float,
                  help: str | None = None) -> None:
    """A count per 1,000 reads with its change against ``baseline`` (fewer is better: green
    down, red up; grey when unchanged at one decimal)."""
    delta = round(value - baseline, 1)
    column.metric(label, f"{value:.1f}", delta=f"{delta:+.1f}" if delta else "no change",
                  delta_color="inverse" if delta else "off",
                  delta_arrow="auto" if delta else "off", help=help)


# ---- audit ----

AUDIT_TABLE_ROWS = 1000
"""The Audit page's table shows at most this many records (the CSV has them all)."""
REFUSED_COLOUR = "#999999"  # grey: refusals are not a class
_AUDITED_KEY = "_audit_recorded"
_AUDIT_SESSION_KEY = "_audit_session_id"


def _audit_settings() -> tuple[bool, str, str]:
    from core.audit.engine import default_url
    from core.audit.log import audit_enabled, default_spool_path

    return audit_enabled(), default_url(), str(default_spool_path())


@st.cache_resource(show_spinner=False)
def _audit_log(enabled: bool, url: str, spool: str) -> Any:
    from core.audit import AuditLog

    return AuditLog(url, enabled=enabled, spool_path=spool)


def audit_log() -> Any:
    """The deployment's :class:`core.audit.AuditLog` (``CXR_AUDIT``, ``CXR_DB_URL``,
    ``CXR_AUDIT_SPOOL``), one per process and settings, shared by every session."""
    return _audit_log(*_audit_settings())


@st.cache_resource(show_spinner=False, max_entries=8)
def _model_identity(checkpoint: str, mtime: float, run_name: str, _predictor: Any) -> Any:
    """The loaded run's identity for its records (hashing best.pt once per file version)."""
    from core.audit import ModelIdentity

    return ModelIdentity.from_predictor(_predictor, run_id=run_name)


def audit_session_id() -> str:
    """This browser tab's id in the audit log (random; one Streamlit session per tab)."""
    if _AUDIT_SESSION_KEY not in st.session_state:
        from core.audit import new_session_id

        st.session_state[_AUDIT_SESSION_KEY] = new_session_id()
    return str(st.session_state[_AUDIT_SESSION_KEY])


def signed_in_user() -> str | None:
    """The signed-in user's e-mail (else name) where the deployment has sign-in (``st.user``);
    None otherwise."""
    user = st.user
    if not user.get("is_logged_in"):
        return None
    value = user.get("email") or user.get("name")
    return str(value) if value else None


def audit_results(predictor: Any, run: runs.RunArtifacts, files: list[Any],
                  results: list[tuple[str, Any]]) -> None:
    """Record each upload's result in the audit log before it is shown: once per tab, run
    and file content (a rerun that reuses a result does not record it again). Says so when
    the log is off, and warns when records went to the spool or could not be written."""
    import hashlib

    from core.audit import AuditStatus

    log = audit_log()
    if not log.enabled:
        st.caption("The audit log is off in this deployment (CXR_AUDIT=0): these predictions "
                   "are not recorded.")
        return
    model = _model_identity(str(run.checkpoint), run.checkpoint.stat().st_mtime, run.name,
                            predictor)
    done: dict[tuple[str, str], Any] = st.session_state.setdefault(_AUDITED_KEY, {})
    keep, statuses = set(), []
    for upload, (name, result) in zip(files, results, strict=True):
        data = upload.getvalue()
        key = (run.name, hashlib.sha256(data).hexdigest())
        keep.add(key)
        if key not in done:
            done[key] = log.record_result(result, input=data, name=name, source="app",
                                          model=model, session_id=audit_session_id(),
                                          user=signed_in_user())
        statuses.append(done[key])
    for stale in set(done) - keep:
        del done[stale]
    failed = [r for r in statuses if r.status is AuditStatus.FAILED]
    spooled = [r for r in statuses if r.status is AuditStatus.SPOOLED]
    if failed:
        st.error(f"{len(failed)} of {len(statuses)} result(s) below could not be recorded in "
                 f"the audit log. {failed[0].message}")
    if spooled:
        st.warning(f"{len(spooled)} of {len(statuses)} result(s) below were recorded in the "
                   f"audit log's local spool, not its database. {spooled[0].message}")


def require_audit_log() -> Any:
    """The audit log, open; or why not (off, or the database unavailable) and ``st.stop()``."""
    log = audit_log()
    if not log.enabled:
        st.info("The audit log is off in this deployment (CXR_AUDIT=0): predictions are not "
                "recorded. Unset CXR_AUDIT (or set it to 1) and restart the app to turn it on.")
        st.stop()
    if not log.check():
        health = log.health()
        st.error(f"The audit database {health.database} is unavailable "
                 f"({health.last_error}). Predictions are still recorded, in the local spool "
                 f"{health.spool}, and written to the database when it is back. Check "
                 "CXR_DB_URL and that the database server is running.")
        st.stop()
    return log


def audit_status(log: Any) -> None:
    """Warnings about records that are not in the database yet, or were rejected."""
    health = log.health()
    if health.pending:
        st.warning(f"{health.pending} record(s) wait in the spool {health.spool} for the "
                   "database; they are written with the next prediction, or now with "
                   "`python -m core.audit replay`.")
    if health.rejected:
        st.error(f"{health.rejected} spooled record(s) could not be written to the database "
                 f"and are kept in {health.spool}.rejected: see `python -m core.audit stats`.")


def _audit_layout(fig: Any, y_title: str, height: int = 360) -> Any:
    axis_font = {"size": 14, "color": "#262730"}
    fig.update_layout(template="plotly_white", height=height, font={"size": 14},
                      margin={"l": 10, "r": 20, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0,
                              "font": axis_font},
                      xaxis={"title": {"text": "Day (UTC)", "font": axis_font},
                             "tickfont": axis_font, "tickformat": "%d %b %Y"},
                      yaxis={"title": {"text": y_title, "font": axis_font},
                             "tickfont": axis_font})
    return fig


def audit_counts_chart(counts: Any, classes: list[str]) -> Any:
    """Stacked bars: records per UTC day and predicted class (refusals in grey), from
    :func:`core.audit.query.daily_counts`."""
    import plotly.graph_objects as go

    from core.audit.query import REFUSED

    found = [c for c in classes if c in set(counts["predicted_class"])]
    others = sorted(set(counts["predicted_class"]) - set(found) - {REFUSED})
    colours = {**class_colours([*found, *others]), REFUSED: REFUSED_COLOUR}
    fig = go.Figure()
    for cls in [*found, *others, REFUSED]:
        part = counts[counts["predicted_class"] == cls]
        if len(part):
            fig.add_trace(go.Bar(x=[str(d) for d in part["day"]], y=part["count"].tolist(),
                                 name=cls.replace("_", " "), marker_color=colours[cls],
                                 hovertemplate="%{x}: %{y}<extra>" + cls + "</extra>"))
    fig.update_layout(barmode="stack")
    fig.update_xaxes(type="date")
    return _audit_layout(fig, "Records")


def drift_flags_chart(drift: Any, reference: dict[str, Any]) -> Any:
    """Daily share of OOD and low-confidence flags, with the run's test shares as dashed
    lines (from :func:`core.audit.query.drift` and :func:`~core.audit.query.test_reference`)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    days = [str(d) for d in drift["day"]]
    # Two Okabe-Ito colours that no class uses.
    for col, name, colour in (("ood_share", "Out of distribution", "#CC79A7"),
                              ("low_confidence_share", "Low confidence", "#56B4E9")):
        fig.add_trace(go.Scatter(x=days, y=drift[col].tolist(), name=name, mode="lines+markers",
                                 line={"color": colour, "width": 3},
                                 customdata=drift["predictions"].tolist(),
                                 hovertemplate="%{x}: %{y:.1%} of %{customdata}<extra>" + name
                                               + "</extra>"))
        ref = reference.get(col)
        if ref is not None:
            fig.add_hline(y=ref, line={"color": colour, "dash": "dash", "width": 2},
                          annotation_text=f"{name}, test: {ref:.1%}",
                          annotation_font={"size": 13, "color": "#262730"})
    fig.update_xaxes(type="date")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _audit_layout(fig, "Share of the day's predictions")


def drift_classes_chart(drift: Any, reference: dict[str, Any], classes: list[str]) -> Any:
    """Daily share of each predicted class (solid) against its share on the run's test set
    (dashed, same colour)."""
    import plotly.graph_objects as go

    colours = class_colours(classes)
    fig = go.Figure()
    days = [str(d) for d in drift["day"]]
    for cls in classes:
        col = f"share_{cls}"
        values = drift[col].tolist() if col in drift else [0.0] * len(days)
        label = cls.replace("_", " ")
        fig.add_trace(go.Scatter(x=days, y=values, name=label, mode="lines+markers",
                                 line={"color": colours[cls], "width": 3},
                                 hovertemplate="%{x}: %{y:.1%}<extra>" + label + "</extra>"))
        ref = reference.get("class_share", {}).get(cls)
        if ref is not None:
            fig.add_hline(y=ref, line={"color": colours[cls], "dash": "dash", "width": 2})
    fig.update_xaxes(type="date")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _audit_layout(fig, "Share of the day's predictions")
