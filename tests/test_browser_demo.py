"""A fresh clone, the README's app command, a real browser: the shipped demo model answers.

The repository is cloned at this checkout's HEAD into a temporary folder, with no run under
``models/`` and no dataset beside it (``../shared`` is absent from there). The shipped demo
(``assets/demo``) comes with the clone; while it is not committed yet, the files of this
checkout's ``assets/demo`` are copied into the clone. ``streamlit run Home.py`` is started
in the clone (``core.appserver.AppServer``); in Chromium a real X-ray from
``../shared/data/cxr-real`` is uploaded on Clinical Predictions and must get the class that
``core.inference.Predictor`` gives for it with the shipped weights, with its Grad-CAM
overlay; the Executive Summary must show the demo's label and its test accuracy from its
report. Serving the demo must not write into the clone (its exported graph goes to the
user's cache folder).

Skipped, with the reason, where Chromium, git, the shipped demo or the real X-rays are absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from core import appserver, demo, runs
from core.appserver import CLINICAL, PAGES
from tests.conftest import REAL_DIR, ROOT, require_real

pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                    "(pip install -r requirements-dev.txt)")

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

WAIT = 180.0  # the first upload exports the demo's network (a ResNet50: tens of seconds)
SHIPPED = ROOT / "assets" / "demo"

CHROMIUM = appserver.chromium_path()
if CHROMIUM is None:
    pytest.skip(f"no Chromium found on PATH ({', '.join(appserver.CHROMIUM_NAMES)}): install "
                "Debian's with `apt-get install chromium`", allow_module_level=True)
if shutil.which("git") is None:
    pytest.skip("git is not installed: the test clones the repository", allow_module_level=True)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository at HEAD in a fresh folder, with the shipped demo (copied from this
    checkout while it is not committed)."""
    if not (SHIPPED / "best.pt").is_file():
        pytest.skip(f"no shipped demo at {SHIPPED}: build it with `python -m core.demo build`")
    require_real()
    folder = tmp_path_factory.mktemp("fresh") / "cxr-insight"
    git("clone", "--quiet", "--no-checkout", str(ROOT), str(folder), cwd=folder.parent)
    git("checkout", "--quiet", git("rev-parse", "HEAD").strip(), cwd=folder)
    if not git("ls-files", "assets/demo/best.pt").strip():  # not committed yet
        shutil.copytree(SHIPPED, folder / "assets" / "demo", dirs_exist_ok=True)
    assert not (folder / "models").exists() or [p.name for p in (folder / "models").iterdir()] \
        == ["README.md"]
    assert not (folder.parent / "shared").exists()  # no dataset beside the clone
    return folder


def tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size)
                  for p in folder.rglob("*") if p.is_file())


def test_a_fresh_clone_classifies_an_uploaded_x_ray_with_the_shipped_demo(clone, tmp_path):
    from core.inference import Predictor

    shipped = clone / "assets" / "demo"
    shipped_before = tree(shipped)
    status_before = git("status", "--porcelain", cwd=clone)
    xray = sorted((REAL_DIR / "COVID" / "images").glob("*.png"))[0]
    expected = Predictor.from_checkpoint(shipped / "best.pt").predict(xray.read_bytes())
    report = json.loads((shipped / "report" / "metrics.json").read_text())
    acc = report["overall"]["accuracy"]["value"]
    label = demo.label(runs.load_run(shipped))
    env = {"CXR_DEMO": "1", "CXR_MODELS_DIR": str(clone / "models"),
           "CXR_DEMO_DIR": str(clone / "assets" / "demo"),
           "CXR_DATA_HOME": str(tmp_path / "user-data")}
    with appserver.AppServer("Home.py", cwd=clone, env=env, start_timeout=WAIT) as server, \
            appserver.chromium(CHROMIUM) as browser:
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(WAIT * 1000)
        page = context.new_page()
        try:
            appserver.open_page(page, server.url, CLINICAL, timeout=WAIT)
            assert page.get_by_text(label, exact=False).count() >= 1
            appserver.upload(page, [xray], timeout=WAIT)
            appserver.wait_for_predictions(page, 1, timeout=WAIT)
            assert appserver.errors_on_page(page) == []
            assert appserver.predicted_classes(page, expected.classes) == [expected.label]
            overlay = page.locator('[data-testid="stImage"]').filter(
                has_text=appserver.OVERLAY_CAPTION)
            assert overlay.count() == 1
            assert overlay.first.locator("img").evaluate("i => i.naturalWidth") > 0

            summary = next(p for p in PAGES if p.path == "executive_summary")
            appserver.open_page(page, server.url, summary, timeout=WAIT)
            main = page.locator('[data-testid="stMain"]').inner_text()
            assert " ".join(label.split()) in " ".join(main.split())
            assert f"{100 * acc:.1f}%" in main  # the accuracy KPI, from the demo's report
            assert not [e for e in appserver.errors_on_page(page) if "Traceback" in e]
        finally:
            context.close()
    # serving the demo wrote nothing into the clone: the graph went to the user's cache
    assert tree(clone / "assets" / "demo") == shipped_before
    assert git("status", "--porcelain", cwd=clone) == status_before
    assert list((tmp_path / "user-data" / "cache").glob("demo-*/best.onnx"))
