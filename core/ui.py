"""UI glue: the only module of ``core`` that imports Streamlit.

Cached loaders (a predictor is loaded once per process and shared by every session;
reports are cached by path and modification time) and small shared widgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from core import runs

DISCLAIMER = (
    "Research and education only. CXR Insight is not a medical device and must not be used "
    "for diagnosis or treatment decisions."
)


def disclaimer() -> None:
    st.warning(DISCLAIMER, icon="⚠️")


@st.cache_resource(show_spinner="Loading the model…")
def load_predictor(checkpoint: str) -> Any:
    from core.inference import Predictor

    return Predictor.from_checkpoint(checkpoint)


@st.cache_data(show_spinner=False)
def load_report(path: str, mtime: float) -> dict[str, Any]:
    """``mtime`` is part of the cache key, so a rewritten report is read again."""
    return runs.read_json(path)


@st.cache_data(ttl=30, show_spinner=False)
def available_runs(models_dir: str) -> list[runs.RunInfo]:
    return runs.list_runs(models_dir)


def pick_run(models_dir: str | Path | None = None) -> runs.RunInfo | None:
    """Sidebar run selector; None when no run exists yet."""
    found = available_runs(str(models_dir or runs.models_dir()))
    if not found:
        return None
    names = [r.name for r in found]
    choice = st.sidebar.selectbox("Model run", names, index=0, key="run")
    return found[names.index(choice)]
