"""The shipped demo model in the app (AppTest): the active model on a machine with no run of
its own, labelled on every page that shows it; hidden by ``CXR_DEMO=0``; after a user's run,
which becomes the default, still selectable. A demo whose images are not on the machine says
so in the galleries and how to get data. The demo here is ``small_demo`` (built from
``small_run`` by ``core.demo.build``), shown through ``CXR_DEMO_DIR``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core import demo, runs
from tests.test_app import PAGES, run_page


@pytest.fixture
def demo_only(no_models: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No run under the models folder; the demo shown."""
    monkeypatch.setenv("CXR_DEMO", "1")
    monkeypatch.setenv("CXR_DEMO_DIR", str(small_demo))
    return small_demo


def demo_label(folder: Path) -> str:
    text = demo.label(runs.load_run(folder))
    assert text is not None
    return text


def test_with_no_run_of_ones_own_home_shows_the_demo_as_the_active_model(demo_only):
    at = run_page("pages/home.py")
    assert not at.exception
    label = demo_label(demo_only)
    assert label.startswith("Demo model: trained on ") and "research use only" in label
    assert [i.value for i in at.info if i.value.startswith("Demo model:")] == [label]
    assert at.sidebar.selectbox(key="run").value == runs.DEMO_NAME
    assert at.sidebar.selectbox(key="run").options == [runs.DEMO_NAME]
    # its real figures: the headline accuracy is the report's
    report = json.loads((demo_only / "report" / "metrics.json").read_text())
    acc = report["overall"]["accuracy"]["value"]
    assert at.metric[0].label == "Accuracy (test)" and at.metric[0].value == f"{100 * acc:.1f}%"


@pytest.mark.parametrize("page", PAGES[1:])
def test_every_page_that_shows_the_demo_labels_it(page, demo_only):
    at = run_page(page, timeout=120)
    assert not at.exception
    assert demo_label(demo_only) in [i.value for i in at.info], page


def test_cxr_demo_0_hides_the_demo_so_the_empty_states_show(demo_only, monkeypatch):
    monkeypatch.setenv("CXR_DEMO", "0")
    at = run_page("pages/executive_summary.py")
    assert not at.exception
    assert not any(i.value.startswith("Demo model:") for i in at.info)
    guidance = [i.value for i in at.info if "python -m core.train" in i.value]
    assert guidance and "CXR_DEMO=0" in guidance[0]


def test_a_users_run_becomes_the_default_and_the_demo_stays_selectable(small_run, small_demo,
                                                                       monkeypatch):
    monkeypatch.setenv("CXR_MODELS_DIR", str(small_run.parent))
    monkeypatch.setenv("CXR_DEMO", "1")
    monkeypatch.setenv("CXR_DEMO_DIR", str(small_demo))
    at = run_page("pages/home.py")
    assert not at.exception
    picker = at.sidebar.selectbox(key="run")
    assert picker.value == "small" and picker.options == ["small", runs.DEMO_NAME]
    assert not any(i.value.startswith("Demo model:") for i in at.info)
    picker.set_value(runs.DEMO_NAME).run()
    assert not at.exception
    assert demo_label(small_demo) in [i.value for i in at.info]


@pytest.fixture
def demo_without_images(tmp_path: Path, small_demo: Path, no_models: Path,
                        monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the demo whose data folder (relative to the root) is not on this machine."""
    folder = tmp_path / "demo"
    shutil.copytree(small_demo, folder)
    config = json.loads((folder / "config.json").read_text())
    config["data"]["data_dir"] = "../no-such-shared/data/cxr-real"
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("CXR_DEMO", "1")
    monkeypatch.setenv("CXR_DEMO_DIR", str(folder))
    return folder


@pytest.mark.parametrize("page", ("pages/data_explorer.py", "pages/explainability.py"))
def test_without_the_demos_images_the_galleries_say_how_to_get_data(page, demo_without_images):
    at = run_page(page, timeout=120)
    assert not at.exception
    notes = [i.value for i in at.info if "not on this machine" in i.value]
    assert len(notes) == 1, [i.value for i in at.info]
    assert "python -m core.data download" in notes[0] and "Training" in notes[0]
    assert not at.error
