"""Explainability (being built)."""

import streamlit as st

from core import ui

st.title("Explainability")
ui.disclaimer()
run = ui.require_run()
