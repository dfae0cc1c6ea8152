"""Background training jobs for the app's Training page (no Streamlit here).

One job at a time runs ``python -m core.train`` under a small runner process
(``python -m core.jobs run JOB_FILE``), started in a new session so that it outlives the
browser tab and the app's rerun. Everything about the job lives in files, never in a
browser session, so a refresh, a second tab or a restarted app finds it again:

| file | what |
| --- | --- |
| ``models/.training/job.json`` | the current (or last) job: run folder, command, runner and trainer pids, status, exit code, cause of a failure |
| ``models/.training/lock`` | ``{"pid"}`` of the process that holds the one training slot (a dead pid is a stale lock and is cleared) |
| ``models/<run>/train.log`` | the trainer's output |
| ``models/<run>/progress.json`` | step progress (:mod:`core.progress`) |
| ``models/<run>/history.json`` | one row per finished epoch (``core.train``) |

The runner records the trainer's exit code and a plain cause in ``job.json`` when it ends.
Cancel sends SIGINT to the job's process group: the trainer stops where it is and its
``last.pt`` (written atomically at the end of each epoch) stays resumable; Resume runs the
same command with ``--resume``.

Deployment settings (environment): ``CXR_ALLOW_TRAINING=0`` turns in-app training off;
``CXR_DATA_ROOT`` confines dataset paths to that folder (symlinks resolved).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from core import runs
from core.config import ARCHS, DEFAULT_DATA_DIR, DEFAULT_PRESET, LUNG_VIEWS, MODES, PRESETS
from core.errors import DatasetError, JobError, JobRunningError, TrainingDisabledError
from core.progress import PROGRESS_FILE, write_json_atomic

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ENV_ALLOW = "CXR_ALLOW_TRAINING"
ENV_DATA_ROOT = "CXR_DATA_ROOT"
JOB_DIR = ".training"
LOG_FILE = "train.log"
RUNNING = ("starting", "running")
ENDED = ("finished", "failed", "cancelled", "lost")
MIN_PER_CLASS = 7  # the smallest class that core.data can split into train/val/test
CANCEL_GRACE_S = 30.0  # after a cancel, the runner kills a trainer still alive this long
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_children: dict[int, subprocess.Popen] = {}  # runners this process started (reaped in status)


# ---------------------------------------------------------------- deployment settings


def training_allowed() -> bool:
    """False where ``CXR_ALLOW_TRAINING`` is 0/false/no/off (a shared deployment)."""
    return os.environ.get(ENV_ALLOW, "1").strip().lower() not in ("0", "false", "no", "off")


def data_root() -> Path | None:
    """``CXR_DATA_ROOT`` resolved, or None where dataset paths are not confined."""
    value = os.environ.get(ENV_DATA_ROOT, "").strip()
    return Path(value).expanduser().resolve() if value else None


def require_training_allowed() -> None:
    if not training_allowed():
        raise TrainingDisabledError(
            f"In-app training is turned off on this deployment ({ENV_ALLOW}=0). Train from the "
            "command line (python -m core.train --help); the run then appears here.")


def resolve_dataset_path(text: str) -> Path:
    """The dataset folder a user typed, resolved (symlinks too). Relative paths are taken
    inside ``CXR_DATA_ROOT`` where it is set (and a path outside it is refused with a
    DatasetError before anything is read there), else inside the repository."""
    text = text.strip()
    if not text:
        raise DatasetError("Enter the path of a dataset folder (one sub-folder per class).")
    root = data_root()
    path = Path(text).expanduser()
    if not path.is_absolute():  # inside the data root, else the repository (like the CLI)
        path = (root or ROOT) / path
    path = path.resolve()
    if root is not None and not path.is_relative_to(root):
        raise DatasetError(f"On this deployment datasets must lie inside its data folder "
                           f"({ENV_DATA_ROOT}): enter a path relative to it.")
    return path


# ---------------------------------------------------------------- dataset check


@dataclass(frozen=True)
class DatasetCheck:
    """What the Training page shows before anything starts."""

    path: Path | None
    counts: dict[str, int] = field(default_factory=dict)
    layout: str = ""
    problems: list[str] = field(default_factory=list)  # blocking
    warnings: list[str] = field(default_factory=list)  # training skips these files
    checked: int = 0

    @property
    def ok(self) -> bool:
        return self.path is not None and not self.problems and bool(self.counts)


def _unreadable(path: Path) -> str | None:
    """Why an image file's header cannot be read, or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if w > 0 and h > 0 else "empty image"


def check_dataset(text: str, sample_per_class: int = 300) -> DatasetCheck:
    """Classes and images per class of a dataset folder (:func:`core.data.discover`), with
    what would stop training (no classes, an empty class, too few images to split) as
    problems, and image files whose header cannot be read (checked on up to
    ``sample_per_class`` files per class, evenly spread) as warnings."""
    from core.data import discover  # imports torch: only where a dataset is checked

    try:
        path = resolve_dataset_path(text)
    except DatasetError as exc:
        return DatasetCheck(path=None, problems=[str(exc)])
    if not path.exists():
        return DatasetCheck(path=path, problems=[
            f"No folder at {text.strip()}. Enter a folder with one sub-folder per class, or get "
            "the COVID-19 Radiography Database with `python -m core.data download`."])
    try:
        ds = discover(path)
    except DatasetError as exc:
        return DatasetCheck(path=path, problems=[_hide_root(str(exc))])
    except OSError as exc:
        return DatasetCheck(path=path, problems=[f"Cannot read {path}: {exc.strerror}."])
    counts = ds.counts()
    problems = [f"Class {cls!r} has {n} image(s): at least {MIN_PER_CLASS} are needed for a "
                "train/validation/test split." for cls, n in counts.items() if n < MIN_PER_CLASS]
    bad: list[str] = []
    checked = 0
    for cls in ds.classes:
        files = [rel for rel, c in ds.items if c == cls]
        stride = max(1, len(files) // sample_per_class)
        for rel in files[::stride][:sample_per_class]:
            checked += 1
            why = _unreadable(path / rel)
            if why:
                bad.append(f"{rel} ({why})")
    warnings = []
    if bad:
        shown = "; ".join(bad[:5]) + ("; …" if len(bad) > 5 else "")
        warnings.append(f"{len(bad)} of {checked} checked files cannot be read as images "
                        f"and will be skipped: {shown}")
    return DatasetCheck(path=path, counts=counts, layout=ds.layout, problems=problems,
                        warnings=[_hide_root(w) for w in warnings], checked=checked)


def _hide_root(message: str) -> str:
    """``message`` with the data root's server path cut off the paths it names."""
    root = data_root()
    return message.replace(f"{root}/", "").replace(str(root), ".") if root else message


# ---------------------------------------------------------------- settings and command


@dataclass(frozen=True)
class TrainSettings:
    """What the Training page asks for. Defaults: the recipe chosen for a CPU
    (``core.config.PRESETS["cpu-lungs"]``: from scratch, needs no download, soft lung view,
    stronger augmentation); the fields set here override the recipe's, the rest of it
    (augmentation, schedule) comes with ``--preset``."""

    data_dir: str
    run_name: str
    mode: str = PRESETS[DEFAULT_PRESET]["mode"]
    epochs: int = PRESETS[DEFAULT_PRESET]["epochs"]
    img_size: int = PRESETS[DEFAULT_PRESET]["img_size"]
    lung_view: str = PRESETS[DEFAULT_PRESET]["lung_view"]
    arch: str = PRESETS[DEFAULT_PRESET]["arch"]
    weights: str = PRESETS[DEFAULT_PRESET]["weights"]
    batch_size: int = 32
    max_per_class: int = 0
    preset: str = DEFAULT_PRESET

    def validate(self) -> None:
        if not RUN_NAME.match(self.run_name):
            raise JobError(f"Run name {self.run_name!r} is not valid: use letters, digits, '.', "
                           "'_' or '-' (at most 64, no folders).")
        for name, value, choices in (("mode", self.mode, MODES), ("arch", self.arch, ARCHS),
                                     ("lung view", self.lung_view, LUNG_VIEWS),
                                     ("weights", self.weights, ("imagenet", "none"))):
            if value not in choices:
                raise JobError(f"{name} {value!r} is not valid; choose one of {', '.join(choices)}.")
        if not (1 <= self.epochs <= 500 and 32 <= self.img_size <= 1024
                and 1 <= self.batch_size <= 1024 and self.max_per_class >= 0):
            raise JobError("epochs 1-500, image size 32-1024, batch size 1-1024, images per "
                           "class 0 (all) or more.")

    def command(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "core.train", "--preset", self.preset,
                "--data-dir", self.data_dir,
                "--output", str(run_dir), "--mode", self.mode, "--epochs", str(self.epochs),
                "--img-size", str(self.img_size), "--lung-view", self.lung_view,
                "--arch", self.arch, "--weights", self.weights,
                "--batch-size", str(self.batch_size), "--max-per-class", str(self.max_per_class),
                "--progress-file", str(run_dir / PROGRESS_FILE), "--quiet"]


def run_exists(name: str, models: Path | None = None) -> bool:
    """Whether ``models/<name>`` is taken: a folder with anything in it (a run, a stopped
    one, or one being trained)."""
    folder = (models or runs.models_dir()) / name
    return bool(name) and folder.is_dir() and any(folder.iterdir())


def default_run_name(models: Path | None = None) -> str:
    """``run-<date>-<time>``, with a suffix where that run exists already."""
    base = time.strftime("run-%Y%m%d-%H%M%S")
    name, k = base, 1
    while run_exists(name, models):
        k += 1
        name = f"{base}-{k}"
    return name


# ---------------------------------------------------------------- files and processes


def job_dir(models: Path | None = None) -> Path:
    return (models or runs.models_dir()) / JOB_DIR


def _job_file(models: Path | None = None) -> Path:
    return job_dir(models) / "job.json"


def _lock_file(models: Path | None = None) -> Path:
    return job_dir(models) / "lock"


def _runner_file(models: Path | None = None) -> Path:
    return job_dir(models) / "runner.json"


def read_job(models: Path | None = None) -> dict[str, Any] | None:
    """The current job: ``job.json`` (written by the app that started it) merged with what
    its runner recorded (``runner.json``: status, trainer pid, exit code, cause)."""
    try:
        job = json.loads(_job_file(models).read_text())
    except (OSError, ValueError):
        return None
    runner = runs._read_optional(_runner_file(models))
    if runner and runner.get("started") == job.get("started"):
        job.update({k: v for k, v in runner.items() if k != "started"})
    return job


def _update_job(job_file: Path, **changes: Any) -> dict[str, Any]:
    job = json.loads(job_file.read_text())
    job.update(changes)
    write_json_atomic(job_file, job)
    return job


def pid_alive(pid: int | None, runner: bool = False) -> bool:
    """A live, non-zombie process; with ``runner`` it must also be a ``core.jobs`` runner
    (so that a recycled pid is not taken for the job)."""
    for child in list(_children.values()):
        child.poll()  # reap the runners this process started
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not runner or "core.jobs" in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _lock_holder(models: Path | None) -> dict[str, Any] | None:
    try:
        return json.loads(_lock_file(models).read_text())
    except (OSError, ValueError):
        return None


def _acquire_lock(models: Path | None) -> None:
    """Take the one training slot or raise JobRunningError; a stale lock is cleared."""
    lock = _lock_file(models)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(models) or {}
            if pid_alive(holder.get("pid"), runner=holder.get("role") == "runner"):
                raise JobRunningError(_running_message(read_job(models))) from None
            log.warning("Clearing a stale training lock (pid %s is gone)", holder.get("pid"))
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "role": "app"}, fh)
        return
    raise JobRunningError(_running_message(read_job(models)))


def _running_message(job: dict[str, Any] | None) -> str:
    if not job:
        return "A training job is already running. Only one runs at a time: wait for it."
    started = time.strftime("%H:%M:%S", time.localtime(job.get("started", 0)))
    return (f"A training job is already running: run {job.get('run_name')!r}, started at "
            f"{started}. Only one runs at a time: follow it below, or cancel it first.")


def _release_lock(models: Path | None, pid: int) -> None:
    holder = _lock_holder(models)
    if holder is not None and holder.get("pid") == pid:
        _lock_file(models).unlink(missing_ok=True)


def launch(command: list[str], run_dir: Path, models: Path | None = None,
           **meta: Any) -> dict[str, Any]:
    """Start ``command`` as the one background job (its runner in a new session), logging
    to ``run_dir/train.log``; raise JobRunningError while another job runs."""
    _acquire_lock(models)
    job_file = _job_file(models)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        job = {"run_name": run_dir.name, "run_dir": str(run_dir), "command": command,
               "log": str(run_dir / LOG_FILE), "started": time.time(), "status": "starting",
               "pid": None, "child_pid": None, "returncode": None, "ended": None,
               "cause": None, "cancel_requested": False, **meta}
        write_json_atomic(job_file, job)
        with open(job["log"], "a") as out:
            runner = subprocess.Popen(
                [sys.executable, "-m", "core.jobs", "run", str(job_file)], cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except OSError as exc:
        _release_lock(models, os.getpid())
        raise JobError(f"Could not start the training job: {exc}") from exc
    _children[runner.pid] = runner
    return _update_job(job_file, pid=runner.pid)


def start(settings: TrainSettings, models: Path | None = None) -> dict[str, Any]:
    """Check the settings and the dataset, then start training (see :func:`launch`)."""
    require_training_allowed()
    settings.validate()
    check = check_dataset(settings.data_dir)
    if not check.ok:
        raise DatasetError(" ".join(check.problems) or "The dataset folder holds no images.")
    models = models or runs.models_dir()
    run_dir = models / settings.run_name
    if run_exists(settings.run_name, models):
        raise JobError(f"A run named {settings.run_name!r} already exists: choose another name "
                       "(or resume it, if it was stopped).")
    settings = TrainSettings(**{**asdict(settings), "data_dir": str(check.path)})
    return launch(settings.command(run_dir), run_dir, models, settings=asdict(settings))


def display_path(path: str | Path) -> str:
    """A server path as a visitor may see it: relative to ``CXR_DATA_ROOT`` where it is set
    (the deployment's layout stays hidden), else as it is."""
    root = data_root()
    path = Path(path)
    return path.relative_to(root).as_posix() if root and path.is_relative_to(root) else str(path)


def download_dest() -> Path:
    """Where the app's download puts the database: inside ``CXR_DATA_ROOT`` where it is set,
    else the repository's ``data/COVID-19_Radiography_Dataset``."""
    root = data_root()
    return root / Path(DEFAULT_DATA_DIR).name if root else ROOT / DEFAULT_DATA_DIR


def start_download(models: Path | None = None) -> dict[str, Any]:
    """``python -m core.data download`` as the one background job (it is long and heavy on
    the disk, like training); its log goes to ``models/.training/download/train.log``."""
    require_training_allowed()
    dest = download_dest()
    command = [sys.executable, "-m", "core.data", "download", "--dest", str(dest)]
    return launch(command, job_dir(models) / "download", models, kind="download",
                  dest=str(dest))


def resume(models: Path | None = None) -> dict[str, Any]:
    """Run the last job's command again with ``--resume`` (it continues from ``last.pt``)."""
    require_training_allowed()
    job = read_job(models)
    if not job:
        raise JobError("There is no training job to resume.")
    if job["status"] in RUNNING and pid_alive(job.get("pid"), runner=True):
        raise JobRunningError(_running_message(job))
    if job["status"] == "finished" or job.get("kind") == "download":
        raise JobError(f"Job {job['run_name']!r} cannot be resumed: start it again.")
    command = list(job["command"])
    if "--resume" not in command:
        command.append("--resume")
    meta = {k: v for k, v in job.items() if k == "settings"}
    return launch(command, Path(job["run_dir"]), models, resumed=True, **meta)


def cancel(models: Path | None = None, wait_s: float = 15.0) -> dict[str, Any]:
    """Stop the running job (SIGINT to its process group: the trainer leaves ``last.pt`` of
    its last finished epoch) and wait up to ``wait_s`` for the runner to record it."""
    job = read_job(models)
    if not job or job["status"] not in RUNNING or not pid_alive(job.get("pid"), runner=True):
        raise JobError("No training job is running.")
    _update_job(_job_file(models), cancel_requested=True)
    deadline = time.monotonic() + 10.0  # a runner still starting has no signal handler yet
    while job["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = read_job(models) or job
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job["pid"], signal.SIGINT)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and pid_alive(job["pid"], runner=True):
        time.sleep(0.2)
    return read_job(models) or job


# ---------------------------------------------------------------- status


def log_tail(path: str | Path, lines: int = 20) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-lines:]


_OOM = ("out of memory", "outofmemoryerror", "can't allocate memory", "memoryerror",
        "cannot allocate memory")
_LOGGED = re.compile(r"ERROR (?:core\.[\w.]+|__main__): (.+)$")  # python -m core.X logs as __main__
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)$")


def failure_cause(lines: list[str], returncode: int | None) -> str:
    """A plain cause of a failed run from its exit code and its log's last lines."""
    text = "\n".join(lines).lower()
    if any(s in text for s in _OOM):
        return ("Out of memory: lower the batch size or the image size (or train in head "
                "mode), then start again.")
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return ("The training process was killed (SIGKILL), most often by the system when "
                "memory runs out: lower the batch size or the image size.")
    for line in reversed(lines):
        m = _LOGGED.search(line)
        if m:
            return m.group(1)
    for line in reversed(lines):
        m = _RAISED.match(line.strip())
        if m:
            return f"Training crashed: {m.group(1)}"
    return f"Training stopped with exit status {returncode}; see the log below."


@dataclass(frozen=True)
class JobStatus:
    """What the Training page shows of the current job."""

    job: dict[str, Any]
    status: str  # starting | running | finished | failed | cancelled | lost
    phase: str
    progress: dict[str, Any] | None
    history: list[dict[str, Any]]
    log: list[str]
    cause: str | None
    resumable: bool

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    @property
    def run_dir(self) -> Path:
        return Path(self.job["run_dir"])

    @property
    def has_report(self) -> bool:
        return (self.run_dir / "report" / "metrics.json").is_file()

    @property
    def latest(self) -> dict[str, Any]:
        """The last finished epoch's row of ``history.json`` (empty before the first)."""
        return self.history[-1] if self.history else {}

    @property
    def fraction(self) -> float:
        """Share of the training steps done (0 before the first step, 1 once finished)."""
        if self.status == "finished":
            return 1.0
        p = self.progress or {}
        if not p.get("epochs") or not p.get("steps_per_epoch"):
            return 0.0
        done = p["epoch"] - 1 + p["step"] / p["steps_per_epoch"]
        return min(1.0, max(0.0, done / p["epochs"]))


def fmt_duration(seconds: float | None) -> str:
    """``2 h 05 min``, ``4 min 10 s``, ``35 s``; an em dash when unknown."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _phase(job: dict[str, Any], status: str, progress: dict[str, Any] | None,
           lines: list[str]) -> str:
    if job.get("kind") == "download" and status in RUNNING:
        return "Downloading the COVID-19 Radiography Database from Kaggle, then checking it"
    if job.get("kind") == "download" and status == "finished":
        return "Done: downloaded and checked"
    if status == "finished":
        return "Done: trained, calibrated and evaluated"
    if status in ENDED:
        return {"failed": "Failed", "cancelled": "Cancelled",
                "lost": "Ended without a recorded exit"}[status]
    run_dir = Path(job["run_dir"])
    if job.get("cancel_requested"):
        return "Stopping"
    if any("finished after epoch" in ln for ln in lines):
        return "Finishing: calibration, OOD statistics, int8 check and the test report"
    if progress and progress.get("updated", 0) >= job["started"]:
        return f"Training ({progress.get('phase', '')})"
    if (run_dir / "manifest.csv").is_file():
        return "Preparing the model (head mode: computing backbone features)" \
            if (job.get("settings") or {}).get("mode") == "head" else "Preparing the model"
    return "Preparing data: reading, hashing and splitting the images"


def status(models: Path | None = None) -> JobStatus | None:
    """The current (or last) job's state, from its files; None before the first job. A
    job whose runner is gone without recording an exit is ``lost`` (and its lock freed)."""
    job = read_job(models)
    if not job:
        return None
    state = job["status"]
    just_started = job.get("pid") is None and time.time() - job["started"] < 10
    if state in RUNNING and not just_started and not pid_alive(job.get("pid"), runner=True):
        time.sleep(0.2)  # the runner may be writing its final status right now
        job = read_job(models) or job
        state = job["status"]
        if state in RUNNING:
            state = "lost"
            holder = _lock_holder(models) or {}
            if not (holder.get("role") == "runner" and pid_alive(holder.get("pid"), True)):
                _lock_file(models).unlink(missing_ok=True)  # its runner is gone: free the slot
    run_dir = Path(job["run_dir"])
    lines = log_tail(job["log"])
    progress = runs._read_optional(run_dir / PROGRESS_FILE)
    history = runs._read_optional(run_dir / "history.json") or []
    cause = job.get("cause")
    if state == "lost":
        cause = ("The job's runner stopped without recording how training ended (the machine "
                 "or the app restarted, or the process was killed).")
    resumable = state in ("failed", "cancelled", "lost") and job.get("kind") != "download"
    return JobStatus(job=job, status=state, phase=_phase(job, state, progress, lines),
                     progress=progress, history=list(history), log=lines, cause=cause,
                     resumable=resumable)


# ---------------------------------------------------------------- the runner


def run(job_file: Path) -> int:
    """The runner: take the lock, start the job's command, wait for it, record its exit in
    ``runner.json`` and free the lock. SIGINT/SIGTERM (a cancel) reach the trainer through
    the process group; a trainer still alive ``CANCEL_GRACE_S`` later is killed."""
    job = json.loads(job_file.read_text())
    models = job_file.parent.parent
    runner_file = _runner_file(models)
    stop_at: list[float] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not stop_at:
            stop_at.append(time.monotonic() + CANCEL_GRACE_S)

    def record(**state: Any) -> None:
        write_json_atomic(runner_file, {"started": job["started"], "pid": os.getpid(), **state})

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    write_json_atomic(_lock_file(models), {"pid": os.getpid(), "role": "runner"})
    log.info("Starting: %s", " ".join(job["command"]))
    try:
        child = subprocess.Popen(job["command"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except OSError as exc:
        record(status="failed", returncode=None, ended=time.time(),
               cause=f"The trainer could not be started: {exc}")
        _release_lock(models, os.getpid())
        return 1
    record(status="running", child_pid=child.pid)
    while True:
        try:
            rc = child.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if stop_at and time.monotonic() > stop_at[0]:
                log.warning("The trainer did not stop within %.0f s: killing it", CANCEL_GRACE_S)
                child.kill()
    cancelled = bool(stop_at) or bool(json.loads(job_file.read_text()).get("cancel_requested"))
    if cancelled:
        state, cause = "cancelled", None
    elif rc == 0:
        state, cause = "finished", None
    else:
        state, cause = "failed", failure_cause(log_tail(job["log"], 40), rc)
    log.info("Training job %s (exit status %s)", state, rc)
    record(status=state, child_pid=child.pid, returncode=rc, ended=time.time(), cause=cause)
    _release_lock(models, os.getpid())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.jobs",
                                 description="Runner of the app's background training jobs.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a job file (the app starts this)").add_argument("job_file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(Path(args.job_file))


if __name__ == "__main__":
    sys.exit(main())
