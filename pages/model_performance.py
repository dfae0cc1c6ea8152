"""Model Performance (being built)."""

import streamlit as st

from core import ui

st.title("Model Performance")
ui.disclaimer()
run = ui.require_run()
