"""The Training page, driven headlessly with AppTest: the live dataset check, the one-job
rule seen from a second tab, the deployment settings, and (slow) a real run on the shared
X-rays launched, followed, refreshed, cancelled, resumed and found as the active model."""

from __future__ import annotations

import json
import re
import sys

import pytest
from streamlit.testing.v1 import AppTest

from core import jobs
from core.data import discover
from tests.conftest import make_dataset, require_real, wait_for
from tests.test_app import run_page

PAGE = "pages/training.py"
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def open_tab(timeout: float = 120) -> AppTest:
    """A new browser tab (or a refresh): a fresh session on the Training page."""
    return run_page(PAGE, timeout=timeout)


def texts(at: AppTest) -> str:
    return "\n".join([e.value for e in at.error] + [e.value for e in at.info]
                     + [e.value for e in at.success] + [e.value for e in at.warning]
                     + [m.value for m in at.markdown] + [s.value for s in at.subheader])


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def train_button(at: AppTest):
    return next(b for b in at.button if b.label == "Train")


def test_the_folder_is_checked_live_before_training(models, tmp_path):
    at = open_tab()
    assert not at.exception
    assert at.warning[0].value.startswith("Research and education only")
    data = make_dataset(tmp_path / "ds", per_class=8, classes=("COVID", "Normal"),
                        layout="database")
    (data / "Normal" / "images" / "bad.png").write_bytes(b"truncated")
    at.text_input(key="train_data_dir").set_value(str(data)).run()
    assert not at.exception and not at.error
    assert "**2 classes, 17 images** (database layout; 17 files' headers checked)" in texts(at)
    table = at.dataframe[-1].value
    assert table.to_dict("list") == {"class": ["COVID", "Normal"], "images": [8, 9]}
    assert at.warning[-1].value.startswith("1 of 17 checked files cannot be read as images")
    assert not train_button(at).disabled

    (tmp_path / "ds2" / "A").mkdir(parents=True)
    make_dataset(tmp_path / "ds2", per_class=8, classes=("B",))
    at.text_input(key="train_data_dir").set_value(str(tmp_path / "ds2")).run()
    assert at.error[0].value.startswith("Class folder(s) with no images")
    assert "A" in at.error[0].value and train_button(at).disabled


def test_a_second_train_click_from_another_tab_is_refused_and_shows_the_running_job(
        models, tmp_path):
    data = make_dataset(tmp_path / "ds", per_class=8)
    other_tab = open_tab()  # opened before the job started
    jobs.launch(SLEEP, models / "first-run", models)
    other_tab.text_input(key="train_data_dir").set_value(str(data)).run()
    other_tab.text_input(key="train_run_name").set_value("second-run")
    train_button(other_tab).click().run()
    assert not other_tab.exception
    assert other_tab.error[0].value.startswith(
        "A training job is already running: run 'first-run', started at ")
    assert "Job: run first-run" in texts(other_tab)
    assert not (models / "second-run").exists()
    cancel = next(b for b in other_tab.button if b.label == "Cancel training")
    cancel.click().run()
    assert "Training was cancelled" in texts(other_tab)
    assert jobs.status(models).status == "cancelled"


def test_training_off_hides_the_form(models, monkeypatch):
    monkeypatch.setenv(jobs.ENV_ALLOW, "0")
    at = open_tab()
    assert not at.exception
    assert "In-app training is turned off on this deployment" in at.info[0].value
    assert not at.text_input and not at.button


def test_paths_outside_the_data_root_are_refused_on_the_page(models, tmp_path, monkeypatch):
    root = tmp_path / "root"
    make_dataset(root / "mine", per_class=7)
    monkeypatch.setenv(jobs.ENV_DATA_ROOT, str(root))
    at = open_tab()
    assert at.text_input(key="train_data_dir").value == ""
    at.text_input(key="train_data_dir").set_value("/etc").run()
    assert at.error[0].value.startswith("On this deployment datasets must lie inside its data")
    assert train_button(at).disabled
    at.text_input(key="train_data_dir").set_value("mine").run()
    assert not at.error and "**3 classes, 21 images**" in texts(at)


@pytest.mark.slow
def test_train_on_real_xrays_from_the_app_cancel_resume_and_find_the_run_active(models):
    data = require_real()
    at = open_tab()
    at.text_input(key="train_data_dir").set_value(str(data)).run()
    counts = discover(data).counts()
    assert at.dataframe[-1].value.to_dict("list") == {"class": list(counts),
                                                       "images": list(counts.values())}
    at.selectbox(key="train_mode").set_value("finetune")
    at.number_input(key="train_epochs").set_value(4)
    at.number_input(key="train_img_size").set_value(64)
    at.selectbox(key="train_arch").set_value("resnet18")
    at.selectbox(key="train_weights").set_value("none")
    at.number_input(key="train_batch").set_value(16)
    at.number_input(key="train_max_per_class").set_value(30)
    at.text_input(key="train_run_name").set_value("app-run")
    train_button(at).click().run()
    assert not at.exception and not at.error
    run_dir = models / "app-run"

    # follow it: the page shows the step progress the trainer writes
    progress = wait_for(lambda: (p := jobs.status(models).progress) and p["epoch"] >= 2 and p,
                        300, "epoch 2 to start")
    at.run()
    assert "Job: run app-run" in texts(at)
    epoch = int(metric(at, "Epoch").split(" / ")[0])
    assert metric(at, "Epoch").endswith(" / 4") and epoch >= progress["epoch"]
    assert at.get("progress")[0].proto.text.startswith(("Training (finetune)", "Finishing"))
    assert metric(at, "Train loss") != "—"

    # refresh midway: a new session finds the same job and cancels it
    tab = open_tab()
    assert "Job: run app-run" in texts(tab)
    next(b for b in tab.button if b.label == "Cancel training").click().run()
    state = jobs.status(models)
    assert state.status == "cancelled", state.log
    assert "Training was cancelled" in texts(tab)
    history = json.loads((run_dir / "history.json").read_text())
    assert 1 <= len(history) < 4

    # resume: it continues from last.pt and finishes with its evaluation
    next(b for b in tab.button if b.label == "Resume training").click().run()
    done = wait_for(lambda: (s := jobs.status(models)) and not s.running and s, 900,
                    "the resumed run to finish")
    assert done.status == "finished", (done.cause, done.log)
    assert [h["epoch"] for h in done.history] == [1, 2, 3, 4]
    # from the last epoch saved before the cancel: the one history.json had, or the next
    # (a cancel between writing last.pt and history.json)
    resumed = re.search(rf"Resumed from {re.escape(str(run_dir / 'last.pt'))} at epoch (\d+)",
                        (run_dir / "train.log").read_text())
    assert resumed and int(resumed.group(1)) in (len(history) + 1, len(history) + 2)
    tab.run()
    assert "Run **app-run** is trained and evaluated" in texts(tab)

    # the new run is the active model, with its report
    home = run_page("pages/home.py")
    assert not home.exception
    assert any(m.value.startswith("**Run:** app-run") for m in home.markdown)
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    accuracy = report["overall"]["accuracy"]["value"]
    assert home.metric[0].label == "Accuracy (test)"
    assert home.metric[0].value == f"{100 * accuracy:.1f}%"


FAKE_KAGGLEHUB = '''
import os
from pathlib import Path

import numpy as np
import requests
from PIL import Image


def dataset_download(handle, path=None, *, force_download=False, output_dir=None):
    if os.environ.get("FAKE_KAGGLE_STATUS"):
        response = requests.Response()
        response.status_code = int(os.environ["FAKE_KAGGLE_STATUS"])
        raise requests.HTTPError("Client Error", response=response)
    for cls in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        folder = Path(output_dir) / "COVID-19_Radiography_Dataset" / cls / "images"
        folder.mkdir(parents=True)
        for i in range(7):
            Image.fromarray(np.full((32, 32), 20 * i, np.uint8)).save(folder / f"{cls}-{i}.png")
    return output_dir
'''


def test_the_download_button_runs_the_download_as_a_job(models, tmp_path, monkeypatch):
    """kagglehub is replaced, for the job's processes, by a fake on PYTHONPATH: first Kaggle
    refuses (403), then it serves a small copy of the database."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "kagglehub.py").write_text(FAKE_KAGGLEHUB)
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("FAKE_KAGGLE_STATUS", "403")
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv(jobs.ENV_DATA_ROOT, str(root))

    at = open_tab()
    download = next(b for b in at.button if b.label == "Download the database")
    download.click().run()
    wait_for(lambda: not jobs.status(models).running, 120, "the download to end")
    at.run()
    assert "Job: download of the COVID-19 Radiography Database" in texts(at)
    assert at.error[0].value.startswith("Download failed: Kaggle refused the download of "
                                        "tawsifurrahman/covid19-radiography-database (HTTP 403)")
    assert not any(b.label == "Resume training" for b in at.button)

    monkeypatch.delenv("FAKE_KAGGLE_STATUS")
    next(b for b in at.button if b.label == "Download the database").click().run()
    wait_for(lambda: not jobs.status(models).running, 120, "the download to end")
    at.run()
    assert at.success[0].value == ("The database is downloaded and checked: enter its folder "
                                   "below, `COVID-19_Radiography_Dataset`.")
    at.text_input(key="train_data_dir").set_value("COVID-19_Radiography_Dataset").run()
    assert "**4 classes, 28 images** (database layout" in texts(at)


def test_a_failed_run_shows_its_cause_and_log_and_can_be_resumed(models):
    code = "print('epoch 1 train', flush=True); raise MemoryError('cannot allocate 2 GB')"
    jobs.launch([sys.executable, "-c", code], models / "crashed", models)
    wait_for(lambda: not jobs.status(models).running, 60, "the job to fail")
    jobs._children.clear()  # as seen by a restarted app
    at = open_tab()
    assert not at.exception
    assert at.error[0].value == ("Training failed: Out of memory: lower the batch size or the "
                                 "image size (or train in head mode), then start again.")
    log = at.code[0].value
    assert "epoch 1 train" in log and "MemoryError: cannot allocate 2 GB" in log
    assert any(b.label == "Resume training" for b in at.button)
