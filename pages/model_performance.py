"""Model Performance: every figure of the evaluation report, in tabs: the confusion matrix,
per-class metrics with intervals (and PPV/NPV at a prevalence you set), ROC and PR curves,
calibration, training curves, a live operating-point explorer, external validation and a
two-run comparison. Figures come from the report and the per-image records; nothing here
re-runs the model."""

import streamlit as st

from core import charts, compare, overview, ui
from core.errors import CXRError

st.title("Model Performance")
ui.disclaimer()
run = ui.require_run()
report = ui.require_report(run)
classes = run.classes
colours = ui.class_colours(classes)
op = run.operating_point or {}

rules = {"Most probable class (argmax)": "at_argmax"}
if report.get("at_operating_point") and op.get("threshold") is not None:
    rules[f"Operating point ({op['class']} when p ≥ {op['threshold']:.3f})"] = "at_operating_point"
rule = rules[st.radio("Decision rule", list(rules), horizontal=True,
                      help="The operating point favours sensitivity for the screening class; "
                           "the threshold was chosen on the validation split.")]
block = report[rule]
st.caption(f"Run **{run.name}** · {report.get('n', '?')} test images · 95% intervals from a "
           "stratified bootstrap.")

tabs = st.tabs(["Confusion matrix", "Per-class metrics", "ROC & PR curves", "Calibration",
                "Training", "Operating point", "External validation", "Compare runs"])

with tabs[0]:
    cm = block["confusion_matrix"]
    normalised = st.toggle("Row-normalised (share of each true class)", key="cm_normalised")
    left, right = st.columns([3, 2], gap="large")
    with left:
        ui.chart(charts.confusion_figure(cm["labels"], cm["counts"], normalised), "cm_figure")
    with right:
        st.markdown("**Counts** (rows: true class; columns: predicted)")
        st.dataframe([{"True class": t, **dict(zip(cm["labels"], row, strict=True))}
                      for t, row in zip(cm["labels"], cm["counts"], strict=True)],
                     hide_index=True, key="cm_table")
        if cm.get("empty_rows"):
            st.caption(f"No test images of: {', '.join(cm['empty_rows'])}.")

with tabs[1]:
    ui.metric_table(overview.per_class_rows(report, rule),
                    pct=("Sensitivity", "Specificity", "PPV", "NPV"), transpose=True)
    st.caption("Value [95% CI]. PPV and NPV above are at this test set's class balance; "
               "ROC-AUC is threshold-free and the same under both rules.")
    st.subheader("PPV and NPV at your prevalence")
    st.markdown("PPV and NPV depend on how common a class is. Set each class's prevalence in "
                "the population you have in mind (default: its share of the test set).")
    share = overview.sample_prevalence(report, classes)
    set_prev = (report.get("settings") or {}).get("prevalence") or {}
    prevalence = {}
    for col, cls in zip(st.columns(len(classes)), classes, strict=True):
        pct = col.number_input(f"{cls} prevalence (%)", min_value=0.1, max_value=99.9,
                               value=min(99.9, max(0.1, round(100 * set_prev.get(cls, share[cls]),
                                                              1))),
                               step=0.5, key=f"prev_{cls}")
        prevalence[cls] = pct / 100
    ui.metric_table(overview.prevalence_rows(report, rule, prevalence),
                    pct=("Prevalence", "PPV at prevalence", "NPV at prevalence"))
    st.caption("Bayes' rule on the sensitivity and specificity above (point values, no "
               "interval).")

with tabs[2]:
    curves = report.get("curves") or {}
    ranking = (report.get("threshold_free") or {}).get("per_class") or {}
    aucs = {c: (ranking.get(c) or {}).get("roc_auc", {}).get("value") for c in classes}
    left, right = st.columns(2)
    with left:
        ui.chart(charts.roc_figure(curves.get("roc") or {}, colours, aucs), "roc")
    with right:
        ui.chart(charts.pr_figure(curves.get("pr") or {}, colours, share), "pr")

with tabs[3]:
    cal = report.get("calibration") or {}
    if not cal:
        st.info("The report has no calibration section.")
    else:
        left, right = st.columns([3, 2], gap="large")
        with left:
            ui.chart(charts.reliability_figure(cal), "reliability")
        with right:
            a, b = st.columns(2)
            ui.kpi(a, "ECE before", (cal.get("before") or {}).get("ece"))
            ui.kpi(b, "ECE after", (cal.get("after") or {}).get("ece"))
            st.markdown(f"Temperature **T = {cal.get('temperature', 1.0):.3g}** "
                        f"({'fitted on validation' if cal.get('fitted') else 'not fitted'}). "
                        f"NLL {ui.fmt_metric(cal['before'].get('nll'))} → "
                        f"{ui.fmt_metric(cal['after'].get('nll'))}; Brier "
                        f"{ui.fmt_metric(cal['before'].get('brier'))} → "
                        f"{ui.fmt_metric(cal['after'].get('brier'))}.")
            st.caption("A calibrated model's points lie on the diagonal: of the images it "
                       "calls with 80% confidence, 80% are right.")

with tabs[4]:
    if run.history:
        ui.chart(charts.history_figure(run.history), "history")
    else:
        st.info("No training history (`history.json`) beside this run's checkpoint.")

with tabs[5]:
    cls = overview.screening_class(run)
    if not cls:
        cls = st.selectbox("Class to screen for", classes, key="op_class")
        st.caption("This run has no stored operating point; 0.5 is a starting value.")
    stored = overview.stored_threshold(run)
    if run.predictions is None:
        st.info("No per-image records (`report/predictions.csv`). Write them with "
                f"`python -m core.evaluate --checkpoint {run.checkpoint}`.")
    else:
        thr = st.slider(f"Threshold on the {cls} probability", 0.0, 1.0, value=stored,
                        step=0.005, format="%.3f", key="op_threshold",
                        help=f"{cls} is called when its probability reaches the threshold; "
                             f"otherwise the most probable other class. Stored: {stored:.4f}.")
        try:
            live = overview.explore(run.predictions, classes, cls, thr)
        except CXRError as exc:
            st.error(f"Cannot use this run's per-image records: {exc}")
        else:
            cols = st.columns(4)
            for col, (key, label) in zip(cols, (("sensitivity", "Sensitivity"),
                                                ("specificity", "Specificity"),
                                                ("ppv", "PPV"), ("npv", "NPV")), strict=True):
                ui.kpi(col, f"{cls} {label}", live[key], pct=True)
            st.caption(f"At threshold {thr:.3f}: TP {live['tp']:.0f} · FP {live['fp']:.0f} · "
                       f"FN {live['fn']:.0f} · TN {live['tn']:.0f}. At the stored threshold "
                       f"({stored:.4f}) these are the report's operating-point figures.")
            left, right = st.columns(2)
            with left:
                ui.chart(charts.confusion_figure(classes, live["confusion"]), "op_confusion")
            with right:
                ui.chart(charts.operating_figure(live["table"], cls, thr), "op_curve")

with tabs[6]:
    ext = report.get("external")
    if not ext:
        st.info("Not measured. Evaluate on an independent hospital's images with "
                f"`python -m core.evaluate --checkpoint {run.checkpoint} --external-dir DIR`.")
    else:
        if ext.get("overlap_with_manifest"):
            st.warning(f"{ext['overlap_with_manifest']} external images are byte-identical to "
                       "images of the training database: this is not independent.")
        st.markdown(f"`{ext.get('data_dir')}`: {ext.get('n')} images.")
        ui.metric_table(overview.external_rows(report))
        ecm = (ext.get(rule) or ext["at_argmax"])["confusion_matrix"]
        ui.chart(charts.confusion_figure(ecm["labels"], ecm["counts"],
                                         title="External confusion matrix"), "ext_confusion")

with tabs[7]:
    names = ui.run_names()
    if len(names) < 2:
        st.info("Only one run under models/. Train another (e.g. `python -m core.train "
                "--lung-view crop --output models/crop`) to compare.")
    else:
        a, b = st.columns(2)
        first = a.selectbox("Run A", names, index=names.index(run.name)
                            if run.name in names else 0, key="cmp_a")
        second = b.selectbox("Run B", names, index=1 if names[0] == first else 0, key="cmp_b")
        chosen = [ui.load_run_named(n) for n in (first, second)]
        lacking = [n for n, r in zip((first, second), chosen, strict=True)
                   if r is None or r.report is None]
        if lacking:
            st.info(f"No evaluation report for {', '.join(lacking)}: run "
                    "`python -m core.evaluate --checkpoint models/<run>/best.pt`.")
        else:
            rows = [compare.summarise(r.report, r.name) for r in chosen]
            try:
                st.markdown(compare.markdown({"rows": rows,
                                              "recommendation": compare.recommend(rows)}))
            except CXRError as exc:
                st.error(str(exc))
            for r in chosen:
                verdict = (r.report.get("shortcut") or {}).get("verdict")
                st.caption(f"**{r.name}** shortcut probe: {verdict or 'not run'}")
