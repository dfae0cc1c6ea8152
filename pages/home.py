"""Home: what the tool does, the active model and what is missing."""

import streamlit as st

from core import ui

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

run = ui.require_run()
st.subheader(f"Model run: {run.name}")
report = ui.require_report(run)
overall = report.get("overall", {})
cols = st.columns(3)
ui.kpi(cols[0], "Accuracy (test)", overall.get("accuracy"))
ui.kpi(cols[1], "Macro F1", overall.get("macro_f1"))
ui.kpi(cols[2], "Macro ROC-AUC", overall.get("macro_roc_auc"))
