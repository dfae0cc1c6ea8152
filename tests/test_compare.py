"""core.compare: rows from reports and the documented rule that picks a lung view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import compare
from core.errors import DatasetError


def metric(v: float | None) -> dict:
    return {"value": v, "ci95": None if v is None else [v - 0.05, v + 0.05]}


def write_report(run: Path, view: str, acc: float, peri: float, focus: float | None,
                 ext_auc: float | None = None) -> Path:
    doc = {
        "n": 200, "run": {"lung_view": view},
        "at_argmax": {"overall": {"accuracy": metric(acc), "macro_f1": metric(acc - 0.01)}},
        "threshold_free": {"macro_roc_auc": metric(0.95)},
        "shortcut": {"chance_accuracy": 0.34, "risk": "high" if peri > 0.5 else "low",
                     "conditions": {"periphery": {"accuracy": metric(peri)},
                                    "centre": {"accuracy": metric(0.6)}}},
        "lung_focus": None if focus is None else {"overall": {"mean": focus}},
        "external": None if ext_auc is None else {
            "threshold_free": {"macro_roc_auc": metric(ext_auc)},
            "drop": {"macro_roc_auc": {"drop": 0.95 - ext_auc}}},
    }
    (run / "report").mkdir(parents=True)
    path = run / "report" / "metrics.json"
    path.write_text(json.dumps(doc))
    return path


def test_rule_keeps_accuracy_then_prefers_less_periphery_then_more_focus(tmp_path):
    a = tmp_path / "none"
    b = tmp_path / "crop"
    c = tmp_path / "mask"
    d = tmp_path / "worse"
    write_report(a, "none", 0.88, 0.65, 1.2, ext_auc=0.61)
    write_report(b, "crop", 0.87, 0.40, 1.7, ext_auc=0.79)  # within 2 points, less periphery
    write_report(c, "mask", 0.865, 0.40, 1.5)  # same periphery, less focus
    write_report(d, "mask", 0.80, 0.33, 1.9)  # best periphery, but loses accuracy
    result = compare.compare([a, b / "report", c / "report" / "metrics.json", d])
    assert [r["run"] for r in result["rows"]] == ["none", "crop", "mask", "worse"]
    rec = result["recommendation"]
    assert rec["run"] == "crop" and rec["lung_view"] == "crop"
    assert rec["kept"] == ["none", "crop", "mask"]
    rows = {r["run"]: r for r in result["rows"]}
    assert rows["crop"]["external_auc_drop"] == pytest.approx(0.16)
    assert rows["mask"]["external_macro_roc_auc"] is None
    table = compare.markdown(result)
    assert "| crop | crop | 200 | 0.870 [0.820, 0.920]" in table and "0.790 (+0.160)" in table


def test_cli_writes_json_and_reports_missing_runs(tmp_path, capsys):
    write_report(tmp_path / "a", "none", 0.9, 0.6, None)
    out = tmp_path / "cmp.json"
    assert compare.main([str(tmp_path / "a"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["recommendation"]["run"] == "a"
    assert "Recommended: **a**" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "nowhere")]) == 2
    with pytest.raises(DatasetError, match="No evaluation report"):
        compare.report_path(tmp_path / "nowhere")
