"""Executive Summary: the headline KPIs with their intervals, the findings that qualify them
(most severe first), the reference notebook's figures beside this run's, and the model card."""

import streamlit as st

from core import model_card, overview, reference, ui

st.title("Executive Summary")
ui.disclaimer()
run = ui.require_run()
report = ui.require_report(run)

st.caption(f"Run **{run.name}** · created {overview.created(run)} · "
           f"{report.get('n', '?')} test images · classes: {', '.join(run.classes)}")

# ---- KPIs
kpis = overview.headline(run)
for col, k in zip(st.columns(len(kpis)), kpis, strict=True):
    ui.kpi(col, k.label, k.item, pct=k.pct, help=k.help)
cls = overview.screening_class(run)
if cls and cls != "COVID":
    st.caption(f"This run has no COVID class: the screening class is **{cls}**.")
elif not cls:
    st.caption("No operating point: sensitivity and PPV are shown at the most probable class.")

# ---- findings
st.header("Findings")
findings = overview.sorted_findings(run)
if not findings:
    st.success("The report raised no findings.", icon="✅")
for f in findings:
    ui.finding(str(f.get("severity", "info")), str(f.get("text", "")))

sc = overview.shortcut_summary(report)
ext = overview.external_rows(report)
probe, external = st.columns(2, gap="large")
with probe:
    st.subheader("Shortcut probe")
    if sc is None:
        st.info("Not run (the report was written with `--no-occlusion`).")
    else:
        a, b, c = st.columns(3)
        ui.kpi(a, "Full image", sc["full"], pct=True)
        ui.kpi(b, "Periphery only", sc["periphery"], pct=True,
               help="Accuracy with the central 70% (the lungs) blanked out.")
        ui.kpi(c, "Chance", sc["chance_accuracy"], pct=True)
        repeated = any(f.get("text") == sc["verdict"] for f in findings)
        st.markdown(f"Risk: **{sc['risk']}**. "
                    + ("The verdict is the finding above." if repeated else str(sc["verdict"])))
with external:
    st.subheader("External validation")
    if not ext:
        st.info("Not measured: every figure comes from the training database. Add "
                f"`--external-dir DIR` to `python -m core.evaluate --checkpoint {run.checkpoint}`.")
    else:
        auc = next((r for r in ext if r["Figure"] == "Macro ROC-AUC"), ext[0])
        st.metric(f"External {auc['Figure']}", ui.fmt_metric(auc["External"]),
                  delta=None if auc["Drop"] is None else
                  f"{-auc['Drop']:+.3f} vs internal {ui.fmt_metric(auc['Internal'])}")
        ui.metric_table(ext)

# ---- reference notebook
st.header("Against the reference notebook")
st.markdown("The reference notebook (ResNet50, frozen ImageNet backbone, the full four-class "
            "database) published these test figures at the most probable class.")
for reason in reference.comparability(run.classes, overview.dataset_totals(run)):
    st.warning(f"Not directly comparable: {reason}", icon="⚖️")
overall, per_class = reference.side_by_side(report, ui.fmt_metric)
st.dataframe(overall, hide_index=True)
st.dataframe(per_class, hide_index=True)
st.caption("Each cell: the reference's figure → this run's. Per-class figures are at the most "
           "probable class, as the reference reported them; '–' where this run lacks the "
           "class.")

# ---- model card
st.header("Model card")
for title, body in model_card.sections(run):
    with st.expander(title, expanded=title.startswith("Intended")):
        st.markdown(body)
st.download_button("Download model card (Markdown)", model_card.markdown(run),
                   file_name=f"model-card-{run.name.replace('/', '-')}.md", mime="text/markdown")
