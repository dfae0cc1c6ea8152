"""Business Impact: an ROI calculator over ``core.roi``. The AI's sensitivity and specificity
come from the selected run's stored test records at a threshold the user can move; without a
run they are manual inputs, so the calculator never blocks a business user."""

import streamlit as st

from core import roi, ui
from core.errors import ConfigError

ui.use_app_navigation()

st.title("Business Impact")
ui.disclaimer()
st.caption("What AI-assisted reading of chest X-rays could save, and what it costs. Every "
           "figure follows the cost model in `core/roi.py`; the defaults marked as assumptions "
           "are placeholders to replace with your site's figures.")

# -- the AI's sensitivity and specificity: from the run, or by hand
st.subheader("The AI's operating point")
run = ui.pick_run()
rates: tuple[float, float] | None = None
if run is None:
    st.info("No run selected: enter the AI's sensitivity and specificity by hand below. To take "
            f"them from a model's test results, train one with `{ui.TRAIN_COMMAND}`.")
elif run.predictions is None:
    st.info(f"Run **{run.name}** has no per-image test records: enter sensitivity and "
            "specificity by hand, or write them with "
            f"`python -m core.evaluate --checkpoint {run.checkpoint}`.")
else:
    cls = roi.screening_class(run.classes, run.operating_point)
    op = run.operating_point or {}
    stored = float(op["threshold"]) if op.get("class") == cls else 0.5
    left, right = st.columns([2, 3])
    threshold = left.slider(
        f"{cls} threshold", 0.0, 1.0, stored, 0.01, format="%.3f",
        key=f"roi_threshold_{run.name}",
        help=f"An image counts as {cls} when its calibrated probability is at least this.")
    left.caption(f"The run's stored operating point: {stored:.4g}." if op.get("class") == cls
                 else f"The run has no stored operating point for {cls}; 0.5 to start.")
    try:
        rates = roi.model_rates(run.predictions, run.classes, cls, threshold)
    except ConfigError as err:
        st.error(str(err))
    else:
        a, b = right.columns(2)
        a.metric(f"Sensitivity with AI ({cls})", f"{rates[0]:.1%}")
        b.metric(f"Specificity with AI ({cls})", f"{rates[1]:.1%}")
        right.caption(f"Run **{run.name}**, on its {len(run.predictions)} test images "
                      "(a small test set gives uncertain rates: see Model Performance).")

model_specs = roi.input_fields("Model")
if rates is None:
    cols = st.columns(4)[:len(model_specs)]
    rates = tuple(ui.roi_input(c, s) for c, s in zip(cols, model_specs, strict=True))

# -- the other inputs, built from core.roi's field metadata
st.subheader("Inputs")
values: dict[str, float] = {}
for group, col in zip(roi.GROUPS, st.columns(len(roi.GROUPS)), strict=True):
    col.markdown(f"**{group}**")
    for spec in roi.input_fields(group):
        values[spec["name"]] = ui.roi_input(col, spec)

try:
    inputs = roi.RoiInputs(**values, sensitivity=rates[0], specificity=rates[1])
except ConfigError as err:
    st.error(str(err))
    st.stop()
result = roi.evaluate(inputs)

# -- results
st.subheader("Results")
c = st.columns(4)
c[0].metric("Reads per year", f"{result.reads_per_year:,.0f}",
            help="Daily volume × working days.")
c[1].metric("Reader hours saved per year", f"{result.hours_saved:,.0f} h",
            help="Reads per year × (minutes without − minutes with AI) / 60.")
c[2].metric("Labour saving per year", roi.money(result.labour_saving),
            help="Hours saved × radiologist cost per hour.")
c[3].metric("Outcome saving per year", roi.money(result.outcome_saving),
            help="Fewer (or more) missed cases and false alarms, at their costs. Can be "
                 "negative when the AI is less accurate than the reader.")
c = st.columns(4)
c[0].metric("Net benefit per year", roi.money(result.net_benefit),
            help="Labour saving + outcome saving − annual licence and maintenance.")
c[1].metric("Net present value", roi.money(result.npv),
            help="− deployment cost + each year's net benefit discounted over the horizon.")
c[2].metric("Return on investment", roi.fmt_pct(result.roi_pct),
            help="NPV / (deployment cost + discounted annual costs).")
c[3].metric("Payback period", roi.fmt_years(result.payback_years),
            help="When the cumulative discounted net benefit first covers the deployment cost.")
st.markdown("**Per 1,000 reads**")
c = st.columns(4)
c[0].metric("Missed cases without AI", f"{result.missed_without:.1f}",
            help="1,000 × prevalence × (1 − reader sensitivity).")
ui.change_metric(c[1], "Missed cases with AI", result.missed_with, result.missed_without,
                 help="1,000 × prevalence × (1 − sensitivity with AI).")
c[2].metric("False alarms without AI", f"{result.false_alarms_without:.1f}",
            help="1,000 × (1 − prevalence) × (1 − reader specificity).")
ui.change_metric(c[3], "False alarms with AI", result.false_alarms_with,
                 result.false_alarms_without,
                 help="1,000 × (1 − prevalence) × (1 − specificity with AI).")
c = st.columns(4)
c[0].metric("Break-even daily volume", roi.fmt_volume(result.break_even_volume),
            help="The daily volume at which the NPV is zero.")
if result.break_even_volume is None:
    c[1].caption("No daily volume breaks even: with these inputs each read saves nothing or "
                 "loses money (e.g. AI makes reads slower), so more volume only adds to the loss.")

# -- sensitivity analysis
st.subheader("What moves the result")
st.caption("Net present value with each input moved 30% down and 30% up, one at a time, the "
           "others as above (probabilities kept within 0 to 1, the horizon in whole years); "
           "widest effect on top.")
st.plotly_chart(ui.tornado_chart(roi.tornado(inputs), result.npv), width="stretch",
                theme=None)
st.markdown(
    """
**Caveats**
- Published ROI studies of radiology AI often leave out IT integration (PACS/RIS), validation
  and training costs: count them in the one-off deployment cost.
- The value depends on volume and workflow: below the break-even volume the AI loses money, and
  reading-time savings only count if radiologists really read faster and that time is used.
- The costs of a miss and of a false alarm, the reader's accuracy and the prevalence are
  assumptions; the AI's rates come from a test set that may not look like your patients.
"""
)
