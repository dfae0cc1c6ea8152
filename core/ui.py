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


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def load_predictor(checkpoint: str, stamp: tuple[tuple[str, float], ...]) -> Any:
    """The run's predictor, shared by every session. ``stamp``
    (:func:`core.runs.predictor_files`: the files it reads and their modification times) is
    part of the key, so a rewritten checkpoint is loaded again; at most two are held."""
    from core.inference import Predictor

    return Predictor.from_checkpoint(checkpoint)


def predictor_for(run: runs.RunArtifacts) -> Any:
    """:func:`load_predictor` for a run (raises :class:`core.errors.CheckpointError` when its
    checkpoint is gone or unusable)."""
    return load_predictor(str(run.checkpoint), runs.predictor_files(run.checkpoint))


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
    files = ("best.pt", "run.json", "config.json", "history.json", "dataset.json", "serving.json",
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


# ---- training ----


def run_names() -> list[str]:
    """Names of the runs the sidebar lists (cached like :func:`pick_run`), newest first."""
    return [r.name for r in available_runs(str(runs.models_dir()))]


# ---- overview & performance ----

SEVERITY_BOXES = {"high": st.error, "medium": st.warning, "low": st.info, "info": st.info}
SEVERITY_ICONS = {"high": "🛑", "medium": "⚠️", "low": "ℹ️", "info": "ℹ️"}


def finding(severity: str, text: str) -> None:
    """A finding styled by severity: high = error, medium = warning, low/info = info."""
    box = SEVERITY_BOXES.get(severity, st.info)
    box(f"**{severity.upper()}** · {text}", icon=SEVERITY_ICONS.get(severity, "ℹ️"))


def checklist(checks: list[Any]) -> None:
    """The status checklist (``core.overview.Check``): done items in green, missing ones with
    the command that fixes them."""
    for c in checks:
        if c.ok:
            st.success(f"**{c.what}**: {c.detail}", icon="✅")
        else:
            fix = f"  \nFix: `{c.command}`" if c.command else ""
            st.info(f"**{c.what}**: {c.detail}{fix}", icon="❌")


def metric_table(rows: list[dict[str, Any]], pct: tuple[str, ...] = (),
                 transpose: bool = False) -> None:
    """Rows whose values are report Metrics (``{value, ci95}``) or plain numbers, shown as
    text with their intervals (``fmt_metric``); columns in ``pct`` as percentages. With
    ``transpose`` the first column's values (e.g. the classes) become the columns, which
    keeps a table of many figures narrow."""
    def cell(col: str, v: Any) -> Any:
        if v is None:
            return "–"
        return fmt_metric(v, pct=col in pct) if isinstance(v, (dict, float)) else v

    text = [{k: cell(k, v) for k, v in r.items()} for r in rows]
    if transpose and text:
        first = next(iter(text[0]))
        names = [str(r[first]) for r in text]
        text = [{first: k, **{n: str(r[k]) for n, r in zip(names, text, strict=True)}}
                for k in text[0] if k != first]
    st.dataframe(text, hide_index=True)


def load_run_named(name: str) -> runs.RunArtifacts | None:
    """A run found under the models folder by its name (None when it is gone)."""
    for info in available_runs(str(runs.models_dir())):
        if info.name == name:
            return _load_run(str(info.path), _stamp(info.path))
    return None


def chart(fig: Any, key: str) -> None:
    """A Plotly figure as built by ``core.charts`` (its own template and font sizes, not the
    Streamlit theme's smaller ones)."""
    st.plotly_chart(fig, theme=None, key=key)
