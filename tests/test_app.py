"""The Streamlit pages, driven headlessly with streamlit.testing.v1.AppTest."""

from __future__ import annotations

import shutil

from streamlit.testing.v1 import AppTest

from core.ui import DISCLAIMER
from tests.conftest import ROOT


def run_page(path: str, timeout: float = 60) -> AppTest:
    at = AppTest.from_file(str(ROOT / path), default_timeout=timeout)
    at.run()
    return at


def test_home_without_a_model_explains_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_MODELS_DIR", str(tmp_path))
    at = run_page("Home.py")
    assert not at.exception
    assert at.title[0].value == "CXR Insight"
    assert any(DISCLAIMER in w.value for w in at.warning)
    assert any("python -m core.train" in i.value for i in at.info)


def test_home_shows_the_run_headline_metrics(trained_run, tmp_path, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(trained_run.parent, models / "real")
    monkeypatch.setenv("CXR_MODELS_DIR", str(models))
    at = run_page("Home.py")
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert labels == ["Accuracy (test)", "Macro F1", "Macro ROC-AUC"]
    assert all(m.value not in ("", "undefined") for m in at.metric)
