"""Home, Executive Summary and Model Performance, driven headlessly with AppTest on the small
run: what they show must equal the run's report and core.operating's figures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import streamlit

from core import compare, operating, runs
from core.ui import DISCLAIMER, fmt_metric
from tests.test_app import run_page

OVERVIEW_PAGES = ("pages/home.py", "pages/executive_summary.py", "pages/model_performance.py")
RATES = (("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("ppv", "PPV"),
         ("npv", "NPV"))


def _report(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "report" / "metrics.json").read_text())


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _figure(at, key: str) -> dict[str, Any]:
    charts = [c for c in at.get("plotly_chart") if c.proto.id.endswith(f"-{key}")]
    assert len(charts) == 1, f"no single chart with key {key}"
    return json.loads(charts[0].proto.spec)


def _z(fig: dict[str, Any]) -> list[list[float]]:
    """A heatmap's z values (Plotly may store them as a base64 typed array)."""
    import base64

    import numpy as np

    z = fig["data"][0]["z"]
    if isinstance(z, dict):
        shape = tuple(int(s) for s in z["shape"].split(","))
        z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)
    return np.asarray(z, float).tolist()


@pytest.mark.parametrize("page", OVERVIEW_PAGES)
def test_page_runs_without_exception_and_shows_the_disclaimer(page, small_models):
    at = run_page(page)
    assert not at.exception
    assert any(DISCLAIMER in w.value for w in at.warning)


def test_executive_summary_kpis_equal_the_report(small_models):
    report = _report(small_models)
    at = run_page("pages/executive_summary.py")
    shown = _metrics(at)
    cls = report["operating_point"]["class"]
    per = report["at_operating_point"]["per_class"][cls]
    expected = {
        "Accuracy (test)": fmt_metric(report["overall"]["accuracy"]["value"], pct=True),
        "Macro F1": fmt_metric(report["overall"]["macro_f1"]["value"]),
        "Macro ROC-AUC": fmt_metric(report["overall"]["macro_roc_auc"]["value"]),
        f"{cls} sensitivity": fmt_metric(per["sensitivity"]["value"], pct=True),
        f"{cls} PPV": fmt_metric(per["ppv"]["value"], pct=True),
    }
    for label, value in expected.items():
        assert shown[label] == value, label
    # each KPI card states its interval underneath
    lo, hi = report["overall"]["macro_f1"]["ci95"]
    assert any(c.value == f"95% CI {lo:.3f} – {hi:.3f}" for c in at.caption)
    # the probe's periphery-only accuracy, as reported
    peri = report["shortcut"]["conditions"]["periphery"]["accuracy"]["value"]
    assert shown["Periphery only"] == fmt_metric(peri, pct=True)


def test_executive_summary_shows_findings_reference_and_model_card(small_models, monkeypatch):
    served: list[dict[str, Any]] = []
    original = streamlit.download_button

    def recording(label, data, *args, **kwargs):
        served.append({"label": label, "data": data, **kwargs})
        return original(label, data, *args, **kwargs)

    monkeypatch.setattr(streamlit, "download_button", recording)
    report = _report(small_models)
    at = run_page("pages/executive_summary.py")
    assert not at.exception
    boxes = [b.value for kind in ("error", "warning", "info") for b in getattr(at, kind)]
    for finding in report["findings"]:
        text = finding if isinstance(finding, str) else finding["text"]
        assert any(text in b for b in boxes)
    # reference figures beside this run's; the class set differs (no Lung_Opacity)
    assert any("Lung_Opacity" in w.value and "comparable" in w.value for w in at.warning)
    tables = [d.value for d in at.dataframe]
    overall = next(t for t in tables if "Accuracy" in t.columns)
    acc = report["overall"]["accuracy"]["value"]
    assert overall["Accuracy"].iloc[0] == f"68.7% → {fmt_metric(acc, pct=True)}"
    # model card download: its text names the classes and the operating point
    assert [b.label for b in at.download_button] == ["Download model card (Markdown)"]
    card = served[-1]["data"]
    for cls in report["run"]["classes"]:
        assert cls in card
    op = report["operating_point"]
    assert f"{op['class']} at threshold {op['threshold']:.4f}" in card
    assert "Intended use" in card and "Known failure modes" in card


def test_confusion_matrix_shows_the_report_counts(small_models):
    report = _report(small_models)
    cm = report["at_argmax"]["confusion_matrix"]
    at = run_page("pages/model_performance.py")
    assert not at.exception
    table = next(d.value for d in at.dataframe if "True class" in d.value.columns)
    assert table["True class"].tolist() == cm["labels"]
    assert table[cm["labels"]].to_numpy().tolist() == cm["counts"]
    assert _z(_figure(at, "cm_figure")) == [[float(v) for v in r] for r in cm["counts"]]
    # the toggle shows row shares; the report's row_normalised
    at.toggle(key="cm_normalised").set_value(True).run()
    shares = _z(_figure(at, "cm_figure"))
    assert sum(shares, []) == pytest.approx(sum(cm["row_normalised"], []), abs=1e-6)


def test_operating_point_explorer_equals_report_then_follows_the_slider(small_models):
    report = _report(small_models)
    run = runs.load_run(small_models)
    cls, stored = report["operating_point"]["class"], report["operating_point"]["threshold"]
    at = run_page("pages/model_performance.py")
    slider = at.slider(key="op_threshold")
    assert slider.value == pytest.approx(stored)
    per = report["at_operating_point"]["per_class"][cls]
    shown = _metrics(at)
    for key, label in RATES:
        assert shown[f"{cls} {label}"] == fmt_metric(per[key]["value"], pct=True), key
    assert _z(_figure(at, "op_confusion")) == \
        [[float(v) for v in r] for r in report["at_operating_point"]["confusion_matrix"]["counts"]]

    new = 0.0 if stored > 0.5 else 0.995
    at.slider(key="op_threshold").set_value(new).run()
    assert not at.exception
    y, proba = operating.records_arrays(run.predictions, run.classes)
    live = operating.at_threshold(y, proba, run.classes, cls, new)
    shown = _metrics(at)
    for key, label in RATES:
        value = None if math.isnan(live[key]) else live[key]  # e.g. NPV with nothing negative
        assert shown[f"{cls} {label}"] == fmt_metric(value, pct=True), key
    assert _z(_figure(at, "op_confusion")) == [[float(v) for v in r] for r in live["confusion"]]
    # the figures did move: at threshold 0 every image is called COVID
    assert live["confusion"] != report["at_operating_point"]["confusion_matrix"]["counts"]


def test_per_class_prevalence_input_changes_ppv_by_bayes_rule(small_models):
    report = _report(small_models)
    at = run_page("pages/model_performance.py")
    at.number_input(key="prev_COVID").set_value(5.0).run()
    table = next(d.value for d in at.dataframe if "PPV at prevalence" in d.value.columns)
    row = table[table["Class"] == "COVID"].iloc[0]
    per = report["at_argmax"]["per_class"]["COVID"]
    sens, spec = per["sensitivity"]["value"], per["specificity"]["value"]
    ppv = sens * 0.05 / (sens * 0.05 + (1 - spec) * 0.95)
    assert row["Prevalence"] == "5.0%"
    assert row["PPV at prevalence"] == fmt_metric(ppv, pct=True)


def _copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_home_lists_the_evaluate_command_when_the_report_is_missing(small_run, tmp_path,
                                                                     monkeypatch):
    models = tmp_path / "models"
    run_dir = _copy_run(small_run, models / "noreport")
    shutil.rmtree(run_dir / "report")
    monkeypatch.setenv("CXR_MODELS_DIR", str(models))
    at = run_page("pages/home.py")
    assert not at.exception
    infos = [i.value for i in at.info]
    assert any(f"python -m core.evaluate --checkpoint {run_dir / 'best.pt'}" in i for i in infos)
    assert any("Model" in s.value and "noreport" in s.value for s in at.success)
    assert not at.metric  # no headline figures without a report


def test_home_with_a_model_shows_the_run_and_a_green_checklist(small_models):
    at = run_page("pages/home.py")
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "COVID, Normal, Viral Pneumonia" in text and "64 px" in text
    assert [s.value.split(":")[0] for s in at.success] == \
        ["**Dataset**", "**Model**", "**Evaluation report**"]


def test_two_run_comparison_uses_core_compare(small_run, tmp_path, monkeypatch):
    models = tmp_path / "models"
    for name in ("a", "b"):
        _copy_run(small_run, models / name)
    monkeypatch.setenv("CXR_MODELS_DIR", str(models))
    at = run_page("pages/model_performance.py")
    assert not at.exception
    first, second = at.selectbox(key="cmp_a").value, at.selectbox(key="cmp_b").value
    assert {first, second} == {"a", "b"}
    rows = [compare.summarise(_report(models / n), n) for n in (first, second)]
    expected = compare.markdown({"rows": rows, "recommendation": compare.recommend(rows)})
    assert any(m.value == expected for m in at.markdown)
    verdict = _report(models / "a")["shortcut"]["verdict"]
    assert any(verdict in c.value for c in at.caption)


def test_external_validation_is_shown_where_measured(small_run, tmp_path, monkeypatch):
    models = tmp_path / "models"
    run_dir = _copy_run(small_run, models / "ext")
    path = run_dir / "report" / "metrics.json"
    report = json.loads(path.read_text())
    internal = report["overall"]
    drop = {k: {"internal": internal[k]["value"], "external": 0.6,
                "drop": round(internal[k]["value"] - 0.6, 6)}
            for k in ("accuracy", "macro_f1", "macro_roc_auc")}
    drop["per_class_roc_auc"] = {c: {"internal": 1.0, "external": 0.7, "drop": 0.3}
                                 for c in report["run"]["classes"]}
    report["external"] = {"data_dir": "/elsewhere", "class_map": {}, "overlap_with_manifest": 2,
                          "n": report["n"], "class_counts": report["class_counts"],
                          "at_argmax": report["at_argmax"], "drop": drop}
    path.write_text(json.dumps(report))
    monkeypatch.setenv("CXR_MODELS_DIR", str(models))
    at = run_page("pages/model_performance.py")
    assert not at.exception
    assert any("2 external images are byte-identical" in w.value for w in at.warning)
    table = next(d.value for d in at.dataframe if "Drop" in d.value.columns)
    row = table[table["Figure"] == "Macro ROC-AUC"].iloc[0]
    assert row["External"] == fmt_metric(0.6)
    assert row["Drop"] == fmt_metric(drop["macro_roc_auc"]["drop"])
    assert len(table) == 3 + len(report["run"]["classes"])
    at = run_page("pages/executive_summary.py")
    assert not at.exception
    card = next(m for m in at.metric if m.label == "External Macro ROC-AUC")
    assert card.value == "0.600"


def test_pages_without_an_operating_point(small_run, tmp_path, monkeypatch):
    models = tmp_path / "models"
    run_dir = _copy_run(small_run, models / "argmax")
    for name in ("run.json", "report/metrics.json"):
        doc = json.loads((run_dir / name).read_text())
        doc["operating_point"] = None
        doc.pop("at_operating_point", None)
        if name.startswith("report"):
            doc["at_operating_point"] = None
        (run_dir / name).write_text(json.dumps(doc))
    monkeypatch.setenv("CXR_MODELS_DIR", str(models))
    report = _report(run_dir)
    at = run_page("pages/executive_summary.py")
    assert not at.exception
    per = report["at_argmax"]["per_class"]["COVID"]
    assert _metrics(at)["COVID sensitivity (argmax)"] == \
        fmt_metric(per["sensitivity"]["value"], pct=True)
    at = run_page("pages/model_performance.py")
    assert not at.exception
    assert len(at.radio[0].options) == 1  # argmax only
    assert at.slider(key="op_threshold").value == 0.5
    at.selectbox(key="op_class").set_value("Normal").run()
    run = runs.load_run(run_dir)
    y, proba = operating.records_arrays(run.predictions, run.classes)
    live = operating.at_threshold(y, proba, run.classes, "Normal", 0.5)
    assert _metrics(at)["Normal Sensitivity"] == fmt_metric(live["sensitivity"], pct=True)
