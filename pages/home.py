"""Home: what the tool does, the active model, what is missing (with the command that fixes
it) and the research-use disclaimer."""

import streamlit as st

from core import overview, ui
from core.errors import CXRError

st.title("CXR Insight")
st.caption("Train, audit and demonstrate a chest X-ray classifier.")
ui.disclaimer()

st.markdown(
    """
CXR Insight classifies a frontal chest X-ray into the classes of the COVID-19 Radiography
Database (COVID, Lung Opacity, Normal, Viral Pneumonia) with a ResNet50, explains each
prediction with Grad-CAM, and reports clinical metrics with 95% confidence intervals.

**A known trap.** In this database each class comes from different hospitals and age groups
(the viral pneumonia images are paediatric), so a model can learn the *source* rather than the
disease. The evaluation report measures this (occlusion probe, external validation) instead of
hiding it.
"""
)

try:
    run = ui.pick_run()
except CXRError as exc:  # e.g. a run folder removed while the page was loading
    st.error(f"Could not read the selected run: {exc}")
    run = None

left, right = st.columns([1, 1], gap="large")
with right:
    st.subheader("Status")
    ui.checklist(overview.checklist(run))

with left:
    st.subheader("Active model")
    if run is None:
        st.markdown("No trained model yet: follow the checklist to train one.")
    else:
        op = run.operating_point or {}
        op_text = (f"{op['class']} when its probability ≥ {op['threshold']:.3f}"
                   if op.get("threshold") is not None else "none (most probable class)")
        st.markdown(
            f"**Run:** {run.name}  \n"
            f"**Created:** {overview.created(run)}  \n"
            f"**Classes:** {', '.join(run.classes) or 'unknown'}  \n"
            f"**Network:** {run.arch or 'unknown'}, {run.img_size or '?'} px input, "
            f"best epoch {run.epoch or '?'} of {run.epochs}  \n"
            f"**Serving:** {run.serving.get('text', 'unknown')}  \n"
            f"**Lung view:** {run.lung_view}  \n"
            f"**Operating point:** {op_text}"
        )
        if run.report is not None:
            st.markdown("**Headline figures** (test split, 95% confidence intervals)")
            kpis = overview.headline(run)[:3]
            for col, k in zip(st.columns(len(kpis)), kpis, strict=True):
                ui.kpi(col, k.label, k.item, pct=k.pct, help=k.help)
            st.caption("The Executive Summary puts these next to the findings that qualify "
                       "them; Model Performance has every figure.")

st.divider()
st.caption("Pages: **Executive Summary** (KPIs, findings, model card) · **Data Explorer** · "
           "**Model Performance** (confusion matrix, curves, calibration, operating point) · "
           "**Explainability** · **Clinical Predictions** (upload X-rays) · **Business Impact**.")
