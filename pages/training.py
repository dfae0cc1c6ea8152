"""Training: train a model on your own dataset folder from the app.

A thin view over ``core.jobs``: the folder is checked live before anything starts, the Train
button starts ``python -m core.train`` in the background (one job at a time, for every tab
and every visitor), and the job panel follows it from the files the run writes, so a
refresh, a second tab or a restarted app shows the same job. Deployment settings:
``CXR_ALLOW_TRAINING=0`` turns this page off, ``CXR_DATA_ROOT`` confines dataset paths.
"""

import streamlit as st

from core import jobs, ui
from core.config import ARCHS, DEFAULT_DATA_DIR, LUNG_VIEWS, MODES
from core.errors import DatasetError, JobError, JobRunningError

ui.use_app_navigation()

st.title("Train a model")
ui.disclaimer()
st.caption("Train a classifier on your own folder of chest X-rays (one sub-folder per class, "
           "or the COVID-19 Radiography Database layout `<Class>/images/*.png`). It runs in the "
           "background: you can leave this page, refresh it or open it in another tab. When "
           "it ends, it is evaluated and becomes the newest run in the sidebar of every page.")

if not jobs.training_allowed():
    st.info("In-app training is turned off on this deployment (`CXR_ALLOW_TRAINING=0`). Train "
            "from the command line with `python -m core.train --help`; runs written under "
            "`models/` appear in the sidebar.")
    st.stop()

WEIGHTS = ("none", "imagenet")
MODE_HELP = ("head: the pretrained backbone stays frozen and its features are computed once "
             "(fast on a CPU); finetune: all layers learn (a GPU is advised); staged: head "
             "first, then all layers.")


def show_progress(status: jobs.JobStatus) -> None:
    """A training job's progress and its last epoch's metrics."""
    p, last = status.progress or {}, status.latest
    st.progress(status.fraction, text=status.phase)
    cols = st.columns(5)
    cols[0].metric("Epoch", f"{p['epoch']} / {p['epochs']}" if p else "—")
    cols[1].metric("Step", f"{p['step']} / {p['steps_per_epoch']}" if p else "—")
    cols[2].metric("Images per second", f"{p['images_per_s']:,.1f}"
                   if p.get("images_per_s") else "—",
                   help="Head epochs run over cached backbone features, so they are fast; "
                   "the features were computed first, in the preparing phase.")
    cols[3].metric("Time left (training)", jobs.fmt_duration(p.get("eta_s"))
                   if status.running else "—",
                   help="Estimated from the steps so far; evaluation follows training.")
    cols[4].metric("Train loss", f"{last['train_loss']:.4f}" if last else "—",
                   help="Of the last finished epoch.")
    if last:
        a, b, c = st.columns(3)
        a.metric("Validation loss", f"{last['val_loss']:.4f}")
        b.metric("Validation accuracy", f"{last['val_acc']:.1%}")
        c.metric("Validation macro F1", f"{last['val_macro_f1']:.3f}")
        st.dataframe(status.history, hide_index=True, width="stretch",
                     column_order=("epoch", "phase", "train_loss", "train_acc", "val_loss",
                                   "val_acc", "val_macro_f1", "images_per_s", "seconds"))


def show_job(status: jobs.JobStatus) -> None:
    """The job's state, progress, outcome and its controls."""
    job = status.job
    download = job.get("kind") == "download"
    if download:
        st.subheader("Job: download of the COVID-19 Radiography Database")
        st.progress(1.0 if status.status == "finished" else 0.0, text=status.phase)
    else:
        st.subheader(f"Job: run {job['run_name']}")
        show_progress(status)
    if status.status == "finished" and download:
        st.success("The database is downloaded and checked: enter its folder below, "
                   f"`{jobs.display_path(job['dest'])}`.")
    elif status.status == "finished":
        st.success(f"Run **{job['run_name']}** is trained and evaluated: it is now the newest "
                   "run, selected in the sidebar. See it on Model Performance.")
    elif status.status == "failed":
        st.error(f"{'Download' if download else 'Training'} failed: {status.cause}")
    elif status.status == "cancelled":
        st.info("Download cancelled." if download else
                "Training was cancelled. Resume continues from the last finished epoch.")
    elif status.status == "lost":
        st.warning(status.cause)
    with st.expander("Log (last lines)", expanded=status.status == "failed"):
        st.code("\n".join(status.log) or "(empty)", language="text")
    if status.running:
        if st.button(f"Cancel {'download' if download else 'training'}",
                     disabled=bool(job["cancel_requested"])):
            try:
                jobs.cancel()
            except JobError as err:
                st.error(str(err))
            st.rerun()
    elif status.resumable and st.button("Resume training", type="primary"):
        try:
            jobs.resume()
        except JobError as err:
            st.error(str(err))
        else:
            st.rerun()


status = jobs.status()
if status is not None and status.status == "finished":
    if status.job["run_name"] not in ui.run_names():
        ui.available_runs.clear()  # the new run appears in the sidebar at once
    if st.session_state.pop("training_seen_running", None) == status.job["run_name"]:
        st.session_state["run"] = status.job["run_name"]  # and is this session's active run


@st.fragment(run_every=2 if status is not None and status.running else None)
def job_panel() -> None:
    current = jobs.status()
    if current is None:
        return
    if current.running:
        st.session_state["training_seen_running"] = current.job["run_name"]
    elif status is not None and status.running:
        st.rerun()  # it just ended: redraw the whole page (new run, Resume button)
    show_job(current)


job_panel()

# -- a new job: the dataset first, checked live, then the settings
st.subheader("New training run")
root = jobs.data_root()

folder = st.text_input(
    "Dataset folder", value="" if root else DEFAULT_DATA_DIR, key="train_data_dir",
    placeholder="a folder inside this deployment's data folder" if root else "/path/to/dataset",
    help="Relative to this deployment's data folder." if root else
    "A folder with one sub-folder per class. Get the COVID-19 Radiography Database with "
    "`python -m core.data download`.")
with st.expander("No dataset yet? Download the COVID-19 Radiography Database"):
    st.markdown("About 800 MB from Kaggle, into "
                f"`{jobs.display_path(str(jobs.download_dest()))}`. Kaggle may ask for an account "
                "and consent to the dataset's terms: the job then says what to do (a Kaggle "
                "API token in `KAGGLE_USERNAME`/`KAGGLE_KEY` or `~/.kaggle/kaggle.json`). "
                "Same as `python -m core.data download`.")
    if st.button("Download the database"):
        try:
            jobs.start_download()
        except JobError as err:
            st.error(str(err))
        else:
            st.rerun()
check = jobs.check_dataset(folder) if folder.strip() else None
if check is not None:
    for problem in check.problems:
        st.error(problem)
    for warning in check.warnings:
        st.warning(warning)
    if check.counts:
        st.markdown(f"**{len(check.counts)} classes, {sum(check.counts.values()):,} images** "
                    f"({check.layout} layout; {check.checked:,} files' headers checked)")
        st.dataframe([{"class": c, "images": n} for c, n in check.counts.items()],
                     hide_index=True)

recipe = jobs.TrainSettings(data_dir="", run_name="")  # the recommended recipe's settings
st.caption(f"Defaults: the `{recipe.preset}` recipe (from scratch on a CPU, no download, "
           "soft lung view, stronger augmentation, a moving average of the weights; "
           "docs/ARCHITECTURE.md).")
left, mid, right, last_col = st.columns(4)
mode = left.selectbox("Mode", MODES, index=MODES.index(recipe.mode), key="train_mode",
                      help=MODE_HELP)
epochs = mid.number_input("Epochs", 1, 500, recipe.epochs, key="train_epochs")
img_size = right.number_input("Image size (pixels)", 32, 1024, recipe.img_size, step=32,
                              key="train_img_size",
                              help="Images are letterboxed to this square size.")
lung_view = last_col.selectbox("Lung view", LUNG_VIEWS, index=LUNG_VIEWS.index(recipe.lung_view),
                               key="train_lung_view",
                               help="crop: crop to the lung field; mask: also blank outside "
                               "it; soft: blur and dim outside it.")
if jobs.run_exists(st.session_state.get("train_run_name", "")):
    st.session_state.pop("train_run_name")  # that name is taken now: offer a fresh one
with st.expander("Advanced"):
    a, b, c = st.columns(3)
    arch = a.selectbox("Network", ARCHS, index=ARCHS.index(recipe.arch), key="train_arch")
    weights = b.selectbox("Starting weights", WEIGHTS, index=WEIGHTS.index(recipe.weights),
                          key="train_weights",
                          help="imagenet: downloaded once (needs internet the first time); "
                          "none: random start (many more epochs).")
    batch = c.number_input("Batch size", 1, 1024, 32, key="train_batch")
    max_per_class = a.number_input("Images per class (0 = all)", 0, 10**6, 0,
                                   key="train_max_per_class",
                                   help="A seeded subset, for a quick first run.")
    run_name = b.text_input("Run name", value=jobs.default_run_name(), key="train_run_name",
                            help="The run's folder under models/.")

if st.button("Train", type="primary", disabled=check is None or not check.ok):
    settings = jobs.TrainSettings(
        data_dir=folder, run_name=run_name.strip(), mode=mode, epochs=int(epochs),
        img_size=int(img_size), lung_view=lung_view, arch=arch, weights=weights,
        batch_size=int(batch), max_per_class=int(max_per_class))
    try:
        jobs.start(settings)
    except JobRunningError as err:
        st.error(str(err))
    except (JobError, DatasetError) as err:
        st.error(f"Training did not start: {err}")
    else:
        st.session_state.pop("train_run_name", None)  # the next run gets a fresh name
        st.rerun()
