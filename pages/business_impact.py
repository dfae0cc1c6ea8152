"""Business Impact (being built)."""

import streamlit as st

from core import ui

st.title("Business Impact")
ui.disclaimer()
run = ui.require_run()
