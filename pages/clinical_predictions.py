"""Clinical Predictions: upload chest X-rays; for each, the predicted class, the decision at
the operating point, the probabilities, Grad-CAM beside the original and the flags in plain
words; a table of all results with a CSV download. Uploads stay in memory."""

import streamlit as st

from core import clinical, ui
from core.imaging import ACCEPTED_TEXT, MAX_FILE_BYTES, accepted_extensions
from core.preview import DISPLAY_CONTRASTS, display_contrast

ui.use_app_navigation()

st.title("Clinical Predictions")
ui.disclaimer()
run = ui.require_run()
predictor = ui.predictor_or_stop(run)
classes = list(predictor.classes)

st.caption(f"Model run **{run.name}** ({predictor.arch}, {predictor.preprocess.img_size} px). "
           f"Decision rule: {predictor.decision_rule}.")

files = st.file_uploader(
    "Upload chest X-rays", type=accepted_extensions(), accept_multiple_files=True,
    help=f"{ACCEPTED_TEXT}, up to {MAX_FILE_BYTES // 2**20} MB each. Files are processed in "
         "memory and never stored; DICOM patient fields are neither shown nor kept.")
if not files:
    st.info("Upload one or more frontal chest X-rays to see the model's prediction, its "
            "heatmap and its warning flags.")
    st.stop()

contrast = st.radio("Display contrast", DISPLAY_CONTRASTS, horizontal=True,
                    help="Changes only how the images are shown, never what the model sees.")

with st.spinner("Analysing…"):
    results = ui.analyse_uploads(predictor, run, files)
    ui.audit_results(predictor, run, files, results)  # recorded before they are shown

seen: dict[str, int] = {}  # widget keys: file name and content, numbered if uploaded twice
for name, result in results:
    if not isinstance(result, clinical.Analysis):
        st.error(f"{name}: {result}")
        continue
    p = result.prediction
    wid = f"{name}-{result.key}"
    seen[wid] = seen.get(wid, 0) + 1
    wid = f"{wid}-{seen[wid]}"
    with st.container(border=True):
        st.subheader(name)
        left, right = st.columns([3, 2], gap="large")
        with right:
            st.markdown(f"#### Predicted class: {p.label}")
            if p.decision != p.label:
                st.markdown(f"**Decision at the operating point: {p.decision}** (the screening "
                            "threshold changes the most probable class)")
            else:
                st.markdown(f"Decision at the operating point: **{p.decision}**")
            st.plotly_chart(ui.probability_chart(p.probabilities, classes,
                                                 predictor.operating_point),
                            key=f"proba-{wid}", config={"displayModeBar": False})
            st.metric("Lung focus", clinical.lung_focus_text(result.lung_focus),
                      help="Heatmap energy on the lungs over the lungs' share of the image: "
                           "1 = no preference, above 1 = on the lungs, below 1 = outside.")
            for level, text in clinical.flag_messages(result):
                (st.warning if level == "warning" else st.info)(text)
            if not p.ood and not p.low_confidence:
                st.success("Confident, and the image looks like the training X-rays.")
            if result.header:
                st.markdown("**DICOM**: " + " · ".join(f"{k}: {v}"
                                                       for k, v in result.header.items()))
            st.caption(f"Analysed in {result.seconds:.2f} s · {p.network} network")
            if result.notes:
                with st.expander("Notes"):
                    st.markdown("\n".join(f"- {n}" for n in result.notes))
        with left:
            alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key=f"alpha-{wid}")
            contour = st.checkbox("Show lung contour", key=f"contour-{wid}",
                                  disabled=result.lung_mask is None,
                                  help="The lung field found by the segmenter (green).")
            a, b = st.columns(2)
            a.image(display_contrast(result.gray, contrast), caption="Original",
                    width="stretch")
            b.image(clinical.overlay_image(result, alpha, contour, contrast),
                    caption="Grad-CAM overlay", width="stretch")

st.subheader("All results")
table = clinical.results_table(results, classes)
st.dataframe(table, hide_index=True, width="stretch", column_config=ui.results_columns(classes))
st.download_button("Download results (CSV)", clinical.results_csv(table),
                   file_name=clinical.CSV_NAME, mime="text/csv", on_click="ignore")
