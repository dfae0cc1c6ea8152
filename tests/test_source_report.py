"""``core.metadata.source_report``: a bad ``metadata.xlsx`` is a note, a bug is an error."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from core import metadata as E


def _good_xlsx() -> bytes:
    buf = io.BytesIO()
    pd.DataFrame({"FILE NAME": ["COVID-1", "COVID-2"], "URL": ["https://a.org"] * 2}).to_excel(
        buf, index=False)
    return buf.getvalue()


def _zip_without_workbook() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "a zip, not a workbook")
    return buf.getvalue()


@pytest.mark.parametrize("content", [
    pytest.param(b"not a spreadsheet", id="text"),
    pytest.param(b"", id="empty"),
    pytest.param(lambda: _good_xlsx()[:300], id="truncated"),
    pytest.param(_zip_without_workbook, id="zip-without-workbook"),
])
def test_a_corrupt_spreadsheet_becomes_a_cannot_read_note(tmp_path: Path, content) -> None:
    data = content() if callable(content) else content
    (tmp_path / "COVID.metadata.xlsx").write_bytes(data)
    rep = E.source_report(tmp_path, ["COVID"])
    assert rep["available"] is False and rep["per_class"] == {}
    assert rep["reason"].startswith("cannot read metadata: ")


def test_a_good_spreadsheet_is_read(tmp_path: Path) -> None:
    (tmp_path / "COVID.metadata.xlsx").write_bytes(_good_xlsx())
    rep = E.source_report(tmp_path, ["COVID"])
    assert rep["available"] and rep["per_class"]["COVID"]["sources"] == [
        {"source": "https://a.org", "count": 2}]


def test_a_programming_error_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "COVID.metadata.xlsx").write_bytes(_good_xlsx())

    def broken(*args: object) -> None:
        raise TypeError("a bug, not a bad spreadsheet")

    monkeypatch.setattr(E, "_column", broken)
    with pytest.raises(TypeError, match="a bug"):
        E.source_report(tmp_path, ["COVID"])
