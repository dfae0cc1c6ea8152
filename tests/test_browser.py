"""The dashboard in a real browser (Chromium driven by Playwright's sync API).

The app is started once for this module as ``streamlit run Home.py`` on a free port with
``CXR_MODELS_DIR`` pointed at the ``small_run`` fixture (``core.appserver.AppServer``, the
same helper ``python -m core.bench app`` uses). Every page is opened by its URL and must show
its title and no exception or error; the Clinical Predictions page (its UI contract is in
``core.appserver``) must show, for each uploaded X-ray, the class ``Predictor.predict`` gives
for that file with its Grad-CAM overlay, and its CSV must hold one row per file with those
figures. Eight browser sessions uploading different X-rays at once must each get their own
result. Full-page screenshots go to ``$CXR_ARTIFACTS_DIR`` (default ``out/screenshots``).

Skipped, with the reason, where no Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from core import appserver
from core.appserver import CLINICAL, PAGES
from tests.conftest import REAL_DIR, blob_image, write_png

pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                    "(pip install -r requirements-dev.txt)")

# more than 90 s on a 2-core machine (90-120 s for the two, beyond small_run): slow too (CI
# runs slow tests)
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

WAIT = 120.0  # seconds for any one wait (a loaded 2-core machine); each can still fail
N_SESSIONS = 8
PROB_TOL = 1e-5  # the CSV's probabilities (6 decimals) against Predictor.predict here
DISTINCT = 1e-3  # the eight files' answers differ by more than this (100 x PROB_TOL)


CHROMIUM = appserver.chromium_path()
if CHROMIUM is None:  # before any fixture is built (small_run takes a minute)
    pytest.skip(f"no Chromium found on PATH ({', '.join(appserver.CHROMIUM_NAMES)}): install "
                "Debian's with `apt-get install chromium`; Playwright cannot download its own "
                "browser here", allow_module_level=True)


@pytest.fixture(scope="module")
def chromium_exe() -> str:
    assert CHROMIUM is not None
    return CHROMIUM


@pytest.fixture(scope="module")
def app_url(chromium_exe: str, small_run: Path) -> Iterator[str]:
    """The dashboard served from a subprocess for this module, stopped (terminate, then kill)
    at its end."""
    with appserver.AppServer("Home.py", models_dir=small_run.parent,
                             start_timeout=WAIT) as server:
        yield server.url
        if server.proc is not None and server.proc.poll() is not None:
            pytest.fail(f"the app server died during the tests:\n{server.output()}")


@pytest.fixture(scope="module")
def browser(chromium_exe: str):
    with appserver.chromium(chromium_exe) as b:
        yield b


@pytest.fixture(scope="module")
def predictor(small_run: Path):
    from core.inference import Predictor

    return Predictor.from_checkpoint(small_run / "best.pt")


def distinguishable(a, b) -> bool:
    """Two predictions that a results check (``check_row``) tells apart."""
    return a.label != b.label or any(abs(a.probabilities[c] - b.probabilities[c]) > DISTINCT
                                     for c in a.classes)


def blend_image(rng: np.random.Generator, a: int, b: int, w: float) -> np.ndarray:
    """A synthetic image between class ``a`` (weight ``w``) and class ``b``: near the
    boundary the model's answer is not saturated, so such images tell sessions apart."""
    mix = w * blob_image(rng, a, 96).astype(float) + (1 - w) * blob_image(rng, b, 96)
    return np.clip(mix, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def xrays(tmp_path_factory: pytest.TempPathFactory, predictor) -> list[Path]:
    """Eight X-ray files whose answers differ (another file's result shown in a session would
    fail its check): a synthetic image of each class like those ``small_run`` learnt, real
    X-rays from the shared set where it is present, then synthetic images between two
    classes; each kept only if ``Predictor.predict`` tells it apart from those chosen."""
    folder = tmp_path_factory.mktemp("xrays")
    rng = np.random.default_rng(7)

    def candidates():
        for k in range(3):
            yield write_png(folder / f"synthetic-{k}.png", blob_image(rng, k, size=96))
        if (REAL_DIR / "COVID" / "images").is_dir():
            yield from sorted(REAL_DIR.glob("*/images/*.png"))[3::11]
        for w in np.linspace(0.2, 0.6, 41):
            for a, b in ((0, 1), (1, 2), (2, 0)):
                yield write_png(folder / f"between-{a}-{b}-{w:.2f}.png", blend_image(rng, a, b, w))

    chosen: list[Path] = []
    answers: list = []
    for path in candidates():
        pred = predictor.predict(path.read_bytes(), name=path.name)
        if all(distinguishable(pred, other) for other in answers):
            chosen.append(path)
            answers.append(pred)
        if len(chosen) == N_SESSIONS:
            return chosen
    pytest.fail(f"only {len(chosen)} images with answers that differ by more than {DISTINCT}")


@pytest.fixture(scope="module")
def expected(predictor, xrays: list[Path]) -> dict[str, object]:
    """``Predictor.predict`` on each file, in this process (file name -> Prediction)."""
    return {p.name: predictor.predict(p.read_bytes(), name=p.name) for p in xrays}


@pytest.fixture(scope="module")
def high_findings(small_run: Path) -> list[str]:
    """The run's high-severity findings: the only errors a page may show (as findings)."""
    from core.runs import load_run

    return [f["text"] for f in load_run(small_run).findings if f.get("severity") == "high"]


def unexpected_errors(page, allowed: Sequence[str] = ()) -> list[str]:
    """Exceptions and error boxes on the page, except those that state an allowed finding."""
    starts = [" ".join(a.split())[:80] for a in allowed]
    return [e for e in appserver.errors_on_page(page)
            if not any(a in " ".join(e.split()) for a in starts)]


@pytest.fixture(scope="module")
def shots() -> Path:
    return appserver.artifacts_dir()


def new_page(browser, **kwargs):
    context = browser.new_context(viewport={"width": 1440, "height": 1000},
                                  accept_downloads=True, **kwargs)
    context.set_default_timeout(WAIT * 1000)
    return context, context.new_page()


def download_csv(page) -> tuple[str, list[dict[str, str]]]:
    """Click "Download results (CSV)"; the file's suggested name and its rows."""
    button = page.get_by_role("button", name=appserver.DOWNLOAD_LABEL)
    with page.expect_download(timeout=WAIT * 1000) as info:
        button.click()
    download = info.value
    data = Path(download.path()).read_text(encoding="utf-8-sig")
    return download.suggested_filename, list(csv.DictReader(io.StringIO(data)))


def check_row(row: dict[str, str], pred) -> None:
    """A CSV row against the Prediction of the same file."""
    assert row["predicted_class"] == pred.label, row
    assert row["decision"] == pred.decision, row
    assert not row.get("error"), row
    for cls, p in pred.probabilities.items():
        assert float(row[f"prob_{cls}"]) == pytest.approx(p, abs=PROB_TOL), (cls, row)


def test_every_page_renders_and_predictions_download(browser, app_url, predictor, xrays,
                                                     high_findings, shots):
    real = sorted(REAL_DIR.glob("*/images/*.png"))[:1]  # a real X-ray where the set is present
    files = [*real, *xrays[: 2 - len(real)]]
    expected = {f.name: predictor.predict(f.read_bytes(), name=f.name) for f in files}
    classes = predictor.classes
    context, page = new_page(browser)
    try:
        for app_page in PAGES:
            appserver.open_page(page, app_url, app_page, timeout=WAIT)
            appserver.screenshot(page, shots / f"{app_page.path or 'home'}.png")
            assert unexpected_errors(page, high_findings) == [], app_page
            assert page.get_by_role("heading", name=app_page.title, exact=True).count() == 1

        # two X-rays: each one's class, its images and its CSV row
        appserver.open_page(page, app_url, CLINICAL, timeout=WAIT)
        broken = {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image"}
        appserver.upload(page, files, timeout=WAIT)
        appserver.wait_for_predictions(page, len(files), timeout=WAIT)
        appserver.screenshot(page, shots / "clinical_predictions-results.png")
        assert appserver.errors_on_page(page) == []
        assert appserver.predicted_classes(page, classes) == [expected[f.name].label
                                                               for f in files]
        for caption in (appserver.ORIGINAL_CAPTION, appserver.OVERLAY_CAPTION):
            images = page.locator('[data-testid="stImage"]').filter(has_text=caption)
            assert images.count() == len(files), caption
            for k in range(len(files)):
                assert images.nth(k).locator("img").evaluate("i => i.naturalWidth") > 0

        name, rows = download_csv(page)
        assert name == appserver.CSV_NAME
        assert [r["file"] for r in rows] == [f.name for f in files]
        for row, f in zip(rows, files, strict=True):
            check_row(row, expected[f.name])

        # a new session (the uploader adds to what it holds): an X-ray and a broken file
        appserver.open_page(page, app_url, CLINICAL, timeout=WAIT)
        appserver.upload(page, [files[0], broken], timeout=WAIT)
        page.locator(appserver.ERROR_ALERT).filter(has_text="broken.png").first.wait_for(
            timeout=WAIT * 1000)
        appserver.wait_for_predictions(page, 1, timeout=WAIT)
        appserver.screenshot(page, shots / "clinical_predictions-invalid-file.png")
        errors = appserver.errors_on_page(page)
        assert len(errors) == 1 and errors[0].strip().startswith("broken.png"), errors
        assert appserver.predicted_classes(page, classes) == [expected[files[0].name].label]
        _, rows = download_csv(page)
        assert [r["file"] for r in rows] == [files[0].name, "broken.png"]
        check_row(rows[0], expected[files[0].name])
        assert rows[1]["error"] and not rows[1]["predicted_class"], rows[1]
    finally:
        context.close()


def test_eight_sessions_at_once_each_get_their_own_result(browser, app_url, xrays, expected,
                                                         shots):
    """Eight browser contexts (eight Streamlit sessions) upload eight different X-rays one
    after the other without waiting for an answer, so that the server analyses them at the
    same time; each must show and download its own file's class and probabilities."""
    labels = {n: p.label for n, p in expected.items()}
    answers = list(expected.values())
    assert len(set(labels.values())) > 1  # more than one class among the answers
    assert all(distinguishable(a, b) for i, a in enumerate(answers) for b in answers[i + 1:])
    classes = next(iter(expected.values())).classes
    sessions = [new_page(browser) for _ in range(N_SESSIONS)]
    try:
        for _, page in sessions:
            appserver.open_page(page, app_url, CLINICAL, timeout=WAIT)
        for (_, page), xray in zip(sessions, xrays, strict=True):
            appserver.upload(page, [xray], timeout=WAIT)
        for k, ((_, page), xray) in enumerate(zip(sessions, xrays, strict=True)):
            appserver.wait_for_predictions(page, 1, timeout=WAIT)
            appserver.screenshot(page, shots / f"concurrent-{k}.png")
            assert appserver.errors_on_page(page) == [], xray.name
            assert appserver.predicted_classes(page, classes) == [labels[xray.name]]
            _, rows = download_csv(page)
            assert [r["file"] for r in rows] == [xray.name]
            check_row(rows[0], expected[xray.name])
    finally:
        for context, _ in sessions:
            context.close()


def test_a_fresh_server_opened_at_a_deep_link_shows_the_app_navigation(browser, small_run):
    """A new server's first request, straight to a page's URL, must go through Home.py's
    grouped navigation and wide layout (``ui.use_app_navigation``), not Streamlit's legacy
    ``pages/``-folder listing of file names."""
    with appserver.AppServer("Home.py", models_dir=small_run.parent,
                             start_timeout=WAIT) as server:
        context, page = new_page(browser)
        try:
            page.goto(f"{server.url}/model_performance", wait_until="commit")
            page.get_by_role("heading", name="Model Performance", exact=True).first.wait_for()
            appserver.wait_idle(page, WAIT)
            links = page.locator('[data-testid="stSidebarNavLink"]').all_inner_texts()
            assert any("Clinical Predictions" in t for t in links), links
            assert not any(t.strip() == "clinical predictions" for t in links), links
            assert page.get_by_text("Overview", exact=True).count() >= 1  # a section header
            assert unexpected_errors(page) == []
        finally:
            context.close()
