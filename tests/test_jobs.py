"""core.jobs: the one-at-a-time background training job behind the Training page.

Most tests run a stand-in command (a Python one-liner that sleeps, prints or fails) through
the real runner, lock and job files; one trains a tiny real run end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core import jobs, runs
from core.errors import DatasetError, JobError, JobRunningError, TrainingDisabledError
from tests.conftest import make_dataset, wait_for, write_png

SLEEP = [sys.executable, "-c", "import time; print('sleeping', flush=True); time.sleep(60)"]


def ended(models: Path, timeout: float = 60.0) -> jobs.JobStatus:
    return wait_for(lambda: (s := jobs.status(models)) and not s.running and s, timeout,
                    "the job to end")


def test_a_second_job_is_refused_while_one_runs_then_allowed_after_cancel(models):
    first = jobs.launch(SLEEP, models / "first", models)
    wait_for(lambda: "sleeping" in "\n".join(jobs.log_tail(first["log"])), what="the job")
    assert jobs.status(models).status == "running"
    with pytest.raises(JobRunningError) as err:
        jobs.launch(SLEEP, models / "second", models)
    assert str(err.value).startswith("A training job is already running: run 'first'")
    assert "Only one runs at a time" in str(err.value)
    assert not (models / "second").exists()

    done = jobs.cancel(models)
    assert done["status"] == "cancelled"
    assert done["returncode"] != 0
    assert "KeyboardInterrupt" in jobs.log_tail(done["log"])  # the trainer stopped on SIGINT
    assert not jobs._lock_file(models).exists()
    second = jobs.launch(SLEEP, models / "second", models)
    assert jobs.status(models).job["run_name"] == "second" == second["run_name"]
    jobs.cancel(models)


def test_a_stale_lock_of_a_dead_process_is_cleared(models, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs.job_dir(models).mkdir()
    jobs._lock_file(models).write_text(json.dumps({"pid": dead.pid, "role": "runner"}))
    job = jobs.launch([sys.executable, "-c", "print('ok')"], models / "r", models)
    assert f"Clearing a stale training lock (pid {dead.pid} is gone)" in caplog.text
    assert ended(models).status == "finished"
    assert job["run_name"] == "r"


def test_after_an_app_restart_the_job_is_found_and_a_dead_runner_reported(models):
    job = jobs.launch(SLEEP, models / "r", models)
    wait_for(lambda: jobs.status(models).status == "running", what="running")
    jobs._children.clear()  # a restarted app knows only the files
    found = jobs.status(models)
    assert found.running and found.job["pid"] == job["pid"]
    with pytest.raises(JobRunningError):
        jobs.launch(SLEEP, models / "other", models)
    os.killpg(job["pid"], signal.SIGKILL)  # runner and trainer die without a word
    lost = wait_for(lambda: (s := jobs.status(models)).status == "lost" and s, what="lost")
    assert lost.cause.startswith("The job's runner stopped without recording how")
    assert lost.resumable and lost.phase == "Ended without a recorded exit"
    assert not jobs._lock_file(models).exists()  # the slot is free again


def test_a_job_that_ended_while_the_app_was_down_reports_its_exit(models):
    jobs.launch([sys.executable, "-c", "import sys; sys.exit(3)"], models / "r", models)
    jobs._children.clear()
    s = ended(models)
    assert (s.status, s.job["returncode"]) == ("failed", 3)
    assert s.cause == "Training stopped with exit status 3; see the log below."


def test_a_crash_shows_its_cause_and_the_log_tail(models):
    code = "print('epoch 1 done', flush=True); raise MemoryError('cannot grow the buffer')"
    jobs.launch([sys.executable, "-c", code], models / "oom", models)
    s = ended(models)
    assert s.status == "failed" and s.job["returncode"] == 1
    assert s.cause.startswith("Out of memory: lower the batch size")
    assert "epoch 1 done" in s.log and s.log[-2] == "MemoryError: cannot grow the buffer"


def test_a_training_error_is_the_cause(models, tmp_path):
    """The real trainer, given a weights file that does not exist: core.train logs the
    CXRError and exits 2; the cause is that message, not a traceback."""
    data = make_dataset(tmp_path / "ds", per_class=8)
    missing = tmp_path / "nope.pth"
    cmd = jobs.TrainSettings(data_dir=str(data), run_name="bad", arch="resnet18",
                             weights="none", img_size=32, epochs=1).command(models / "bad")
    cmd[cmd.index("--weights") + 1] = str(missing)
    jobs.launch(cmd, models / "bad", models)
    s = ended(models, timeout=240)
    assert (s.status, s.job["returncode"]) == ("failed", 2)
    assert s.cause == (f"Weights file not found: {missing}. Pass --weights imagenet, none, or "
                       "an existing .pth state dict.")


@pytest.mark.parametrize("lines, rc, cause", [
    (["RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"], 1, "Out of memory"),
    (["epoch 1 train"], -9, "The training process was killed (SIGKILL)"),
    (["Traceback (most recent call last):", '  File "x.py", line 1',
      "ValueError: bad value"], 1, "Training crashed: ValueError: bad value"),
    (["2026-01-01 ERROR core.train: Dataset folder not found: /x."], 2,
     "Dataset folder not found: /x."),
])
def test_failure_cause_from_the_log_and_exit_code(lines, rc, cause):
    assert jobs.failure_cause(lines, rc).startswith(cause)


def test_dataset_paths_are_confined_to_the_data_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    inside = make_dataset(root / "mine", per_class=7)
    outside = make_dataset(tmp_path / "elsewhere", per_class=7)
    (root / "link").symlink_to(outside)
    monkeypatch.setenv(jobs.ENV_DATA_ROOT, str(root))
    assert jobs.resolve_dataset_path("mine") == inside.resolve()
    assert jobs.check_dataset(str(inside)).ok
    (root / "mine" / "D").mkdir()  # an empty class: its message names no server path
    assert jobs.check_dataset("mine").problems == [
        "Class folder(s) with no images in mine: D. Add .png/.jpg/.jpeg images or remove the "
        "folder."]
    for text in (str(outside), "link", "../elsewhere", "/etc"):
        check = jobs.check_dataset(text)
        assert not check.ok and check.path is None and check.counts == {}
        assert check.problems == ["On this deployment datasets must lie inside its data "
                                  "folder (CXR_DATA_ROOT): enter a path relative to it."]
        assert str(tmp_path) not in check.problems[0]  # no server path shown
    with pytest.raises(DatasetError, match="must lie inside its data folder"):
        jobs.start(jobs.TrainSettings(data_dir=str(outside), run_name="x"))


def test_training_can_be_turned_off(models, tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_ALLOW, "0")
    assert not jobs.training_allowed()
    data = make_dataset(tmp_path / "ds", per_class=7)
    with pytest.raises(TrainingDisabledError, match=r"turned off on this deployment "
                       r"\(CXR_ALLOW_TRAINING=0\)"):
        jobs.start(jobs.TrainSettings(data_dir=str(data), run_name="x"), models)
    with pytest.raises(TrainingDisabledError):
        jobs.resume(models)
    assert not (models / "x").exists()
    monkeypatch.setenv(jobs.ENV_ALLOW, "1")
    assert jobs.training_allowed()


def test_check_dataset_counts_classes_and_lists_problems(tmp_path):
    data = make_dataset(tmp_path / "ds", per_class=9, classes=("A", "B"), layout="database")
    (data / "B" / "images" / "broken.png").write_bytes(b"not a png")
    check = jobs.check_dataset(str(data))
    assert check.ok and check.layout == "database"
    assert check.counts == {"A": 9, "B": 10} and check.checked == 19
    assert check.warnings == ["1 of 19 checked files cannot be read as images and will be "
                              "skipped: B/images/broken.png (UnidentifiedImageError: cannot "
                              f"identify image file '{data / 'B' / 'images' / 'broken.png'}')"]

    few = make_dataset(tmp_path / "few", per_class=3, classes=("A", "B"))
    assert jobs.check_dataset(str(few)).problems == [
        f"Class {c!r} has 3 image(s): at least 7 are needed for a train/validation/test split."
        for c in ("A", "B")]
    (tmp_path / "empty" / "A").mkdir(parents=True)
    write_png(tmp_path / "empty" / "B" / "b.png", make_blank())
    assert "Class folder(s) with no images" in jobs.check_dataset(str(tmp_path / "empty")).problems[0]
    (tmp_path / "none").mkdir()
    assert jobs.check_dataset(str(tmp_path / "none")).problems[0].startswith("No class folders")
    assert jobs.check_dataset(str(tmp_path / "absent")).problems == [
        f"No folder at {tmp_path / 'absent'}. Enter a folder with one sub-folder per class, or "
        "get the COVID-19 Radiography Database with `python -m core.data download`."]


def make_blank():
    import numpy as np

    return np.zeros((16, 16), np.uint8)


def test_settings_are_checked_before_a_job_starts(models, tmp_path):
    data = make_dataset(tmp_path / "ds", per_class=7)
    with pytest.raises(JobError, match="Run name '../x' is not valid"):
        jobs.start(jobs.TrainSettings(data_dir=str(data), run_name="../x"), models)
    (models / "taken").mkdir()
    (models / "taken" / "best.pt").write_bytes(b"")
    with pytest.raises(JobError, match="A run named 'taken' already exists"):
        jobs.start(jobs.TrainSettings(data_dir=str(data), run_name="taken"), models)
    with pytest.raises(DatasetError, match="at least 7"):
        jobs.start(jobs.TrainSettings(data_dir=str(make_dataset(tmp_path / "few", per_class=4)),
                                      run_name="few"), models)


def test_a_tiny_real_run_trains_reports_progress_and_becomes_the_newest_run(models, tmp_path):
    data = make_dataset(tmp_path / "ds", per_class=12, layout="database")
    settings = jobs.TrainSettings(data_dir=str(data), run_name="tiny", mode="finetune",
                                  epochs=2, img_size=32, arch="resnet18", weights="none",
                                  batch_size=8)
    job = jobs.start(settings, models)
    assert job["command"][:3] == [sys.executable, "-m", "core.train"]
    s = ended(models, timeout=600)
    assert s.status == "finished", (s.cause, s.log)
    assert s.phase == "Done: trained, calibrated and evaluated" and s.has_report
    train_rows = sum(1 for ln in (models / "tiny" / "manifest.csv").read_text().splitlines()
                     if ",train," in ln)
    steps = -(-train_rows // 8)
    assert [h["steps"] for h in s.history] == [steps, steps]
    p = s.progress
    assert (p["epoch"], p["epochs"], p["step"], p["steps_per_epoch"]) == (2, 2, steps, steps)
    assert p["phase"] == "finetune" and p["images_per_s"] > 0 and p["eta_s"] >= 0
    assert runs.list_runs(models)[0].name == "tiny"
    assert "Training job finished (exit status 0)" in "\n".join(s.log)


def test_default_run_names_never_collide_with_a_run(models):
    name = jobs.default_run_name(models)
    assert name.startswith("run-") and not jobs.run_exists(name, models)
    (models / name).mkdir()
    assert not jobs.run_exists(name, models)  # an empty folder is not a run
    (models / name / "train.log").write_text("")
    assert jobs.run_exists(name, models)
    other = jobs.default_run_name(models)
    assert other != name and not jobs.run_exists(other, models)


def test_progress_file_steps_and_pace(tmp_path, monkeypatch):
    """core.progress on a hand-made run folder: 10 training images in batches of 4 = 3
    steps per epoch; epoch and step from the global step and history.json."""
    from core.config import DataConfig, RunConfig, TrainConfig
    from core.progress import StepProgress

    out = tmp_path / "run"
    out.mkdir()
    rows = ["path,class,split,sha1,phash,dup_group"] + [
        f"x{i}.png,A,{'train' if i < 10 else 'val'},s,p,{i}" for i in range(13)]
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig(data=DataConfig(data_dir=str(tmp_path)),
                    train=TrainConfig(output=str(out), epochs=2, batch_size=4))
    clock = iter([100.0, 102.0, 104.0, 110.0, 112.0])
    monkeypatch.setattr("core.progress.time.time", lambda: next(clock))
    hook = StepProgress(out / "progress.json", cfg, interval=0.0)
    read = lambda: json.loads((out / "progress.json").read_text())  # noqa: E731
    hook(1)
    assert (read()["epoch"], read()["step"], read()["steps_per_epoch"]) == (1, 1, 3)
    assert read()["images_per_s"] is None  # no pace yet
    hook(2)
    assert read()["images_per_s"] == 2.0  # 4 images in 2 s
    assert read()["eta_s"] == 1 * 2.0 + 1 * 3 * 2.0  # one step left, then a 3-step epoch
    hook(3)
    (out / "history.json").write_text(json.dumps([{"epoch": 1, "steps": 3}]))
    hook(4)  # epoch 2's first step: epoch 1 took 10 s wall (with validation)
    p = read()
    assert (p["epoch"], p["step"], p["images_per_s"]) == (2, 1, 2.0)
    assert p["eta_s"] == 2 * 2.0
    hook(5)
    assert (read()["step"], read()["eta_s"]) == (2, 2.0)
