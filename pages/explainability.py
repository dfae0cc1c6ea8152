"""Explainability: a gallery of the test images from the run's per-image records, filtered
by class, outcome, lung focus and the OOD flag; one case's heatmap under each CAM method and
target layer; how to read a heatmap and what it cannot tell."""

import streamlit as st

from core import clinical, explore, gallery, ui
from core.errors import CXRError
from core.gradcam import METHODS, STAGES

ui.use_app_navigation()

st.title("Explainability")
ui.disclaimer()
run = ui.require_run()
if run.predictions is None:
    st.info(f"Run **{run.name}** has no per-image records yet. Write them with "
            f"`python -m core.evaluate --checkpoint {run.checkpoint}`.")
    st.stop()

with st.expander("How to read a heatmap, and what it cannot tell", expanded=True):
    st.markdown(gallery.HOW_TO_READ)

records = gallery.records(run.predictions)
classes = run.classes or sorted(records["true_class"].unique())
can = gallery.available_filters(records)

st.subheader("Test cases")
c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
true_class = c1.selectbox("True class", [gallery.ALL, *classes])
predicted = c2.selectbox("Predicted class", [gallery.ALL, *classes])
outcome = c3.selectbox("Outcome", gallery.OUTCOMES)
with c4:
    low_focus = st.checkbox("Low lung focus only", disabled=not can["low_focus"],
                            help=f"Lung focus below {clinical.LOW_LUNG_FOCUS:g}: the heatmap "
                                 "puts less weight on the lungs than an even spread."
                            if can["low_focus"] else "This run's records carry no lung focus.")
    ood_only = st.checkbox("Out-of-distribution only", disabled=not can["ood"],
                           help="Images flagged as unlike the training X-rays."
                           if can["ood"] else "This run's records carry no OOD flag.")
shown = gallery.filter_records(records, true_class, predicted, outcome, low_focus, ood_only)
st.metric("Matching test images", f"{len(shown)} of {len(records)}")

data_dir = explore.data_dir_of(run)
have_images = explore.images_available(data_dir, records["path"].tolist())
columns = [c for c in ("path", "true_class", "predicted_class", "correct", "lung_focus",
                       "ood", "low_confidence", *[f"prob_{c}" for c in classes])
           if c in shown]
if shown.empty:
    st.info("No test image matches these filters.")
    st.stop()
if not have_images:
    ui.missing_images(run, data_dir)
    st.dataframe(shown[columns], hide_index=True, width="stretch")
    st.stop()

per_page = 12
pages = (len(shown) - 1) // per_page + 1
page = st.columns(4)[0].number_input(f"Gallery page (of {pages})", 1, pages, 1) if pages > 1 else 1
on_page = shown.iloc[(page - 1) * per_page : page * per_page]
ui.image_grid(data_dir, on_page["path"].tolist(),
              [gallery.case_label(r) for _, r in on_page.iterrows()])
with st.expander("All matching records"):
    st.dataframe(shown[columns], hide_index=True, width="stretch")

st.subheader("One case")
paths = shown["path"].tolist()
labels = {r["path"]: gallery.case_label(r) for _, r in shown.iterrows()}
path = st.selectbox("Case", paths, format_func=labels.get)
row = shown[shown["path"] == path].iloc[0]
m1, m2, m3, m4 = st.columns(4)
method = m1.selectbox("CAM method", METHODS, format_func=gallery.CAM_LABELS.get,
                      help=gallery.CAM_HELP)
layer = m2.selectbox("Target layer", STAGES, index=len(STAGES) - 1,
                     help="Earlier layers are finer but less specific to the class.")
target = m3.selectbox("Explain class", ["Predicted class", *classes])
with m4:
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05)
    contour = st.checkbox("Show lung contour", value=True)

predictor = ui.predictor_or_stop(run)
try:
    case = ui.explain_case(predictor, run, data_dir / path, method, layer,
                           None if target == "Predicted class" else target)
except (CXRError, OSError) as exc:
    st.error(f"{path}: {exc}")
    st.stop()

left, right = st.columns([3, 2], gap="large")
with left:
    a, b = st.columns(2)
    a.image(case.gray, caption="Original", width="stretch")
    explained = case.prediction.label if target == "Predicted class" else target
    b.image(clinical.overlay_image(case, alpha, contour),
            caption=f"{gallery.CAM_LABELS[method]} at {layer}, class {explained}",
            width="stretch")
with right:
    st.markdown(f"**True class:** {row['true_class']}  \n"
                f"**Predicted class:** {case.prediction.label}  \n"
                f"**Decision at the operating point:** {case.prediction.decision}")
    st.plotly_chart(ui.probability_chart(case.prediction.probabilities, classes,
                                         predictor.operating_point),
                    config={"displayModeBar": False})
    st.metric("Lung focus of this map", clinical.lung_focus_text(case.lung_focus),
              help="1 = no preference, above 1 = on the lungs, below 1 = outside.")
    for level, text in clinical.flag_messages(case):
        (st.warning if level == "warning" else st.info)(text)
