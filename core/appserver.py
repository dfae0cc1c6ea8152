"""The dashboard in a real browser: the Streamlit server as a subprocess, and Playwright
helpers to open its pages, wait until they are idle, upload files and read what is shown.

Used by the browser tests (``tests/test_browser.py``) and ``python -m core.bench app``, so
that both start and drive the app the same way. No Streamlit import here (the app runs in its
own process, ``streamlit run Home.py``); Playwright, a test dependency, is imported only by the
functions that need it. The browser is Debian's Chromium (``apt-get install chromium``):
Playwright cannot download its own browser on machines without internet.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run")
WAIT_S = 90.0  # default for every wait: generous for a loaded 2-core machine, yet finite


@dataclass(frozen=True)
class AppPage:
    """A page of the dashboard: its URL path (the file stem; "" for the default page), the
    title it shows (its ``st.title``) and its label in the sidebar (``st.Page``'s title)."""

    path: str
    title: str
    nav: str = ""

    @property
    def label(self) -> str:
        return self.nav or self.title


PAGES: tuple[AppPage, ...] = (
    AppPage("", "CXR Insight", nav="Home"),
    AppPage("executive_summary", "Executive Summary"),
    AppPage("data_explorer", "Data Explorer"),
    AppPage("model_performance", "Model Performance"),
    AppPage("explainability", "Explainability"),
    AppPage("clinical_predictions", "Clinical Predictions"),
    AppPage("business_impact", "Business Impact"),
)
CLINICAL = next(p for p in PAGES if p.path == "clinical_predictions")

# The Clinical Predictions page's UI contract (docs: notes/contracts.md).
UPLOAD_LABEL = "Upload chest X-rays"
PREDICTED_PREFIX = "Predicted class: "
ORIGINAL_CAPTION = "Original"
OVERLAY_CAPTION = "Grad-CAM overlay"
DOWNLOAD_LABEL = "Download results (CSV)"
CSV_NAME = "cxr-predictions.csv"

# Streamlit's DOM (1.40+): what tells that a run is going on or that something failed.
APP_VIEW = '[data-testid="stAppViewContainer"]'
EXCEPTION = '[data-testid="stException"]'
ERROR_ALERT = '[data-testid="stAlertContentError"]'


class AppServerError(RuntimeError):
    """The Streamlit server did not start or answer its health check."""


def chromium_path() -> str | None:
    """Chromium's executable on this machine, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
            return r.status == 200 and r.read().strip() == b"ok"
    except (urllib.error.URLError, OSError):
        return False


class AppServer:
    """``streamlit run <script>`` in a subprocess on a free local port.

    Use as a context manager (or :meth:`start` / :meth:`stop`): it waits for
    ``/_stcore/health`` and stops the server (and anything it started: it runs in its own
    process group) on exit, terminating first and killing after ``stop_timeout`` seconds.
    The server's output goes to :attr:`log_path`, shown in the error when it fails to start.
    """

    def __init__(self, script: str | Path = "Home.py", *, models_dir: str | Path | None = None,
                 port: int | None = None, env: dict[str, str] | None = None,
                 cwd: str | Path = ROOT, start_timeout: float = 120.0,
                 stop_timeout: float = 15.0) -> None:
        self.script = str(script)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = Path(cwd)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.env = {**os.environ, **(env or {})}
        if models_dir is not None:
            self.env["CXR_MODELS_DIR"] = str(models_dir)
        self.env["PYTHONPATH"] = os.pathsep.join(  # the app's own core (a clone's in cwd)
            p for p in (str(self.cwd), os.environ.get("PYTHONPATH", "")) if p)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "streamlit", "run", self.script,
                "--server.port", str(self.port), "--server.address", "127.0.0.1",
                "--server.headless", "true", "--browser.gatherUsageStats", "false",
                "--server.fileWatcherType", "none"]

    def output(self, tail: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]

    def start(self) -> AppServer:
        fd, name = tempfile.mkstemp(prefix="cxr-streamlit-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self._log = self.log_path.open("wb")
        log.info("starting %s", " ".join(self.command()))
        self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                out = self.output()
                self.stop()
                raise AppServerError(f"streamlit exited with code {code}:\n{out}")
            if _healthy(self.url):
                log.info("app server ready at %s", self.url)
                return self
            time.sleep(0.25)
        out = self.output()
        self.stop()
        raise AppServerError(f"streamlit did not answer {self.url}/_stcore/health within "
                             f"{self.start_timeout:.0f} s:\n{out}")

    def stop(self) -> None:
        """Terminate the server's process group, kill it if it is still there after
        ``stop_timeout`` seconds, and remove its log."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:  # alive: its group is still ours
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # its own group: nothing it started is left
                try:
                    proc.wait(timeout=self.stop_timeout)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("streamlit (pid %d) ignored %s", proc.pid, sig.name)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- browser


def launch_chromium(pw: Playwright, executable: str | None = None) -> Browser:
    """Debian's Chromium, headless, through Playwright's sync API."""
    path = executable or chromium_path()
    if path is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    return pw.chromium.launch(executable_path=path, headless=True, args=list(CHROMIUM_ARGS))


@contextlib.contextmanager
def chromium(executable: str | None = None) -> Iterator[Browser]:
    """A headless Chromium for the time of the ``with`` block (one Playwright instance)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw, executable)
        try:
            yield browser
        finally:
            browser.close()


# Busy while the app view is missing, a script runs (the status widget's running icon), the
# connection is (re)established, a spinner shows, elements of the previous run are stale, an
# image is still loading or a Plotly chart is not drawn yet.
# Idle only once nothing of that has been seen for ``quiet`` ms; returns the moment
# (performance.now()) idleness began, so that timings leave the quiet period out.
_IDLE_JS = """
([quiet, key]) => {
  const q = (s) => document.querySelector(s);
  const busy = !q('[data-testid="stAppViewContainer"]')
    || q('[data-testid="stStatusWidgetRunningIcon"]')
    || q('[data-testid="stStatusWidgetRunningManIcon"]')
    || q('[data-testid="stConnectionStatus"]')
    || q('[data-testid="stSpinner"]')
    || q('[data-testid="stSkeleton"]')
    || q('[data-stale="true"]')
    || [...document.querySelectorAll('[data-testid="stMain"] img')]
         .some(i => i.loading !== 'lazy' && !i.complete)
    || [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
         .some(c => !c.querySelector('.main-svg'));
  const now = performance.now();
  if (busy) { window[key] = null; return false; }
  if (window[key] == null) window[key] = now;
  return now - window[key] >= quiet ? window[key] : false;
}
"""


def wait_idle(page: Page, timeout: float = WAIT_S, quiet_ms: float = 500.0) -> float:
    """Wait until the app is idle: the app view is there and, for ``quiet_ms`` in a row, no
    script is running, no spinner or stale element shows, the connection is up and every
    image and Plotly chart in the main area is drawn.

    Returns the page clock (``performance.now()``, ms) at which idleness began. Raises
    Playwright's ``TimeoutError`` after ``timeout`` seconds.
    """
    page.wait_for_selector(APP_VIEW, state="attached", timeout=timeout * 1000)
    key = f"__cxrIdle{time.monotonic_ns()}"
    handle = page.wait_for_function(_IDLE_JS, arg=[quiet_ms, key], polling=50,
                                    timeout=timeout * 1000)
    return float(handle.json_value())


def page_url(base_url: str, app_page: AppPage | str) -> str:
    path = app_page.path if isinstance(app_page, AppPage) else app_page
    return f"{base_url}/{path}"


def open_page(page: Page, base_url: str, app_page: AppPage, timeout: float = WAIT_S) -> float:
    """Open ``app_page`` by its URL and wait until its title shows and the app is idle.

    Returns the milliseconds from the start of navigation to the moment the app became idle.
    """
    page.goto(page_url(base_url, app_page), wait_until="commit", timeout=timeout * 1000)
    page.get_by_role("heading", name=app_page.title, exact=True).first.wait_for(
        timeout=timeout * 1000)
    return wait_idle(page, timeout)  # a new document: performance.now() counts from its start


def navigate(page: Page, app_page: AppPage, timeout: float = WAIT_S) -> float:
    """Go to ``app_page`` by its sidebar link (no reload: the same session), wait until its
    title shows and the app is idle; returns the milliseconds from the click to idle."""
    link = page.locator('[data-testid="stSidebarNavLink"]').filter(has_text=app_page.label)
    link.first.wait_for(timeout=timeout * 1000)
    start = float(page.evaluate("() => performance.now()"))
    link.first.click(timeout=timeout * 1000)
    page.get_by_role("heading", name=app_page.title, exact=True).first.wait_for(
        timeout=timeout * 1000)
    return wait_idle(page, timeout) - start


def errors_on_page(page: Page) -> list[str]:
    """The text of every exception and error alert the page shows."""
    return [e.inner_text() for e in page.locator(f"{EXCEPTION}, {ERROR_ALERT}").all()]


def file_payload(path: Path | str) -> dict[str, Any]:
    """A file as Playwright's upload payload {name, mimeType, buffer}."""
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return {"name": path.name, "mimeType": mime, "buffer": path.read_bytes()}


def upload(page: Page, files: Sequence[Path | str | dict[str, Any]],
           label: str = UPLOAD_LABEL, timeout: float = WAIT_S) -> None:
    """Give ``files`` (paths, or Playwright payloads {name, mimeType, buffer}) to the file
    uploader labelled ``label`` through its ``input[type=file]``; replaces what it held."""
    payloads = [f if isinstance(f, dict) else file_payload(f) for f in files]
    uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text=label)
    uploader.wait_for(timeout=timeout * 1000)
    uploader.locator('input[type="file"]').set_input_files(payloads, timeout=timeout * 1000)


def wait_for_predictions(page: Page, n: int, timeout: float = WAIT_S, idle: bool = True) -> None:
    """Wait until ``n`` predictions show (``Predicted class: ``), each with its Grad-CAM
    overlay image loaded, and then (``idle``) until the app is idle."""
    page.wait_for_function(
        """([n, prefix, caption]) => {
          const main = document.querySelector('[data-testid="stMain"]');
          const texts = main ? main.innerText.split('\\n').filter(l => l.includes(prefix)) : [];
          const overlays = [...document.querySelectorAll('[data-testid="stImage"]')]
            .filter(e => (e.innerText || '').trim() === caption)
            .map(e => e.querySelector('img'))
            .filter(img => img && img.complete && img.naturalWidth > 0);
          return texts.length >= n && overlays.length >= n;
        }""",
        arg=[n, PREDICTED_PREFIX, OVERLAY_CAPTION], polling=50, timeout=timeout * 1000)
    if idle:
        wait_idle(page, timeout)


def predicted_classes(page: Page, classes: Sequence[str] = ()) -> list[str]:
    """What follows each ``Predicted class: `` in the main area, in page order: the longest
    of ``classes`` it starts with, else the rest of its line."""
    text = page.locator('[data-testid="stMain"]').inner_text()
    out = []
    for line in text.splitlines():
        if PREDICTED_PREFIX not in line:
            continue
        rest = line.split(PREDICTED_PREFIX, 1)[1].strip(" *`_")
        known = sorted((c for c in classes if rest.startswith(c)), key=len, reverse=True)
        out.append(known[0] if known else rest)
    return out


def screenshot(page: Page, path: Path, max_height: int = 12000) -> Path:
    """A full-page screenshot of ``page`` at ``path`` (folders created).

    Streamlit scrolls its main area (``stMain``) inside a window-high page, so a plain
    full-page screenshot would stop at the window's bottom: the window is made as tall as the
    main area's content for the shot (at most ``max_height`` px), then set back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = int(page.evaluate(
        "() => Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], "
        "[data-testid=\"stSidebarContent\"]')].map(e => e.scrollHeight), 0)"))
    if size is not None and height > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(height, max_height)})
        try:
            wait_idle(page, quiet_ms=300)  # charts re-draw at the new size
            page.screenshot(path=str(path), full_page=True)
        finally:
            page.set_viewport_size(size)
    else:
        page.screenshot(path=str(path), full_page=True)
    return path


def artifacts_dir() -> Path:
    """Where screenshots go: ``$CXR_ARTIFACTS_DIR``, else ``<repo>/out/screenshots``."""
    return Path(os.environ.get("CXR_ARTIFACTS_DIR") or ROOT / "out" / "screenshots")
