"""Data Explorer: the run's dataset (class counts per split, duplicates, sample images, one
image through the preprocessing contract, intensity histograms, image sizes and sources per
class), from dataset.json and manifest.csv; the images from the run's data folder."""

import streamlit as st

from core import explore, preview, ui

ui.use_app_navigation()

st.title("Data Explorer")
ui.disclaimer()
run = ui.require_run()
classes = run.classes
dataset = ui.dataset_record(run) or {}

counts = explore.class_counts(dataset, classes)
if counts.empty:
    st.info(f"Run **{run.name}** records no dataset (neither `dataset.json` nor "
            "`manifest.csv`): both are written by training, `python -m core.train`.")
    st.stop()

st.subheader("Images per split and class")
totals = counts.groupby("split", sort=False)["n"].sum()
for col, (split, n) in zip(st.columns(len(totals) + 1), [*totals.items(), ("all", totals.sum())],
                           strict=True):
    col.metric(f"{split.capitalize()} images", f"{n:,}")
st.plotly_chart(ui.class_bars(counts, "split", "n", classes, "Images per split and class",
                             labels=("Split", "Images")), key="counts")
if not run.dataset:
    st.caption("Counted from `manifest.csv` (this run has no `dataset.json`).")

st.subheader("Duplicates")
dup = dataset.get("duplicates")
if dup is None:
    st.info("No duplicate record for this run.")
else:
    d1, d2, d3 = st.columns(3)
    d1.metric("Duplicate groups", dup["groups"])
    d2.metric("Images in those groups", dup["images_in_groups"])
    d3.metric("Largest group", dup["largest_group"])
    st.caption("Byte-identical and near-identical images (perceptual hash) form a group; a "
               "group always stays in one split, so no test image has a copy in training.")
    if dup.get("examples"):
        with st.expander("Example groups"):
            for group in dup["examples"]:
                st.markdown(" · ".join(f"`{p}`" for p in group))
skipped = dataset.get("skipped") or []
if skipped:
    with st.expander(f"{len(skipped)} files skipped at training"):
        st.dataframe(skipped, hide_index=True, width="stretch")

data_dir = explore.data_dir_of(run)
manifest = explore.manifest_frame(run.path)
have_images = manifest is not None and explore.images_available(data_dir,
                                                                manifest["path"].tolist())
samples = explore.sample_paths(manifest, per_class=40) if have_images else {}

st.subheader("Sample images per class")
if not have_images:
    ui.missing_images(run, data_dir)
else:
    for cls, paths in samples.items():
        st.markdown(f"**{cls.replace('_', ' ')}**")
        ui.image_grid(data_dir, paths[:6], [p.rsplit("/", 1)[-1] for p in paths[:6]])

    st.subheader("One image through the preprocessing contract")
    choices = [p for paths in samples.values() for p in paths[:6]]
    chosen = st.selectbox("Image", choices)
    cfg = preview.preprocess_config(run)
    steps = ui.preprocessing_steps(str(data_dir / chosen), cfg)
    for col, step in zip(st.columns(len(steps)), steps, strict=True):
        col.image(step.image, caption=f"{step.name}: {step.caption}", width="stretch")

    st.subheader("Intensity histograms per class")
    hist = ui.intensity_histograms(str(data_dir), samples)
    st.plotly_chart(ui.class_lines(hist, "intensity", "share", classes,
                                   "Pixel intensities (up to 40 images per class)",
                                   ("Intensity (0 = black, 1 = white)", "Share of pixels")),
                    key="hist")
    st.caption("Grayscale as the preprocessing contract reads it, before resizing and CLAHE. "
               "Classes that differ in exposure or borders can be told apart without any "
               "disease: a shortcut the model may learn.")

st.subheader("Image sizes")
sizes = ui.image_sizes(str(data_dir) if have_images else None, samples or None,
                       dataset or None)
if sizes.empty:
    st.info("No image sizes recorded: this run has no `dataset.json` and its images are not "
            "on this machine.")
else:
    top = sizes.head(20)
    title = ("Image sizes per class (sampled images)" if have_images
             else "Image sizes, all images of all classes")
    st.plotly_chart(ui.class_bars(top, "size", "n", classes, title, barmode="stack",
                                  labels=("Width x height (px)", "Images"), horizontal=True,
                                  height=140 + 28 * top["size"].nunique()), key="sizes")
if dataset.get("bit_depths"):
    st.caption("Bit depths: " + ", ".join(f"{n:,} images at {b}-bit"
                                          for b, n in dataset["bit_depths"].items()))

st.subheader("Image sources per class")
src = explore.sources(dataset)
if src["available"]:
    per_source = explore.sources_frame(src["per_class"])
    st.plotly_chart(ui.class_bars(per_source, "source", "n", classes, "Images per source",
                                  labels=("Source", "Images"), barmode="stack", horizontal=True,
                                  height=140 + 28 * per_source["source"].nunique()),
                    key="sources")
    if src["confounded"]:
        st.warning("Every source contributes to a single class: source and class are "
                   "confounded, so a model can separate the classes by hospital alone.")
else:
    st.info(f"Sources unknown: {src['reason'] or 'no metadata'}.")
st.warning("Confounding: in the COVID-19 Radiography Database each class comes from different "
           "hospitals and patient groups (the viral pneumonia images are pediatric). A model "
           "can learn the source instead of the disease; Model Performance measures this "
           "(occlusion probe, external validation).")
