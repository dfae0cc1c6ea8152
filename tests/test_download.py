"""``python -m core.data download`` with kagglehub replaced by fakes: one that writes a small
copy of the database (as Kaggle's archive unpacks: a top folder holding the class folders),
one without network, one that Kaggle refuses (403: consent or credentials needed)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import requests

from core import download
from core.errors import DownloadError
from tests.conftest import ROOT, make_dataset

CLASSES = download.EXPECTED_CLASSES


def fake_kagglehub(monkeypatch: pytest.MonkeyPatch, behaviour) -> list[tuple]:
    """Install a fake ``kagglehub`` module; returns the calls it received."""
    calls: list[tuple] = []

    def dataset_download(handle, path=None, *, force_download=False, output_dir=None):
        calls.append((handle, output_dir))
        return behaviour(Path(output_dir))

    module = types.ModuleType("kagglehub")
    module.dataset_download = dataset_download
    monkeypatch.setitem(sys.modules, "kagglehub", module)
    return calls


def writes_small_database(per_class: int = 7):
    def behaviour(out: Path) -> str:
        make_dataset(out / "COVID-19_Radiography_Dataset", per_class=per_class, classes=CLASSES,
                     layout="database", size=32)
        (out / "README.md.txt").write_text("dataset notes")
        return str(out)
    return behaviour


def http_error(status: int):
    def behaviour(out: Path) -> str:
        response = requests.Response()
        response.status_code = status
        response.url = "https://api.kaggle.com/v1/datasets.DatasetApiService/GetDataset"
        raise requests.HTTPError(f"{status} Client Error", response=response)
    return behaviour


def no_network(out: Path) -> str:
    raise requests.ConnectionError("Failed to resolve 'api.kaggle.com' ([Errno -2] Name or "
                                   "service not known)")


def test_download_moves_the_database_into_place_and_counts_each_class(tmp_path, monkeypatch,
                                                                        caplog):
    calls = fake_kagglehub(monkeypatch, writes_small_database(per_class=7))
    dest = tmp_path / "data" / "COVID-19_Radiography_Dataset"
    caplog.set_level("INFO")
    assert download.main(["download", "--dest", str(dest)]) == 0
    assert calls == [(download.HANDLE, str(dest.parent / ".COVID-19_Radiography_Dataset.download"))]
    assert sorted(p.name for p in dest.iterdir()) == sorted(CLASSES)
    assert all(len(list((dest / c / "images").glob("*.png"))) == 7 for c in CLASSES)
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # staging removed
    assert "28 images" in caplog.text
    assert all(f"{c}: 7 images, the published database has {download.PUBLISHED_COUNTS[c]}"
               in caplog.text for c in CLASSES)
    # a second run verifies the copy in place and downloads nothing
    assert download.main(["download", "--dest", str(dest)]) == 0
    assert len(calls) == 1
    assert "Verified the COVID-19 Radiography Database" in caplog.text


def test_download_without_network_says_why_and_what_to_do(tmp_path, monkeypatch):
    fake_kagglehub(monkeypatch, no_network)
    dest = tmp_path / "data" / "db"
    with pytest.raises(DownloadError) as err:
        download.download(dest)
    msg = str(err.value)
    assert msg.startswith("Could not reach Kaggle")
    assert "no network connection" in msg and "Connect this machine to the internet" in msg
    assert f"unzip it so that {dest}/COVID/images/ exists" in msg
    assert not dest.exists() and not any(dest.parent.iterdir())


@pytest.mark.parametrize("status", [401, 403])
def test_download_refused_for_consent_or_credentials_explains_the_token(tmp_path, monkeypatch,
                                                                        caplog, status):
    fake_kagglehub(monkeypatch, http_error(status))
    dest = tmp_path / "db"
    assert download.main(["download", "--dest", str(dest)]) == 2
    assert f"Kaggle refused the download of {download.HANDLE} (HTTP {status})" in caplog.text
    assert "accepted its terms" in caplog.text and "KAGGLE_KEY" in caplog.text
    assert "Traceback" not in caplog.text


def test_download_refuses_a_partial_copy_in_the_way(tmp_path, monkeypatch):
    calls = fake_kagglehub(monkeypatch, writes_small_database())
    dest = make_dataset(tmp_path / "db", per_class=7, classes=CLASSES[:2], layout="database")
    with pytest.raises(DownloadError, match="lacks the class folder.*Lung_Opacity"):
        download.download(dest)
    assert calls == []


def test_download_of_an_archive_without_the_database_is_reported(tmp_path, monkeypatch):
    def writes_something_else(out: Path) -> str:
        make_dataset(out / "other", per_class=7, classes=("cats", "dogs"))
        return str(out)

    fake_kagglehub(monkeypatch, writes_something_else)
    with pytest.raises(DownloadError, match="holds no COVID/images/ folder"):
        download.download(tmp_path / "db")
    assert not (tmp_path / "db").exists()


def test_python_m_core_data_download_fails_cleanly_without_kagglehub(tmp_path):
    """The real command line: kagglehub blocked (as where it is not installed) -> the install
    hint, exit status 2, no traceback."""
    script = ("import sys, runpy; sys.modules['kagglehub'] = None; "
              "sys.argv = ['core.data', 'download', '--dest', sys.argv[1]]; "
              "runpy.run_module('core.data', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "db")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "needs the kagglehub package: `pip install -r requirements.txt`" in proc.stderr
    assert "Traceback" not in proc.stderr
