"""The Streamlit pages, driven headlessly with streamlit.testing.v1.AppTest."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.ui import DISCLAIMER
from tests.conftest import ROOT

PAGES = ("pages/home.py", "pages/executive_summary.py", "pages/data_explorer.py",
         "pages/model_performance.py", "pages/explainability.py",
         "pages/clinical_predictions.py", "pages/business_impact.py")


def run_page(page: str, timeout: float = 60) -> AppTest:
    """The app as a user opens it (Home.py's navigation), switched to ``page``."""
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=timeout)
    at.run()
    if page != "pages/home.py":
        at.switch_page(page)
        at.run()
    return at


@pytest.mark.parametrize("page", PAGES)
def test_every_page_without_a_model_shows_guidance_not_a_traceback(page, no_models):
    at = run_page(page)
    assert not at.exception
    assert any("python -m core.train" in i.value for i in at.info)


def test_home_without_a_model_explains_how_to_train(no_models):
    at = run_page("pages/home.py")
    assert not at.exception
    assert at.title[0].value == "CXR Insight"
    assert any(DISCLAIMER in w.value for w in at.warning)


def test_home_shows_the_run_headline_metrics(small_models):
    at = run_page("pages/home.py")
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert labels[:3] == ["Accuracy (test)", "Macro F1", "Macro ROC-AUC"]
    assert all(m.value not in ("", "undefined") for m in at.metric[:3])
