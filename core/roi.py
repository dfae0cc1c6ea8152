"""Return on investment of AI-assisted chest X-ray reading: a small, hand-checkable cost model.

Pure functions over a frozen :class:`RoiInputs` (no Streamlit, no torch). Each input's label,
help text, bounds and group live in its field metadata, so the Business Impact page builds its
inputs from one place (:func:`input_fields`).

The model (P prevalence; Se, Sp the model's sensitivity and specificity at the threshold;
Se0, Sp0 the reader's without AI; r the discount rate; H the horizon in years):

* reads per year ``R = daily volume x working days``;
* hours saved per year ``= R x (minutes without - minutes with) / 60``; labour saving
  ``= hours x cost per hour``;
* missed cases per 1,000 reads ``= 1000 P (1 - Se)``, false alarms per 1,000
  ``= 1000 (1 - P) (1 - Sp)``, with AI (Se, Sp) and without (Se0, Sp0);
* outcome saving per year ``= R / 1000 x [(missed without - missed with) x cost of a miss +
  (false alarms without - false alarms with) x cost of a false alarm]`` (can be negative);
* net benefit per year ``B = labour saving + outcome saving - annual cost``;
* ``NPV = -deployment + sum_{y=1..H} B / (1 + r)^y``;
* ``ROI % = NPV / (deployment + sum_{y=1..H} annual cost / (1 + r)^y) x 100``;
* payback: when the cumulative discounted B first covers the deployment cost, linear within
  a year (None: not within the horizon);
* break-even daily volume: the volume at which NPV = 0 (NPV is linear in the volume);
* tornado: NPV with each input at -30% and +30% (kept within its bounds, e.g. probabilities
  in [0, 1]), the others at base, sorted by the spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from core.errors import ConfigError
from core.operating import at_threshold, records_arrays

GROUPS = ("Volume and workflow", "Costs and horizon", "Outcomes")
ASSUMPTION = " An assumption: replace it with your own figure."


def _input(default: float, label: str, help: str, group: str, lo: float = 0.0,
           hi: float | None = None, step: float = 1.0, fmt: str = "%.0f",
           integer: bool = False) -> Any:
    return field(default=default, metadata={
        "label": label, "help": help, "group": group, "lo": lo, "hi": hi, "step": step,
        "format": fmt, "integer": integer})


def _prob(default: float, label: str, help: str, group: str = "Outcomes") -> Any:
    return _input(default, label, help, group, 0.0, 1.0, 0.01, "%.3f")


@dataclass(frozen=True)
class RoiInputs:
    """The calculator's inputs, validated on construction (:class:`ConfigError`)."""

    daily_volume: float = _input(
        100.0, "Daily X-ray volume", "Chest X-rays read per working day at your site.",
        GROUPS[0], step=10.0)
    working_days: float = _input(
        250.0, "Working days per year", "Days per year on which X-rays are read (at most 366).",
        GROUPS[0], hi=366.0)
    minutes_without: float = _input(
        5.0, "Minutes per read without AI", "A radiologist's reading time per X-ray today "
        "(the reference notebook's estimate: 5 minutes).", GROUPS[0], step=0.5, fmt="%.2f")
    minutes_with: float = _input(
        0.5, "Minutes per read with AI", "Reading time per X-ray with the AI's triage and "
        "heatmap (the reference notebook's estimate: 30 seconds). If AI makes reads slower, "
        "enter more than without.", GROUPS[0], step=0.5, fmt="%.2f")
    cost_per_hour: float = _input(
        150.0, "Radiologist cost per hour ($)", "Fully loaded cost of one radiologist hour.",
        GROUPS[0], step=10.0)
    deployment_cost: float = _input(
        100_000.0, "One-off deployment cost ($)", "Installation, IT integration (PACS/RIS), "
        "validation on local data and staff training." + ASSUMPTION, GROUPS[1], step=1_000.0)
    annual_cost: float = _input(
        30_000.0, "Annual licence and maintenance ($)", "Yearly licence, hosting, monitoring "
        "and support." + ASSUMPTION, GROUPS[1], step=1_000.0)
    horizon_years: int = _input(
        5, "Time horizon (years)", "Years over which the investment is judged (whole years).",
        GROUPS[1], lo=1.0, hi=50.0, integer=True)
    discount_rate: float = _input(
        0.05, "Discount rate (per year, 0-1)", "Yearly rate at which future savings are "
        "discounted, e.g. 0.05 for 5%." + ASSUMPTION, GROUPS[1], hi=1.0, step=0.01, fmt="%.3f")
    prevalence: float = _prob(
        0.10, "Prevalence (0-1)", "Share of read X-rays that show the screened condition."
        + ASSUMPTION)
    cost_miss: float = _input(
        5_000.0, "Cost of a missed case ($)", "Cost of a late diagnosis: extra treatment, longer "
        "stay, onward transmission." + ASSUMPTION, GROUPS[2], step=500.0)
    cost_false_alarm: float = _input(
        200.0, "Cost of a false alarm ($)", "Cost of a needless follow-up: confirmatory test, "
        "isolation, extra review." + ASSUMPTION, GROUPS[2], step=50.0)
    reader_sensitivity: float = _prob(
        0.85, "Reader sensitivity without AI (0-1)", "Share of true cases a radiologist catches "
        "without AI." + ASSUMPTION)
    reader_specificity: float = _prob(
        0.90, "Reader specificity without AI (0-1)", "Share of negatives a radiologist clears "
        "without AI." + ASSUMPTION)
    sensitivity: float = _prob(
        0.90, "Sensitivity with AI (0-1)", "Share of true cases caught with AI: the selected "
        "run's sensitivity at the chosen threshold.", "Model")
    specificity: float = _prob(
        0.90, "Specificity with AI (0-1)", "Share of negatives cleared with AI: the selected "
        "run's specificity at the chosen threshold.", "Model")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            label = meta["label"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ConfigError(f"{label}: {value!r} is not a number; enter a finite number.")
            if value < meta["lo"] or (meta["hi"] is not None and value > meta["hi"]):
                bounds = (f"between {meta['lo']:g} and {meta['hi']:g}" if meta["hi"] is not None
                          else f"at least {meta['lo']:g}")
                raise ConfigError(f"{label} is {value:g}; it must be {bounds}.")
            if meta["integer"] and value != int(value):
                raise ConfigError(f"{label} is {value:g}; enter a whole number.")


def input_fields(group: str | None = None) -> list[dict[str, Any]]:
    """Each input's name, default and metadata (label, help, group, lo, hi, step, format,
    integer), in declaration order, optionally only those of ``group``."""
    out = [{"name": f.name, "default": f.default, **f.metadata} for f in fields(RoiInputs)]
    return [f for f in out if group is None or f["group"] == group]


@dataclass(frozen=True)
class RoiResult:
    """What :func:`evaluate` computes (money in dollars, per year unless stated)."""

    reads_per_year: float
    hours_saved: float
    labour_saving: float
    missed_without: float  # per 1,000 reads
    missed_with: float
    false_alarms_without: float  # per 1,000 reads
    false_alarms_with: float
    outcome_saving: float
    net_benefit: float
    npv: float
    roi_pct: float | None  # None when nothing is spent
    payback_years: float | None  # None: not within the horizon
    break_even_volume: float | None  # None: no volume breaks even


def annuity_factor(rate: float, years: int) -> float:
    """``sum_{y=1..years} 1 / (1 + rate)^y``."""
    return sum(1.0 / (1.0 + rate) ** y for y in range(1, int(years) + 1))


def npv(net_benefit: float, upfront: float, rate: float, years: int) -> float:
    """Net present value of ``net_benefit`` each year for ``years`` years after ``upfront``
    is paid at time 0."""
    return -upfront + net_benefit * annuity_factor(rate, years)


def payback_years(net_benefit: float, upfront: float, rate: float, years: int) -> float | None:
    """The time at which the cumulative discounted yearly benefit first covers ``upfront``
    (linear within a year), or None when it does not within ``years``."""
    if upfront <= 0:
        return 0.0
    covered = 0.0
    for y in range(1, int(years) + 1):
        this_year = net_benefit / (1.0 + rate) ** y
        if this_year > 0 and covered + this_year >= upfront:
            return (y - 1) + (upfront - covered) / this_year
        covered += this_year
    return None


def per_thousand(inputs: RoiInputs) -> dict[str, float]:
    """Missed cases and false alarms per 1,000 reads, without and with AI."""
    p = inputs.prevalence
    return {"missed_without": 1000 * p * (1 - inputs.reader_sensitivity),
            "missed_with": 1000 * p * (1 - inputs.sensitivity),
            "false_alarms_without": 1000 * (1 - p) * (1 - inputs.reader_specificity),
            "false_alarms_with": 1000 * (1 - p) * (1 - inputs.specificity)}


def saving_per_read(inputs: RoiInputs) -> float:
    """Labour plus outcome saving of one read (dollars; negative when AI costs money)."""
    k = per_thousand(inputs)
    labour = (inputs.minutes_without - inputs.minutes_with) / 60 * inputs.cost_per_hour
    outcome = ((k["missed_without"] - k["missed_with"]) * inputs.cost_miss
               + (k["false_alarms_without"] - k["false_alarms_with"]) * inputs.cost_false_alarm)
    return labour + outcome / 1000


def break_even_volume(inputs: RoiInputs) -> float | None:
    """The daily volume at which NPV = 0, exactly (NPV is linear in the volume); None when
    no volume breaks even (a read saves nothing or loses money while there are costs)."""
    a = annuity_factor(inputs.discount_rate, inputs.horizon_years)
    fixed = inputs.deployment_cost + inputs.annual_cost * a  # present value of the costs
    if fixed <= 0:
        return 0.0
    per_day_year = inputs.working_days * saving_per_read(inputs)  # B per unit daily volume
    if per_day_year <= 0:
        return None
    # NPV(v) = -D + a (v W s - annual) = 0  <=>  v = (D + a annual) / (a W s)
    return fixed / (a * per_day_year)


def evaluate(inputs: RoiInputs) -> RoiResult:
    """The cost model of the module docstring at ``inputs``."""
    i = inputs
    reads = i.daily_volume * i.working_days
    hours = reads * (i.minutes_without - i.minutes_with) / 60
    labour = hours * i.cost_per_hour
    k = per_thousand(i)
    outcome = reads / 1000 * ((k["missed_without"] - k["missed_with"]) * i.cost_miss
                              + (k["false_alarms_without"] - k["false_alarms_with"])
                              * i.cost_false_alarm)
    benefit = labour + outcome - i.annual_cost
    value = npv(benefit, i.deployment_cost, i.discount_rate, i.horizon_years)
    spent = i.deployment_cost + i.annual_cost * annuity_factor(i.discount_rate, i.horizon_years)
    return RoiResult(
        reads_per_year=reads, hours_saved=hours, labour_saving=labour, **k,
        outcome_saving=outcome, net_benefit=benefit, npv=value,
        roi_pct=value / spent * 100 if spent > 0 else None,
        payback_years=payback_years(benefit, i.deployment_cost, i.discount_rate,
                                    i.horizon_years),
        break_even_volume=break_even_volume(i))


@dataclass(frozen=True)
class TornadoBar:
    """NPV with one input moved down and up, the others at base."""

    name: str
    label: str
    low_value: float
    high_value: float
    npv_low: float
    npv_high: float

    @property
    def spread(self) -> float:
        return abs(self.npv_high - self.npv_low)


def _moved(inputs: RoiInputs, meta: dict[str, Any], factor: float) -> float:
    value = getattr(inputs, meta["name"]) * factor
    if meta["integer"]:
        value = float(math.floor(value + 0.5))
    value = max(meta["lo"], value)
    return min(meta["hi"], value) if meta["hi"] is not None else value


def tornado(inputs: RoiInputs, swing: float = 0.3,
            names: Sequence[str] | None = None) -> list[TornadoBar]:
    """NPV with each input (or each of ``names``) at ``-swing`` and ``+swing`` of its value,
    kept within its bounds (probabilities in [0, 1], whole years), sorted by the spread,
    widest first."""
    if not 0 < swing < 1:
        raise ConfigError(f"swing={swing} must lie strictly between 0 and 1 (0.3 for ±30%).")
    bars = []
    for meta in input_fields():
        if names is not None and meta["name"] not in names:
            continue
        lo, hi = _moved(inputs, meta, 1 - swing), _moved(inputs, meta, 1 + swing)
        bars.append(TornadoBar(
            name=meta["name"], label=meta["label"], low_value=lo, high_value=hi,
            npv_low=evaluate(replace(inputs, **{meta["name"]: lo})).npv,
            npv_high=evaluate(replace(inputs, **{meta["name"]: hi})).npv))
    return sorted(bars, key=lambda b: -b.spread)


def screening_class(classes: Sequence[str], operating_point: dict[str, Any] | None) -> str:
    """The class the calculator screens for: the run's operating point class, else "COVID"
    when the run has it, else the first class."""
    classes = list(classes)
    if not classes:
        raise ConfigError("The run names no classes; re-run `python -m core.runs summarise`.")
    if operating_point and operating_point.get("class") in classes:
        return str(operating_point["class"])
    return "COVID" if "COVID" in classes else classes[0]


def model_rates(records: Any, classes: Sequence[str], cls: str,
                threshold: float) -> tuple[float, float]:
    """The model's ``(sensitivity, specificity)`` for ``cls`` at ``threshold`` from a run's
    per-image records (``report/predictions.csv``), by :mod:`core.operating`."""
    y, proba = records_arrays(records, classes)
    row = at_threshold(y, proba, classes, cls, threshold)
    se, sp = float(row["sensitivity"]), float(row["specificity"])
    if not (math.isfinite(se) and math.isfinite(sp)):
        missing = "positive" if not math.isfinite(se) else "negative"
        raise ConfigError(f"The test records hold no {missing} {cls} case, so the model's "
                          "sensitivity or specificity is undefined; enter them by hand.")
    return se, sp


def money(x: float) -> str:
    """Dollars without cents: ``$1,234,567``, ``-$1,500``."""
    v = round(x)
    return f"-${-v:,}" if v < 0 else f"${v:,}"


def fmt_years(years: float | None) -> str:
    """``2.3 years``, ``4.5 months`` under a year, or ``not within the horizon``."""
    if years is None:
        return "not within the horizon"
    return f"{years:.1f} years" if years >= 1 else f"{12 * years:.1f} months"


def fmt_volume(volume: float | None) -> str:
    return "none" if volume is None else f"{volume:,.1f} X-rays/day"


def fmt_pct(pct: float | None) -> str:
    return "undefined (nothing spent)" if pct is None else f"{pct:,.1f}%"
