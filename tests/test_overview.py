"""The overview pages' pure helpers (core.overview, core.charts, core.reference,
core.model_card), without Streamlit."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core import charts, model_card, overview, reference, runs
from core.operating import at_threshold, records_arrays
from tests.conftest import ROOT

COLOURS = {"COVID": "#D55E00", "Normal": "#0072B2", "Viral Pneumonia": "#009E73"}


def test_helpers_import_without_streamlit():
    code = ("import sys; import core.charts, core.model_card, core.overview, core.reference; "
            "assert 'streamlit' not in sys.modules, 'streamlit imported'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------ charts


def test_confusion_figure_counts_and_row_shares():
    counts = [[5, 1, 0], [2, 6, 2], [0, 0, 0]]
    fig = charts.confusion_figure(list(COLOURS), counts)
    heat = fig.data[0]
    assert np.asarray(heat.z).tolist() == counts
    assert list(heat.x) == ["COVID", "Normal", "Viral Pneumonia"]
    assert heat.text[1][2] == "2"
    norm = charts.confusion_figure(list(COLOURS), counts, normalised=True).data[0]
    z = np.asarray(norm.z, float)
    assert z[0].tolist() == pytest.approx([5 / 6, 1 / 6, 0])
    assert z[1].tolist() == pytest.approx([0.2, 0.6, 0.2])
    assert np.isnan(z[2]).all() and norm.text[2][0] == "–"  # a class without images
    assert norm.text[1][1] == "60.0%"


def test_roc_and_pr_figures_draw_each_class_in_its_colour():
    roc = {"COVID": {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1], "thresholds": [None, 0.5, 0]},
           "Normal": None}
    fig = charts.roc_figure(roc, COLOURS, {"COVID": 0.9})
    covid = next(t for t in fig.data if t.name.startswith("COVID"))
    assert covid.name == "COVID (AUC 0.900)"
    assert list(covid.x) == [0, 0.5, 1] and list(covid.y) == [0, 0.8, 1]
    assert covid.line.color == COLOURS["COVID"]
    assert not any(t.name and t.name.startswith("Normal") for t in fig.data)  # undefined curve
    pr = {"Normal": {"precision": [0.5, 1.0], "recall": [1.0, 0.0], "thresholds": [0.1]}}
    fig = charts.pr_figure(pr, COLOURS, {"Normal": 0.25})
    assert fig.data[0].line.color == COLOURS["Normal"]
    assert list(fig.data[1].y) == [0.25, 0.25]  # the no-skill line at the prevalence


def test_reliability_figure_skips_empty_bins_and_names_the_ece():
    bins = [{"lower": 0.0, "upper": 0.5, "count": 0, "mean_confidence": None, "accuracy": None},
            {"lower": 0.5, "upper": 1.0, "count": 4, "mean_confidence": 0.8, "accuracy": 0.75}]
    cal = {"temperature": 1.5, "before": {"ece": {"value": 0.12}, "reliability": bins},
           "after": {"ece": {"value": 0.03}, "reliability": bins}}
    fig = charts.reliability_figure(cal)
    names = [t.name for t in fig.data]
    assert names[1] == "Before (T = 1), ECE 0.120" and names[2] == "After (T = 1.5), ECE 0.030"
    assert list(fig.data[2].x) == [0.8] and list(fig.data[2].y) == [0.75]


def test_history_and_operating_figures():
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_acc": 0.5},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_acc": 0.7}]
    fig = charts.history_figure(history)
    val = next(t for t in fig.data if t.name == "validation accuracy")
    assert list(val.x) == [1, 2] and list(val.y) == [0.5, 0.7]
    assert not any(t.name == "training accuracy" for t in fig.data)  # not recorded
    import pandas as pd

    table = pd.DataFrame({"threshold": [0.0, 0.5, 1.0], "sensitivity": [1, 0.5, 0],
                          "specificity": [0, 0.6, 1], "ppv": [0.3, 0.5, np.nan],
                          "npv": [np.nan, 0.7, 0.6]})
    fig = charts.operating_figure(table, "COVID", 0.5)
    assert [t.name for t in fig.data] == ["Sensitivity", "Specificity", "PPV", "NPV"]
    assert fig.layout.shapes[0].x0 == 0.5


# ------------------------------------------------------------------ reference


def test_reference_rows_and_comparability():
    report = {"overall": {"accuracy": {"value": 0.8}, "macro_f1": {"value": 0.7},
                          "macro_roc_auc": {"value": 0.95}},
              "at_argmax": {"per_class": {"COVID": {"sensitivity": {"value": 0.9},
                                                    "specificity": {"value": 0.8},
                                                    "ppv": {"value": 0.5},
                                                    "npv": {"value": None}}}},
              "threshold_free": {"per_class": {"COVID": {"roc_auc": {"value": 0.88}}}}}
    rows = {r["figure"]: r for r in reference.comparison_rows(report)}
    assert rows["Accuracy"]["reference"] == 0.687
    assert rows["Accuracy"]["difference"] == pytest.approx(0.8 - 0.687)
    assert rows["COVID ROC-AUC"]["this run"] == 0.88 and not rows["COVID ROC-AUC"]["pct"]
    assert rows["COVID NPV"]["this run"] is None and rows["COVID NPV"]["difference"] is None
    assert rows["Normal Sensitivity"]["reference"] == 0.542
    assert rows["Viral Pneumonia PPV"]["reference"] == 0.742
    overall, per_class = reference.side_by_side(report, lambda v, pct: f"{v:.2f}")
    assert overall[0]["Macro ROC-AUC"] == "0.92 → 0.95"
    covid = next(r for r in per_class if r["Class"] == "COVID")
    assert covid["NPV"] == "0.93 → –"
    assert reference.comparability(reference.REFERENCE_CLASSES, reference.DATABASE_COUNTS) == []
    why = reference.comparability(["COVID", "Normal"], {"COVID": 100, "Normal": 100})
    assert len(why) == 2 and "Lung_Opacity" in why[0] and "200 images" in why[1]


# ------------------------------------------------------------------ overview and model card


@pytest.fixture(scope="module")
def small(small_run: Path) -> runs.RunArtifacts:
    return runs.load_run(small_run)


def test_headline_kpis_come_from_the_report(small):
    report = small.report
    kpis = {k.label: k for k in overview.headline(small)}
    assert kpis["Macro F1"].item == report["overall"]["macro_f1"]
    cls = report["operating_point"]["class"]
    assert kpis[f"{cls} sensitivity"].item == \
        report["at_operating_point"]["per_class"][cls]["sensitivity"]
    # without an operating point: at argmax, and labelled so
    bare = replace(small, summary=None, report={**report, "operating_point": None,
                                                "at_operating_point": None})
    labels = [k.label for k in overview.headline(bare)]
    assert "COVID sensitivity (argmax)" in labels


def test_findings_sorted_by_severity(small):
    report = {**small.report, "findings": [
        {"id": "a", "severity": "low", "text": "low one"},
        {"id": "b", "severity": "high", "text": "high one"},
        "plain string", {"id": "c", "severity": "medium", "text": "medium one"}]}
    ordered = overview.sorted_findings(replace(small, report=report))
    assert [f["text"] for f in ordered] == ["high one", "medium one", "low one", "plain string"]


def test_per_class_and_prevalence_rows(small):
    report = small.report
    rows = {r["Class"]: r for r in overview.per_class_rows(report, "at_argmax")}
    per = report["at_argmax"]["per_class"]["Normal"]
    assert rows["Normal"]["Sensitivity"] == per["sensitivity"]
    assert rows["Normal"]["ROC-AUC"] == report["threshold_free"]["per_class"]["Normal"]["roc_auc"]
    prev = overview.prevalence_rows(report, "at_argmax", {"COVID": 0.05})
    c = report["at_argmax"]["per_class"]["COVID"]
    sens, spec = c["sensitivity"]["value"], c["specificity"]["value"]
    assert prev[0]["PPV at prevalence"] == pytest.approx(
        sens * 0.05 / (sens * 0.05 + (1 - spec) * 0.95))
    # at the test set's own prevalence Bayes' rule gives back the sample's PPV
    share = overview.sample_prevalence(report, small.classes)
    back = overview.prevalence_rows(report, "at_argmax", {"COVID": share["COVID"]})
    assert back[0]["PPV at prevalence"] == pytest.approx(c["ppv"]["value"], abs=1e-5)


def test_explore_matches_core_operating(small):
    thr = overview.stored_threshold(small)
    cls = overview.screening_class(small)
    got = overview.explore(small.predictions, small.classes, cls, thr)
    y, proba = records_arrays(small.predictions, small.classes)
    ref = at_threshold(y, proba, small.classes, cls, thr)
    assert got["confusion"] == ref["confusion"]
    assert got["confusion"] == small.report["at_operating_point"]["confusion_matrix"]["counts"]
    assert len(got["table"]) == 101


def test_checklist_names_the_fixing_commands(small, tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no data/COVID-19_Radiography_Dataset here
    checks = {c.what: c for c in overview.checklist(small)}
    assert checks["Dataset"].ok and checks["Model"].ok and checks["Evaluation report"].ok
    none = {c.what: c for c in overview.checklist(None)}
    assert not none["Model"].ok and "python -m core.train" in none["Model"].command
    assert not none["Dataset"].ok and none["Dataset"].command == "python -m core.data download"
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    assert overview.dataset_dir(None) == tmp_path
    gone = replace(small, report=None,
                   missing=(f"report: python -m core.evaluate --checkpoint {small.checkpoint}",))
    report = {c.what: c for c in overview.checklist(gone)}["Evaluation report"]
    assert not report.ok
    assert report.command == f"python -m core.evaluate --checkpoint {small.checkpoint}"


def test_model_card_sections_and_markdown(small):
    report = small.report
    titles = [t for t, _ in model_card.sections(small)]
    assert titles == ["Intended use and out-of-scope uses", "Training data", "Evaluation data",
                      "Operating point and why", "Calibration", "Known failure modes",
                      "Explanation method and its limits"]
    card = model_card.markdown(small)
    assert card.startswith(f"# Model card: {small.name}")
    assert "COVID, Normal, Viral Pneumonia" in card
    op = report["operating_point"]
    assert f"{op['class']} at threshold {op['threshold']:.4f}" in card
    ece = report["calibration"]["after"]["ece"]["value"]
    assert f"{ece:.3f}" in card
    assert report["shortcut"]["verdict"] in card  # a known failure mode
    assert "Not a medical device" in card
    # every figure in it comes from the report: change one and the card changes
    changed = json.loads(json.dumps(report))
    changed["calibration"]["temperature"] = 2.5
    assert "T = 2.5" in model_card.calibration(replace(small, report=changed))


def test_model_card_without_report_or_operating_point(small):
    bare = replace(small, report=None, summary=None, dataset=None)
    card = model_card.markdown(bare)
    assert "python -m core.evaluate --checkpoint" in card
    assert "Operating point: none" in card or "No operating point" in card


def test_created_is_shown_in_utc(small):
    assert overview.created(replace(small, summary={"created": "2026-11-30T10:03:52+0100"})) \
        == "2026-11-30 09:03 UTC"
    assert overview.created(replace(small, summary={"created": "not a date"})) == "not a date"
