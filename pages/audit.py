"""Audit: the predictions and refusals this deployment recorded (core.audit), filterable by
date, run, predicted class and flags; counts per day and class; CSV export; and the drift of
the flags and of the predicted classes against the selected run's test figures."""

import dataclasses

import streamlit as st

from core import ui
from core.audit import query

ui.use_app_navigation()

st.title("Audit log")
ui.disclaimer()
st.caption("Every prediction and refusal of this deployment (app, command line, API), without "
           "images, file names or patient fields: the input is known by its SHA-256 only. "
           "Days and times are UTC.")
log = ui.require_audit_log()
ui.audit_status(log)
engine = log.engine
st.caption(f"Database: {log.database}")

bounds = query.date_bounds(engine)
if bounds is None:
    st.info("No predictions recorded yet. They appear here as soon as Clinical Predictions or "
            "`python -m core.predict` makes one.")
    st.stop()

options = query.choices(engine)
c_date, c_run, c_class, c_flag = st.columns([2, 2, 2, 2])
picked = c_date.date_input("Date range (UTC)", value=bounds, min_value=bounds[0],
                           max_value=bounds[1], key="audit_dates")
since, until = (picked[0], picked[-1]) if isinstance(picked, tuple | list) and picked else bounds
runs = c_run.multiselect("Run", options["runs"], key="audit_runs",
                         help="Empty: every run.")
classes = c_class.multiselect("Predicted class", [*options["classes"], query.REFUSED],
                              key="audit_classes", help="Empty: every class and refusals.")
flags = c_flag.multiselect("Flags", ["Out of distribution", "Low confidence"], key="audit_flags",
                           help="Only predictions with every chosen flag.")
filters = query.Filters(since=since, until=until, runs=tuple(runs), classes=tuple(classes),
                        ood=True if "Out of distribution" in flags else None,
                        low_confidence=True if "Low confidence" in flags else None)

stats = query.stats(engine, filters)
cols = st.columns(5)
cols[0].metric("Records", f"{stats['records']:,}")
cols[1].metric("Predictions", f"{stats['predictions']:,}")
cols[2].metric("Refusals", f"{stats['refusals']:,}",
               help="Inputs that could not be used (damaged, not an image, too small...).")
for col, key, label in ((cols[3], "ood_share", "Out of distribution"),
                        (cols[4], "low_confidence_share", "Low confidence")):
    value = stats[key]
    col.metric(label, "n/a" if value is None else f"{value:.1%}",
               help="Share of the predictions in the selection.")
late = stats["incidents"].get("replayed", 0)
if late:
    st.caption(f"{late} record(s) in the log were written late, from the spool, after the "
               "database had been unavailable.")

if not stats["records"]:
    st.info("No records match these filters. Widen the date range or clear a filter.")
    st.stop()

st.subheader("Records per day and predicted class")
counts = query.daily_counts(engine, filters)
all_classes = options["classes"]
st.plotly_chart(ui.audit_counts_chart(counts, all_classes), theme=None, key="audit_counts",
                config={"displayModeBar": False})

st.subheader("Records")
table = query.load_records(engine, filters, limit=ui.AUDIT_TABLE_ROWS, classes=all_classes)
if stats["records"] > len(table):
    st.caption(f"The newest {len(table):,} of {stats['records']:,} records; the CSV has them "
               "all.")
shown = ["created_at", "kind", "source", "run_id", "predicted_class", "confidence", "decision",
         "threshold", "ood", "low_confidence", "lung_focus", "input_format", "width", "height",
         "input_sha256", "error_class", "error_message", "user_name", "session_id", "id"]
st.dataframe(table[shown + [c for c in table.columns if c.startswith("prob_")]],
             hide_index=True, width="stretch",
             column_config={"created_at": st.column_config.DatetimeColumn(
                 "Time (UTC)", format="YYYY-MM-DD HH:mm:ss"),
                 "confidence": st.column_config.NumberColumn(format="%.3f"),
                 "lung_focus": st.column_config.NumberColumn(format="%.2f")})
st.download_button("Download records (CSV)",
                   query.to_csv(query.load_records(engine, filters, classes=all_classes)),
                   file_name="cxr-audit.csv", mime="text/csv", on_click="ignore")

st.subheader("Drift against the run's test figures")
st.caption("A rising share of out-of-distribution or low-confidence flags, or predicted "
           "classes far from the test set's mix, is how a site notices that its images differ "
           "from the training data. Solid: each day's share; dashed: the run's test set.")
run = ui.pick_run()
if run is None:
    st.info(f"No trained run to compare with. Train one with `{ui.TRAIN_COMMAND}`.")
    st.stop()
reference = query.test_reference(run.predictions)
drift = query.drift(engine, dataclasses.replace(filters, runs=(run.name,)))
if not len(drift):
    st.info(f"No predictions by run **{run.name}** in this selection. Choose the run in the "
            "sidebar, or widen the filters.")
    st.stop()
if not reference["n"]:
    st.caption(f"Run {run.name} has no per-image test records (report/predictions.csv), so "
               "there are no test figures to compare with.")
elif reference["ood_share"] is None:
    st.caption(f"Run {run.name}'s test records have no OOD or low-confidence flags (an older "
               "report); rerun `python -m core.evaluate` for them.")
st.markdown(f"**Flags**, run {run.name} (test set: {reference['n']} images)")
st.plotly_chart(ui.drift_flags_chart(drift, reference), theme=None, key="audit_drift_flags",
                config={"displayModeBar": False})
st.markdown("**Predicted classes**")
st.plotly_chart(ui.drift_classes_chart(drift, reference, run.classes), theme=None,
                key="audit_drift_classes", config={"displayModeBar": False})
