"""The ROI model (core.roi) against cases computed by hand, the arithmetic written out."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest

from core import roi
from core.errors import ConfigError

# Case A, chosen so that every figure can be worked out on paper.
CASE_A = roi.RoiInputs(
    daily_volume=40, working_days=250, minutes_without=5, minutes_with=2, cost_per_hour=100,
    deployment_cost=60_000, annual_cost=20_000, horizon_years=3, discount_rate=0.10,
    prevalence=0.1, cost_miss=1_000, cost_false_alarm=100,
    reader_sensitivity=0.8, reader_specificity=0.9, sensitivity=0.9, specificity=0.8)
# 1/1.1 + 1/1.21 + 1/1.331, the present value of $1 a year for 3 years at 10%
A3 = 1 / 1.1 + 1 / 1.21 + 1 / 1.331


def test_yearly_figures_by_hand():
    r = roi.evaluate(CASE_A)
    # reads per year R = 40 x 250 = 10,000
    assert r.reads_per_year == 10_000
    # hours saved = 10,000 x (5 - 2) / 60 = 500 h; labour saving = 500 x $100 = $50,000
    assert r.hours_saved == pytest.approx(500)
    assert r.labour_saving == pytest.approx(50_000)
    # missed per 1,000: without 1000 x 0.1 x (1 - 0.8) = 20, with 1000 x 0.1 x (1 - 0.9) = 10
    assert (r.missed_without, r.missed_with) == (pytest.approx(20), pytest.approx(10))
    # false alarms per 1,000: without 1000 x 0.9 x (1 - 0.9) = 90, with 1000 x 0.9 x 0.2 = 180
    assert (r.false_alarms_without, r.false_alarms_with) == (pytest.approx(90),
                                                             pytest.approx(180))
    # outcome saving = 10,000 / 1,000 x [(20 - 10) x 1,000 + (90 - 180) x 100]
    #                = 10 x [10,000 - 9,000] = $10,000
    assert r.outcome_saving == pytest.approx(10_000)
    # B = 50,000 + 10,000 - 20,000 = $40,000
    assert r.net_benefit == pytest.approx(40_000)


def test_npv_roi_and_payback_with_a_discount_rate_by_hand():
    r = roi.evaluate(CASE_A)
    # NPV = -60,000 + 40,000/1.1 + 40,000/1.21 + 40,000/1.331
    #     = -60,000 + 36,363.64 + 33,057.85 + 30,052.59 = 39,474.08
    assert r.npv == pytest.approx(39_474.08, abs=0.01)
    assert roi.npv(40_000, 60_000, 0.10, 3) == pytest.approx(-60_000 + 40_000 * A3)
    # ROI = 39,474.08 / (60,000 + 20,000 x 2.486852) = 39,474.08 / 109,737.04 = 35.97%
    assert r.roi_pct == pytest.approx(100 * 39_474.0796 / (60_000 + 20_000 * A3), rel=1e-6)
    assert r.roi_pct == pytest.approx(35.97, abs=0.01)
    # payback: year 1 brings 36,363.64 (< 60,000); year 2 another 33,057.85 (cumulative
    # 69,421.49 >= 60,000), so 1 + (60,000 - 36,363.64) / 33,057.85 = 1 + 28,600/40,000 = 1.715
    assert r.payback_years == pytest.approx(1.715)


def test_payback_without_discounting_and_not_within_the_horizon():
    # no discounting: $40,000 a year covers $60,000 after 1.5 years
    assert roi.payback_years(40_000, 60_000, 0.0, 3) == pytest.approx(1.5)
    assert roi.evaluate(replace(CASE_A, discount_rate=0.0)).payback_years == pytest.approx(1.5)
    # within one year: 40,000 covers 10,000 after a quarter year
    assert roi.payback_years(40_000, 10_000, 0.0, 3) == pytest.approx(0.25)
    # a one-year horizon: 36,363.64 < 60,000 -> not within the horizon, and a negative NPV
    one = roi.evaluate(replace(CASE_A, horizon_years=1))
    assert one.payback_years is None
    assert one.npv == pytest.approx(-60_000 + 40_000 / 1.1)
    # a loss every year never pays back; nothing to pay back is paid back at once
    assert roi.payback_years(-5_000, 60_000, 0.1, 10) is None
    assert roi.payback_years(40_000, 0, 0.1, 3) == 0.0
    assert roi.fmt_years(None) == "not within the horizon"
    assert roi.fmt_years(1.715) == "1.7 years" and roi.fmt_years(0.25) == "3.0 months"


def test_break_even_volume_solves_npv_zero_exactly():
    # each read saves 3/60 x $100 = $5 of labour plus (10 x 1,000 - 90 x 100) / 1,000 = $1 of
    # outcomes: $6. NPV(v) = -60,000 + A3 (v x 250 x 6 - 20,000) = 0
    # -> v = (60,000 / A3 + 20,000) / 1,500 = (24,126.89 + 20,000) / 1,500 = 29.418
    v = roi.break_even_volume(CASE_A)
    assert v == pytest.approx((60_000 / A3 + 20_000) / 1_500)
    assert v == pytest.approx(29.418, abs=1e-3)
    assert roi.evaluate(CASE_A).break_even_volume == v
    assert roi.evaluate(replace(CASE_A, daily_volume=v)).npv == pytest.approx(0, abs=1e-6)
    # below it the NPV is negative, above positive
    assert roi.evaluate(replace(CASE_A, daily_volume=v - 1)).npv < 0
    assert roi.evaluate(replace(CASE_A, daily_volume=v + 1)).npv > 0


def test_break_even_when_labour_saving_is_not_positive():
    # AI costs a minute a read and is no more accurate than the reader: a read loses
    # 1/60 x $100 and no volume breaks even
    slower = replace(CASE_A, minutes_with=6, sensitivity=0.8, specificity=0.9)
    assert roi.break_even_volume(slower) is None
    assert roi.evaluate(slower).break_even_volume is None
    assert roi.fmt_volume(None) == "none"
    # no labour saving, but outcomes save $1 a read (case A's) -> v = (60,000/A3 + 20,000)/250
    same_time = replace(CASE_A, minutes_with=5)
    v = roi.break_even_volume(same_time)
    assert v == pytest.approx((60_000 / A3 + 20_000) / 250)
    assert roi.evaluate(replace(same_time, daily_volume=v)).npv == pytest.approx(0, abs=1e-6)
    # outcomes that cannot cover a slower read: labour (5 - 6)/60 x $100 = -$1.67 a read,
    # outcomes +$1 a read (case A's): -$0.67 a read, no break-even
    assert roi.break_even_volume(replace(CASE_A, minutes_with=6)) is None
    # nothing to recover: breaks even at any volume, reported as 0
    free = replace(CASE_A, deployment_cost=0, annual_cost=0)
    assert roi.break_even_volume(free) == 0.0


def test_outcome_saving_can_be_negative():
    # an AI that misses more than the reader: missed 1000 x 0.1 x 0.5 = 50 vs 20 without;
    # outcome = 10 x [(20 - 50) x 1,000 + (90 - 180) x 100] = 10 x (-30,000 - 9,000) = -390,000
    worse = replace(CASE_A, sensitivity=0.5)
    assert roi.evaluate(worse).outcome_saving == pytest.approx(-390_000)


def test_tornado_moves_each_input_30_percent_and_sorts_by_spread():
    bars = roi.tornado(CASE_A)
    assert {b.name for b in bars} == {f["name"] for f in roi.input_fields()}
    spreads = [b.spread for b in bars]
    assert spreads == sorted(spreads, reverse=True)
    by = {b.name: b for b in bars}
    # daily volume 28 and 52: NPV is linear in it, spread = A3 x (52 - 28) x 250 x $6
    #   = 2.486852 x 36,000 = 89,526.7
    assert (by["daily_volume"].low_value, by["daily_volume"].high_value) == (28, 52)
    assert by["daily_volume"].spread == pytest.approx(A3 * 24 * 250 * 6)
    # deployment cost 42,000 and 78,000: spread exactly 36,000, narrower than the volume's
    assert by["deployment_cost"].npv_low - by["deployment_cost"].npv_high == pytest.approx(36_000)
    assert bars.index(by["daily_volume"]) < bars.index(by["deployment_cost"])
    # each end is the NPV with only that input moved
    base = roi.evaluate(CASE_A).npv
    for b in bars:
        assert b.npv_low == pytest.approx(roi.evaluate(replace(CASE_A, **{b.name: b.low_value})).npv)
        assert b.npv_high == pytest.approx(
            roi.evaluate(replace(CASE_A, **{b.name: b.high_value})).npv)
        assert min(b.npv_low, b.npv_high) - 1e-6 <= base <= max(b.npv_low, b.npv_high) + 1e-6
    # the horizon moves in whole years: 3 x 0.7 = 2.1 -> 2, 3 x 1.3 = 3.9 -> 4
    assert (by["horizon_years"].low_value, by["horizon_years"].high_value) == (2, 4)


def test_tornado_keeps_probabilities_in_0_1():
    by = {b.name: b for b in roi.tornado(CASE_A)}
    # sensitivity 0.9 x 1.3 = 1.17 -> 1; reader sensitivity 0.8 x 1.3 = 1.04 -> 1;
    # specificity 0.8 x 1.3 = 1.04 -> 1; prevalence 0.1 -> 0.07 and 0.13 (inside)
    assert by["sensitivity"].high_value == 1.0 and by["sensitivity"].low_value == pytest.approx(0.63)
    assert by["reader_sensitivity"].high_value == 1.0
    assert by["specificity"].high_value == 1.0
    assert (by["prevalence"].low_value, by["prevalence"].high_value) == (pytest.approx(0.07),
                                                                         pytest.approx(0.13))
    # the clipped end is the NPV at exactly 1: missed with AI = 0, outcome saving =
    # 10 x [(20 - 0) x 1,000 - 9,000] = 110,000, B = 50,000 + 110,000 - 20,000 = 140,000
    assert by["sensitivity"].npv_high == pytest.approx(-60_000 + 140_000 * A3)
    with pytest.raises(ConfigError, match="swing"):
        roi.tornado(CASE_A, swing=1.5)


@pytest.mark.parametrize(("change", "match"), [
    ({"daily_volume": -1}, "Daily X-ray volume is -1; it must be at least 0"),
    ({"prevalence": 1.2}, r"Prevalence \(0-1\) is 1.2; it must be between 0 and 1"),
    ({"sensitivity": -0.1}, "Sensitivity with AI"),
    ({"reader_specificity": 2}, "Reader specificity"),
    ({"horizon_years": 0}, "Time horizon"),
    ({"horizon_years": 2.5}, "whole number"),
    ({"working_days": 400}, "between 0 and 366"),
    ({"cost_miss": float("nan")}, "not a number"),
])
def test_invalid_inputs_raise_config_error_with_the_input_named(change, match):
    with pytest.raises(ConfigError, match=match):
        roi.RoiInputs(**change)


def test_defaults_are_valid_and_every_input_has_a_label_and_help():
    specs = roi.input_fields()
    assert len(specs) == 16
    assert all(s["label"] and s["help"] for s in specs)
    assert {s["group"] for s in specs} == {*roi.GROUPS, "Model"}
    # the notebook's reading times and cost per hour
    d = roi.RoiInputs()
    assert (d.minutes_without, d.minutes_with, d.cost_per_hour) == (5, 0.5, 150)
    # unknowns are marked as assumptions to replace
    for name in ("deployment_cost", "annual_cost", "discount_rate", "prevalence", "cost_miss",
                 "cost_false_alarm", "reader_sensitivity", "reader_specificity"):
        assert "assumption" in next(s for s in specs if s["name"] == name)["help"]
    assert roi.evaluate(d).roi_pct is not None


def test_roi_undefined_when_nothing_is_spent():
    free = replace(CASE_A, deployment_cost=0, annual_cost=0)
    assert roi.evaluate(free).roi_pct is None
    assert roi.fmt_pct(None).startswith("undefined")


def test_money_format():
    assert roi.money(1_234_567.4) == "$1,234,567"
    assert roi.money(-1_500) == "-$1,500"
    assert roi.money(-0.4) == "$0"
    assert roi.fmt_pct(35.9713) == "36.0%"


def test_screening_class():
    classes = ["COVID", "Normal", "Viral Pneumonia"]
    assert roi.screening_class(classes, {"class": "Normal", "threshold": 0.4}) == "Normal"
    assert roi.screening_class(classes, None) == "COVID"
    assert roi.screening_class(["A", "B"], None) == "A"
    with pytest.raises(ConfigError):
        roi.screening_class([], None)


def test_model_rates_from_records_by_hand():
    # 2 COVID (0.9, 0.4), 2 Normal (COVID 0.6, 0.1), 1 Viral (0.2): at 0.5 COVID is called
    # for rows 0 and 2 -> tp 1, fn 1, fp 1, tn 2 -> Se 1/2, Sp 2/3
    df = pd.DataFrame({
        "true_class": ["COVID", "COVID", "Normal", "Normal", "Viral Pneumonia"],
        "prob_COVID": [0.9, 0.4, 0.6, 0.1, 0.2], "prob_Normal": [0.05, 0.5, 0.3, 0.8, 0.1],
        "prob_Viral Pneumonia": [0.05, 0.1, 0.1, 0.1, 0.7]})
    classes = ["COVID", "Normal", "Viral Pneumonia"]
    se, sp = roi.model_rates(df, classes, "COVID", 0.5)
    assert se == pytest.approx(0.5) and sp == pytest.approx(2 / 3)
    # without the COVID rows, COVID's sensitivity is undefined (0/0)
    with pytest.raises(ConfigError, match="no positive COVID"):
        roi.model_rates(df.iloc[2:], classes, "COVID", 0.5)
    assert math.isfinite(roi.model_rates(df, classes, "Normal", 0.5)[0])
