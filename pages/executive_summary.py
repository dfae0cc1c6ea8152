"""Executive Summary (being built)."""

import streamlit as st

from core import ui

st.title("Executive Summary")
ui.disclaimer()
run = ui.require_run()
