"""CXR Insight: home page (a thin view over core)."""

import streamlit as st

from core import ui

st.set_page_config(page_title="CXR Insight", page_icon="🫁", layout="wide")

st.title("CXR Insight")
st.caption("Train, audit and demonstrate a chest X-ray classifier.")
ui.disclaimer()

st.markdown(
    """
CXR Insight classifies a frontal chest X-ray into the classes of the COVID-19 Radiography
Database (COVID, Lung Opacity, Normal, Viral Pneumonia) with a ResNet50, explains each
prediction with Grad-CAM, and reports clinical metrics with confidence intervals.

**A known trap.** In this database each class comes from different hospitals and age groups
(the viral pneumonia images are pediatric), so a model can learn the *source* rather than the
disease. The evaluation report measures this (occlusion probe, external validation) instead of
hiding it.
"""
)

run = ui.pick_run()
if run is None:
    st.info(
        "No trained model yet. Train one with "
        "`python -m core.train --data-dir <dataset> --output models/<run>`; "
        "it appears here when `models/<run>/best.pt` exists."
    )
    st.stop()

st.subheader(f"Model run: {run.name}")
if run.report is None:
    st.info("This run has no evaluation report yet: run `python -m core.evaluate --checkpoint "
            f"{run.checkpoint}`.")
    st.stop()

report = ui.load_report(str(run.report), run.report.stat().st_mtime)
overall = report.get("overall", {})


def figure(name: str) -> str:
    item = overall.get(name) or {}
    value = item.get("value") if isinstance(item, dict) else item
    return "undefined" if value is None else f"{value:.3f}"


cols = st.columns(3)
cols[0].metric("Accuracy (test)", figure("accuracy"))
cols[1].metric("Macro F1", figure("macro_f1"))
cols[2].metric("Macro ROC-AUC", figure("macro_roc_auc"))
