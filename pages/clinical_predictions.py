"""Clinical Predictions (being built)."""

import streamlit as st

from core import ui

st.title("Clinical Predictions")
ui.disclaimer()
run = ui.require_run()
