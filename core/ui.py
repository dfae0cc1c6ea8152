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
TRAIN_COMMAND = "python -m core.train --preset cpu-lungs --data-dir <dataset> --output models/<run>"

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

    return Predictor.from_checkpoint(checkpoint, precision=serving_precision())


def serving_precision() -> str:
    """The precision the app serves with: ``CXR_PRECISION`` (a deployment setting, read
    when a predictor is loaded), else ``auto`` (a reduced precision only where the run's
    check passed on this CPU). ``fp32`` gives PyTorch fp32's answers on every CPU."""
    import os

    return os.environ.get("CXR_PRECISION", "").strip().lower() or "auto"


def predictor_for(run: runs.RunArtifacts) -> Any:
    """:func:`load_predictor` for a run (raises :class:`core.errors.CheckpointError` when its
    checkpoint is gone or unusable)."""
    return load_predictor(str(run.checkpoint), runs.predictor_files(run.checkpoint))


@st.cache_data(show_spinner=False)
def load_report(path: str, mtime: float) -> dict[str, Any]:
    """``mtime`` is part of the cache key, so a rewritten report is read again."""
    return runs.read_json(path)


@st.cache_data(ttl=30, show_spinner=False)
def _selectable_runs(models_dir: str, demo_dir: str) -> list[runs.RunInfo]:
    return runs.selectable_runs(models_dir, demo_dir or None)


def available_runs(models_dir: str) -> list[runs.RunInfo]:
    """The runs under ``models_dir``, newest first, then the shipped demo model unless
    ``CXR_DEMO=0`` (:func:`core.runs.selectable_runs`); cached for 30 s
    (``available_runs.clear()`` empties it)."""
    demo = str(runs.demo_dir()) if runs.demo_enabled() else ""
    return _selectable_runs(models_dir, demo)


available_runs.clear = _selectable_runs.clear  # type: ignore[attr-defined]


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
                                  help="Runs found under models/, newest first; then the "
                                       "shipped demo model.")
    info = found[names.index(choice)]
    run = _load_run(str(info.path), _stamp(info.path))
    demo_notice(run)
    return run


def require_run() -> runs.RunArtifacts:
    """The selected run, or guidance and ``st.stop()`` when there is none."""
    run = pick_run()
    if run is None:
        hidden = (" The shipped demo model is hidden in this deployment (CXR_DEMO=0)."
                  if not runs.demo_enabled() else "")
        st.info(f"No trained model yet. Train one with `{TRAIN_COMMAND}`, or on the "
                f"**Training** page; it appears here when `models/<run>/best.pt` exists.{hidden}")
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


# ---- use & explain ----
# Clinical Predictions, Explainability and Data Explorer: the predictor with an error
# instead of a traceback, per-upload results cached in the session by content hash, cached
# dataset reads, and the Plotly charts those pages share.

_ANALYSES_KEY = "_use_analyses"
_CASES_KEY = "_explain_cases"
_CHART_FONT = {"size": 15, "color": "#1f1f1f"}
_TICK_FONT = {"size": 14, "color": "#1f1f1f"}


def predictor_or_stop(run: runs.RunArtifacts) -> Any:
    """The run's shared predictor, or an actionable error and ``st.stop()``."""
    from core.errors import CXRError

    try:
        predictor = predictor_for(run)
    except CXRError as exc:
        st.error(f"The model of run **{run.name}** cannot be loaded: {exc}")
        st.stop()
    _warm_lung_segmenter()
    return predictor


@st.cache_resource(show_spinner="Loading the lung segmenter…")
def _warm_lung_segmenter() -> bool:
    """Load the shipped lung segmenter and run it once (its first call costs about a second),
    so that the first upload is as fast as the next ones."""
    import numpy as np

    from core import lungs

    lungs.default_segmenter().segment(np.zeros((256, 256), np.float32))
    return True


def _run_key(run: runs.RunArtifacts) -> str:
    ckpt = Path(run.checkpoint)
    return f"{ckpt}:{ckpt.stat().st_mtime if ckpt.exists() else 0}"


def analyse_uploads(predictor: Any, run: runs.RunArtifacts,
                    files: list[Any]) -> list[tuple[str, Any]]:
    """(file name, ``core.clinical.Analysis`` or the ``InvalidImageError``) per upload, in
    order. Results are kept in the session keyed by the run and the file's content hash, so
    a rerun (a slider moved) does not run the network again; entries of files no longer
    uploaded are dropped. The bytes stay in memory."""
    from core import clinical
    from core.errors import InvalidImageError

    cache: dict[tuple[str, str], Any] = st.session_state.setdefault(_ANALYSES_KEY, {})
    run_key = _run_key(run)
    out, keep = [], set()
    for f in files:
        data = f.getvalue()
        key = (run_key, clinical.content_key(data))
        keep.add(key)
        if key not in cache:
            try:
                cache[key] = clinical.analyse(predictor, f.name, data)
            except InvalidImageError as exc:
                cache[key] = exc
        out.append((f.name, cache[key]))
    for stale in set(cache) - keep:
        del cache[stale]
    return out


def explain_case(predictor: Any, run: runs.RunArtifacts, path: Path, method: str, layer: str,
                 target: str | None) -> Any:
    """``core.clinical.analyse`` of one dataset image under a CAM method, layer and target,
    kept in the session (the last 16), so the opacity slider does not recompute."""
    from core import clinical

    cache: dict[tuple[Any, ...], Any] = st.session_state.setdefault(_CASES_KEY, {})
    key = (_run_key(run), str(path), method, layer, target)
    if key not in cache:
        with st.spinner(f"Computing {method} at {layer}…"):
            cache[key] = clinical.analyse(predictor, path.name, path.read_bytes(), method,
                                          layer, target)
        while len(cache) > 16:
            del cache[next(iter(cache))]
    return cache[key]


def dataset_record(run: runs.RunArtifacts) -> dict[str, Any] | None:
    """``core.explore.dataset_record`` (``dataset.json``, else built from ``manifest.csv``),
    cached per run folder and its files' modification times."""
    manifest = Path(run.path) / "manifest.csv"
    stamp = (*_stamp(Path(run.path)), manifest.stat().st_mtime if manifest.exists() else 0.0)
    return _dataset_record(str(run.path), stamp, run)


@st.cache_data(show_spinner="Reading the dataset record…", max_entries=8)
def _dataset_record(path: str, stamp: tuple[float, ...],
                    _run: runs.RunArtifacts) -> dict[str, Any] | None:
    from core import explore

    return explore.dataset_record(_run)


@st.cache_data(show_spinner=False, max_entries=256)
def thumbnail(path: str, size: int = 192) -> Any:
    """``core.explore.thumbnail``, or None for a missing or unreadable file."""
    from core import explore
    from core.errors import InvalidImageError

    try:
        return explore.thumbnail(path, size)
    except InvalidImageError:
        return None


def image_grid(folder: Path, paths: list[str], captions: list[str], per_row: int = 6) -> None:
    """Thumbnails of dataset images in rows of ``per_row``, captioned; a missing or
    unreadable file shows as such instead of failing the page."""
    for start in range(0, len(paths), per_row):
        cols = st.columns(per_row)
        for col, path, caption in zip(cols, paths[start : start + per_row],
                                      captions[start : start + per_row], strict=False):
            image = thumbnail(str(folder / path))
            if image is None:
                col.caption(f"{caption} (missing or unreadable)")
            else:
                col.image(image, caption=caption, width="stretch")


@st.cache_data(show_spinner="Reading images…", max_entries=8)
def intensity_histograms(data_dir: str, paths_by_class: dict[str, list[str]]) -> Any:
    from core import explore

    return explore.intensity_histograms(Path(data_dir), paths_by_class)


@st.cache_data(show_spinner=False, max_entries=8)
def image_sizes(data_dir: str | None, paths_by_class: dict[str, list[str]] | None,
                dataset: dict[str, Any] | None) -> Any:
    from core import explore

    return explore.image_sizes(Path(data_dir) if data_dir else None, paths_by_class, dataset)


@st.cache_data(show_spinner="Preprocessing…", max_entries=32)
def preprocessing_steps(path: str, cfg: Any) -> Any:
    """``core.preview.preprocessing_steps`` of a dataset image under a ``PreprocessConfig``."""
    from core import preview
    from core.preprocess import load_gray

    return preview.preprocessing_steps(load_gray(path), cfg)


def _style(fig: Any, height: int = 360, x_title: str | None = None,
           y_title: str | None = None) -> Any:
    """Legible defaults for a hospital screen: dark 14-15 px text, light grid, no legend title."""
    fig.update_layout(font=_CHART_FONT, height=height, margin={"l": 10, "r": 10, "t": 48, "b": 10},
                      legend_title_text="", legend_font=_TICK_FONT, plot_bgcolor="white",
                      title_font={"size": 17, "color": "#1f1f1f"})
    fig.update_xaxes(tickfont=_TICK_FONT, title_font=_CHART_FONT, gridcolor="#e5e5e5")
    fig.update_yaxes(tickfont=_TICK_FONT, title_font=_CHART_FONT, gridcolor="#e5e5e5")
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def results_columns(classes: list[str]) -> dict[str, Any]:
    """``st.dataframe`` column settings of ``core.clinical.results_table``: readable headers,
    probabilities as bars with percentages (the CSV keeps the raw columns)."""
    cfg: dict[str, Any] = {
        "file": st.column_config.TextColumn("File"),
        "predicted_class": st.column_config.TextColumn("Predicted class"),
        "decision": st.column_config.TextColumn("Decision (operating point)"),
        "low_confidence": st.column_config.CheckboxColumn("Low confidence"),
        "ood": st.column_config.CheckboxColumn("Unusual image (OOD)"),
        "lung_focus": st.column_config.NumberColumn("Lung focus", format="%.2f"),
        "error": st.column_config.TextColumn("Error", width="large"),
    }
    for c in classes:
        cfg[f"prob_{c}"] = st.column_config.ProgressColumn(
            f"P({c.replace('_', ' ')})", min_value=0.0, max_value=1.0, format="percent")
    return cfg


def probability_chart(probabilities: dict[str, float], classes: list[str],
                      operating_point: dict[str, Any] | None = None) -> Any:
    """Horizontal bars of the calibrated probabilities, one colour per class; the operating
    point's threshold as a dashed line on its class."""
    import plotly.graph_objects as go

    colours = class_colours(classes)
    values = [float(probabilities[c]) for c in classes]
    fig = go.Figure(go.Bar(x=values, y=[c.replace("_", " ") for c in classes], orientation="h",
                           marker_color=[colours[c] for c in classes],
                           text=[f"{v:.1%}" for v in values], textposition="outside",
                           textfont={"size": 15, "color": "#1f1f1f"}, cliponaxis=False,
                           hovertemplate="%{y}: %{x:.1%}<extra></extra>"))
    if operating_point and operating_point.get("class") in classes:
        t = float(operating_point["threshold"])
        fig.add_vline(x=t, line_dash="dot", line_color="#555555", line_width=2,
                      annotation_text=f"{operating_point['class']} threshold {t:.0%}",
                      annotation_position="top", annotation_font=_TICK_FONT)
    fig.update_xaxes(range=[0, 1.22], tickvals=[0, 0.25, 0.5, 0.75, 1.0], tickformat=".0%")
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return _style(fig, 110 + 52 * len(classes), "Calibrated probability", "")


def class_bars(df: Any, x: str, y: str, classes: list[str], title: str, *,
               labels: tuple[str, str] = ("", "Images"), barmode: str = "group",
               horizontal: bool = False, height: int = 360) -> Any:
    """Bars of ``df`` (category ``x``, value ``y``) coloured by its ``class`` column (one
    colour per class); ``labels``: the axis titles of ``x`` and ``y``."""
    import plotly.express as px

    colours = {**class_colours(classes), "all": "#555555"}
    args = {"x": y, "y": x, "orientation": "h"} if horizontal else {"x": x, "y": y}
    fig = px.bar(df, color="class", color_discrete_map=colours, barmode=barmode, title=title,
                 category_orders={"class": [*classes, "all"]}, text_auto=True, **args)
    fig.update_traces(textfont_size=14, insidetextfont_color="white")
    if horizontal:
        fig.update_yaxes(autorange="reversed")
        return _style(fig, max(height, 240), labels[1], labels[0])
    return _style(fig, height, labels[0], labels[1])


def class_lines(df: Any, x: str, y: str, classes: list[str], title: str,
                labels: tuple[str, str] = ("", "")) -> Any:
    import plotly.express as px

    fig = px.line(df, x=x, y=y, color="class", color_discrete_map=class_colours(classes),
                  category_orders={"class": classes}, title=title)
    fig.update_traces(line_width=3)
    return _style(fig, 380, *labels)


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
def _model_identity(run_key: str, run_name: str, _predictor: Any) -> Any:
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
    """Record each upload's result (:func:`analyse_uploads`) in the audit log before it is
    shown: once per analysis, i.e. per tab, run and file content (a rerun that reuses a
    result does not record it again; a file uploaded again after removal is analysed and
    recorded again). Says so when the log is off, and warns when records went to the spool
    or could not be written."""
    from core import clinical
    from core.audit import AuditStatus

    log = audit_log()
    if not log.enabled:
        st.caption("The audit log is off in this deployment (CXR_AUDIT=0): these predictions "
                   "are not recorded.")
        return
    run_key = _run_key(run)
    model = _model_identity(run_key, run.name, predictor)
    done: dict[tuple[str, str], Any] = st.session_state.setdefault(_AUDITED_KEY, {})
    keep, statuses = set(), []
    for upload, (name, result) in zip(files, results, strict=True):
        data = upload.getvalue()
        key = (run_key, clinical.content_key(data))
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


# ---- navigation ----


def use_app_navigation() -> None:
    """Route this request through Home.py's ``st.navigation`` (call first on every page).

    A page file lives in ``pages/`` (Streamlit's multipage layout). On a freshly started
    server, Streamlit runs the first request in its legacy ``pages/``-folder mode, because
    Home.py's ``st.navigation`` has not run in this process yet: a deep link then shows the
    page without the app's grouped navigation and wide layout. This switches the process to
    ``st.navigation`` and, on a page load (no widget state yet, so no click to lose), reruns
    so that Home.py routes the request (the browser test opens a fresh server at a deep
    link). A no-op on every later run.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if len(st.session_state) == 0:  # a page load, not a click: a rerun loses nothing
            st.rerun()


# ---- demo model ----


def demo_notice(run: runs.RunArtifacts) -> None:
    """The demo model's plain label with its test figures (``core.demo.label``), on every
    page that shows it (called by :func:`pick_run`); nothing for any other run."""
    from core import demo

    text = demo.label(run)
    if text:
        st.info(text, icon="🧪")


def missing_images(run: runs.RunArtifacts, data_dir: Path | None) -> None:
    """A gallery's note when the run's images are not on this machine, saying how to get
    them (the demo's: ``core.demo.images_note``)."""
    from core import demo, explore

    st.info(demo.images_note(run) if run.is_demo else explore.missing_images_text(data_dir))
