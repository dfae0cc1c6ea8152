"""CXR Insight: the app's entry point. It only sets up the page and the navigation;
each page is a thin view in ``pages/``."""

import streamlit as st

st.set_page_config(page_title="CXR Insight", page_icon="🫁", layout="wide")

navigation = st.navigation({
    "Overview": [
        st.Page("pages/home.py", title="Home", icon="🏠", default=True),
        st.Page("pages/executive_summary.py", title="Executive Summary", icon="📋"),
    ],
    "Model": [
        st.Page("pages/data_explorer.py", title="Data Explorer", icon="🗂️"),
        st.Page("pages/model_performance.py", title="Model Performance", icon="📈"),
        st.Page("pages/explainability.py", title="Explainability", icon="🔍"),
        st.Page("pages/training.py", title="Training", icon="🏋️"),
    ],
    "Use": [
        st.Page("pages/clinical_predictions.py", title="Clinical Predictions", icon="🩻"),
        st.Page("pages/business_impact.py", title="Business Impact", icon="💼"),
    ],
})
navigation.run()
