"""The Business Impact page (AppTest): its figures are core.roi's at the page's inputs, with
the AI's sensitivity and specificity from the run's report, or typed in without a run."""

from __future__ import annotations

import json
from dataclasses import replace

from core import roi
from core.runs import load_run
from core.ui import DISCLAIMER
from tests.test_app import run_page

PAGE = "pages/business_impact.py"


def shown(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def expected(r: roi.RoiResult) -> dict[str, str]:
    """What the page must show for ``r``, in its formats."""
    return {
        "Reads per year": f"{r.reads_per_year:,.0f}",
        "Reader hours saved per year": f"{r.hours_saved:,.0f} h",
        "Labour saving per year": roi.money(r.labour_saving),
        "Outcome saving per year": roi.money(r.outcome_saving),
        "Net benefit per year": roi.money(r.net_benefit),
        "Net present value": roi.money(r.npv),
        "Return on investment": roi.fmt_pct(r.roi_pct),
        "Payback period": roi.fmt_years(r.payback_years),
        "Missed cases without AI": f"{r.missed_without:.1f}",
        "Missed cases with AI": f"{r.missed_with:.1f}",
        "False alarms without AI": f"{r.false_alarms_without:.1f}",
        "False alarms with AI": f"{r.false_alarms_with:.1f}",
        "Break-even daily volume": roi.fmt_volume(r.break_even_volume),
    }


def report_rates(run_dir) -> tuple[str, float, float, float]:
    """The screening class, its stored threshold and the report's sensitivity and
    specificity there (computed by core.evaluate, not by the page's code path)."""
    run = load_run(run_dir)
    op = run.report["operating_point"]
    per = run.report["at_operating_point"]["per_class"][op["class"]]
    return op["class"], op["threshold"], per["sensitivity"]["value"], per["specificity"]["value"]


def test_page_shows_roi_at_the_runs_operating_point(small_models):
    at = run_page(PAGE)
    assert not at.exception
    assert any(DISCLAIMER in w.value for w in at.warning)
    cls, threshold, se, sp = report_rates(small_models)
    assert at.slider[0].label == f"{cls} threshold" and at.slider[0].value == threshold
    got = shown(at)
    assert got[f"Sensitivity with AI ({cls})"] == f"{se:.1%}"
    assert got[f"Specificity with AI ({cls})"] == f"{sp:.1%}"
    want = expected(roi.evaluate(roi.RoiInputs(sensitivity=se, specificity=sp)))
    assert {k: got[k] for k in want} == want
    # the reads per year of the defaults, by hand: 100 a day x 250 days
    assert got["Reads per year"] == "25,000"


def test_changing_an_input_changes_the_outputs_to_roi(small_models):
    at = run_page(PAGE)
    _, _, se, sp = report_rates(small_models)
    before = shown(at)["Net present value"]
    at.number_input(key="roi_daily_volume").set_value(250).run()
    at.number_input(key="roi_horizon_years").set_value(3).run()
    assert not at.exception
    got = shown(at)
    assert got["Reads per year"] == "62,500"  # 250 x 250
    inputs = roi.RoiInputs(daily_volume=250, horizon_years=3, sensitivity=se, specificity=sp)
    want = expected(roi.evaluate(inputs))
    assert {k: got[k] for k in want} == want and got["Net present value"] != before


def test_moving_the_threshold_changes_the_ais_rates(small_models):
    at = run_page(PAGE)
    at.slider[0].set_value(0.0).run()
    assert not at.exception
    got = shown(at)
    # at threshold 0 every image is called COVID: sensitivity 1, specificity 0, and with AI
    # false alarms per 1,000 = 1,000 x (1 - 0.1) x (1 - 0) = 900
    assert got["Sensitivity with AI (COVID)"] == "100.0%"
    assert got["Specificity with AI (COVID)"] == "0.0%"
    assert got["False alarms with AI"] == "900.0"
    want = expected(roi.evaluate(roi.RoiInputs(sensitivity=1.0, specificity=0.0)))
    assert {k: got[k] for k in want} == want


def test_tornado_chart_is_roi_tornado_widest_first(small_models):
    at = run_page(PAGE)
    _, _, se, sp = report_rates(small_models)
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    fig = json.loads(charts[0].proto.spec)
    bars = roi.tornado(roi.RoiInputs(sensitivity=se, specificity=sp))
    labels = fig["data"][0]["y"]
    assert [label.split(":")[0] for label in labels] == [b.label for b in bars]
    assert fig["data"][0]["base"] == roi.evaluate(roi.RoiInputs(sensitivity=se,
                                                                specificity=sp)).npv
    assert any("IT integration" in m.value for m in at.markdown)


def test_without_a_model_the_calculator_takes_manual_rates(no_models):
    at = run_page(PAGE)
    assert not at.exception
    assert any("python -m core.train" in i.value and "No run selected" in i.value
               for i in at.info)
    assert any(DISCLAIMER in w.value for w in at.warning)
    assert not at.slider
    got = shown(at)
    assert {k: got[k] for k in expected(roi.evaluate(roi.RoiInputs()))} == \
        expected(roi.evaluate(roi.RoiInputs()))
    # defaults: missed 1000 x 0.1 x (1 - 0.9) = 10 with AI vs 1000 x 0.1 x 0.15 = 15 without;
    # false alarms 1000 x 0.9 x 0.1 = 90 both ways
    deltas = {m.label: m.delta for m in at.metric}
    assert deltas["Missed cases with AI"] == "-5.0"
    assert deltas["False alarms with AI"] == "no change"
    at.number_input(key="roi_sensitivity").set_value(0.6).run()
    at.number_input(key="roi_minutes_with").set_value(6.0).run()
    assert not at.exception
    slower = replace(roi.RoiInputs(), sensitivity=0.6, minutes_with=6.0)
    got = shown(at)
    assert {k: got[k] for k in expected(roi.evaluate(slower))} == expected(roi.evaluate(slower))
    # reads take longer with AI and it misses more: it never breaks even, and the page says so
    assert got["Break-even daily volume"] == "none"
    assert any("No daily volume breaks even" in c.value for c in at.caption)
