"""Data Explorer (being built)."""

import streamlit as st

from core import ui

st.title("Data Explorer")
ui.disclaimer()
run = ui.require_run()
