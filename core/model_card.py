"""A run's model card as Markdown, built from the files beside its checkpoint (no Streamlit,
no torch). The Executive Summary page shows its sections and offers it as a download.

Sections: intended use and out-of-scope uses, training data, evaluation data, operating point
and why, calibration, known failure modes, explanation method and its limits. Figures are the
report's (``report/metrics.json``); a section says what is missing rather than inventing.
"""

from __future__ import annotations

from typing import Any

from core import overview
from core.runs import RunArtifacts

DISCLAIMER = ("Research and education only. Not a medical device; not for diagnosis or "
              "treatment decisions.")


def _pct(item: Any) -> str:
    value = item.get("value") if isinstance(item, dict) else item
    if value is None:
        return "undefined"
    ci = item.get("ci95") if isinstance(item, dict) else None
    text = f"{100 * value:.1f}%"
    return f"{text} (95% CI {100 * ci[0]:.1f}%–{100 * ci[1]:.1f}%)" if ci else text


def _num(item: Any) -> str:
    value = item.get("value") if isinstance(item, dict) else item
    if value is None:
        return "undefined"
    ci = item.get("ci95") if isinstance(item, dict) else None
    return f"{value:.3f} (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else f"{value:.3f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{c} {n:,}" for c, n in counts.items()) + f" (total {sum(counts.values()):,})"


def intended_use(run: RunArtifacts) -> str:
    classes = ", ".join(run.classes) or "the run's classes"
    return (f"Classifies a frontal (PA/AP) chest X-ray into {classes}, with a Grad-CAM map of "
            "where the network looked, for **research and teaching**: studying how such a "
            "classifier behaves, where it fails and how shortcut learning shows.\n\n"
            "**Out of scope:** diagnosis, triage, screening or any decision about a patient; "
            "lateral views, CT, children unless the training data covered them, images from "
            "scanners or hospitals unlike the training data (the OOD flag is a heuristic, not a "
            "guarantee); classes it was not trained on (an image of another disease still gets "
            "one of the classes above).")


def training_data(run: RunArtifacts) -> str:
    ds = run.dataset or {}
    folder = (run.demo or {}).get("data_dir") or overview.run_data_dir(run)  # as shipped
    lines = [f"- Dataset folder: `{folder or 'unknown'}`"]
    counts = ds.get("counts") or {}
    for split in ("train", "val", "test"):
        if counts.get(split):
            lines.append(f"- {split}: {_counts(counts[split])}")
    if not counts:
        fix = next((m.partition(": ")[2] for m in run.missing if "dataset.json" in m),
                   f"python -m core.runs dataset {run.path} --data-dir <dataset>")
        lines.append(f"- Class counts per split: not recorded (no `dataset.json`: `{fix}`).")
    dup = ds.get("duplicates") or {}
    if dup:
        lines.append(f"- Duplicate groups kept within one split: {dup.get('groups', 0)} "
                     f"({dup.get('images_in_groups', 0)} images)")
    src = ds.get("sources") or {}
    if src and not src.get("available", True):
        lines.append(f"- Image sources: unknown ({src.get('reason') or 'no metadata'})")
    lines.append(f"- Architecture: {run.arch or 'unknown'}; input {run.img_size or '?'} px; "
                 f"lung view `{run.lung_view}`; {run.epochs} epochs recorded")
    return "\n".join(lines)


def evaluation_data(run: RunArtifacts) -> str:
    report = run.report or {}
    if not report:
        return f"No evaluation report yet: `python -m core.evaluate --checkpoint {run.checkpoint}`."
    meta = report.get("run") or {}
    counts = report.get("class_counts") or {}
    lines = [f"- Split `{meta.get('split', 'test')}` of `{meta.get('data_dir', 'unknown')}`: "
             f"{_counts(counts) if counts else report.get('n', '?')} images, never seen in "
             "training or calibration.",
             f"- Accuracy {_pct((report.get('overall') or {}).get('accuracy'))}, macro F1 "
             f"{_num((report.get('overall') or {}).get('macro_f1'))}, macro ROC-AUC "
             f"{_num((report.get('overall') or {}).get('macro_roc_auc'))}.",
             "- Intervals: stratified bootstrap, "
             f"{((report.get('settings') or {}).get('bootstrap') or {}).get('resamples', '?')} "
             "resamples."]
    ext = report.get("external")
    if ext:
        auc = (ext.get("drop") or {}).get("macro_roc_auc") or {}
        lines.append(f"- External validation on `{ext.get('data_dir')}` ({ext.get('n')} images): "
                     f"macro ROC-AUC {auc.get('external', float('nan')):.3f}, a drop of "
                     f"{auc.get('drop', float('nan')):+.3f} against internal.")
    else:
        lines.append("- No external validation: all figures come from the same database as "
                     "training (`python -m core.evaluate --external-dir DIR` adds it).")
    return "\n".join(lines)


def operating_point(run: RunArtifacts) -> str:
    op = run.operating_point
    report = run.report or {}
    if not op:
        return ("No operating point: predictions use the most probable class. Fit one with "
                f"`python -m core.evaluate --checkpoint {run.checkpoint} --calibrate "
                "--screening-class COVID --target-sensitivity 0.95`.")
    cls = op.get("class")
    per = (((report.get("at_operating_point") or {}).get("per_class") or {}).get(cls) or {})
    text = (f"**{cls}** is called when its calibrated probability is at least "
            f"**{op.get('threshold', float('nan')):.4f}**, otherwise the most probable other "
            f"class. The threshold is the highest one reaching a sensitivity of "
            f"{100 * op.get('target_sensitivity', 0):.0f}% on the validation split "
            f"(achieved {100 * (op.get('achieved_val_sensitivity') or 0):.1f}%).\n\n"
            f"**Why:** for a screening aid a missed {cls} case costs more than a false alarm, so "
            "sensitivity is fixed first and PPV is what it costs.")
    if per:
        text += (f"\n\nOn the test split: sensitivity {_pct(per.get('sensitivity'))}, "
                 f"specificity {_pct(per.get('specificity'))}, PPV {_pct(per.get('ppv'))}, "
                 f"NPV {_pct(per.get('npv'))} (PPV and NPV at this test set's prevalence).")
    return text


def calibration(run: RunArtifacts) -> str:
    cal = (run.report or {}).get("calibration") or {}
    if not cal:
        return "Not measured (no evaluation report)."
    before = (cal.get("before") or {}).get("ece")
    after = (cal.get("after") or {}).get("ece")
    fitted = "fitted on the validation split" if cal.get("fitted") else "not fitted (T = 1)"
    return (f"Temperature scaling, T = {cal.get('temperature', 1.0):.3g} ({fitted}). "
            f"Expected calibration error (15 bins) {_num(before)} before, {_num(after)} after. "
            "Calibration is only as good as its validation split: probabilities from another "
            "hospital's images are not calibrated.")


def failure_modes(run: RunArtifacts) -> str:
    report = run.report or {}
    lines = [f"- [{f.get('severity', 'info')}] {f.get('text', '')}"
             for f in overview.sorted_findings(run)]
    sc = overview.shortcut_summary(report)
    if sc and sc.get("verdict") and not any(sc["verdict"] in line for line in lines):
        lines.append(f"- Shortcut probe ({sc.get('risk')}): {sc['verdict']}")
    lines.append("- The database's classes come from different hospitals and age groups (the "
                 "viral pneumonia images are paediatric): a model can learn the source, not the "
                 "disease.")
    lines.append("- Classes outside the training set, poor positioning, devices and very "
                 "low-quality images give confident but meaningless outputs.")
    return "\n".join(lines)


def explanation(run: RunArtifacts) -> str:
    focus = (((run.report or {}).get("lung_focus") or {}).get("overall") or {})
    text = ("Grad-CAM of the predicted class at the last convolutional block (`layer4`), "
            "upsampled to the image; the lung-focus ratio is the share of its energy on the lungs "
            "divided by the lungs' share of the image (1 = no preference).")
    if focus.get("mean") is not None:
        text += (f" On the test split the mean ratio is {focus['mean']:.2f} over "
                 f"{focus.get('n', '?')} images.")
    text += ("\n\n**Limits:** the map is coarse (one cell per 32 input pixels), shows *where* "
             "evidence was weighed, not *what* was seen, and can look plausible for a model that "
             "reads shortcuts. It is not a lesion segmentation.")
    return text


# ---------------------------------------------------------------- the shipped demo

DATA_TERMS = (
    "The images come from the **COVID-19 Radiography Database** (Kaggle, "
    "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database). The database "
    "states no licence; its authors ask users to cite:\n\n"
    "- M.E.H. Chowdhury, T. Rahman, A. Khandakar, et al., \"Can AI help in screening Viral and "
    "COVID-19 pneumonia?\" IEEE Access, vol. 8, pp. 132665-132676, 2020.\n"
    "- T. Rahman, A. Khandakar, Y. Qiblawey, et al., \"Exploring the Effect of Image "
    "Enhancement Techniques on COVID-19 Detection using Chest X-ray Images\", "
    "arXiv:2012.02238, 2020.\n\n"
    "and say that researchers can use it to produce scholarly work. **Research use only**; "
    "not for clinical decisions. No image ships with this repository: the demo's split "
    "(`manifest.csv`) names the files by path.")
DATABASE_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def demo_data(run: RunArtifacts) -> str:
    counts = (run.dataset or {}).get("counts") or {}
    absent = [c.replace("_", " ") for c in DATABASE_CLASSES if c not in run.classes]
    lines = [f"{len(run.classes)} of the database's four classes ({', '.join(run.classes)})"
             + (f"; no {', '.join(absent)} images" if absent else "") + ". Images per split: "
             + "; ".join(f"{s} {sum((counts.get(s) or {}).values()):,}"
                         for s in ("train", "val", "test") if counts.get(s)) + ".",
             "", DATA_TERMS]
    return "\n".join(lines)


def demo_recipe(run: RunArtifacts) -> str:
    cfg = run.config or {}
    tr, pre, aug = cfg.get("train") or {}, cfg.get("preprocess") or {}, cfg.get("augment") or {}
    demo = run.demo or {}
    lines = []
    if demo.get("recipe"):
        lines.append(f"- Recipe: `{demo['recipe']}`")
    lines += [
        f"- Network: {tr.get('arch', run.arch)}, initial weights `{tr.get('weights', '?')}`, mode "
        f"`{tr.get('mode', '?')}`, {tr.get('epochs', '?')} epochs (best epoch {run.epoch or '?'} "
        f"of {run.epochs} run), batch {tr.get('batch_size', '?')}, {tr.get('optimizer', '?')} "
        f"lr {tr.get('lr', '?')} ({tr.get('scheduler', '?')}), seed {tr.get('seed', '?')}",
        f"- Input: {pre.get('img_size', '?')} px, {pre.get('resize_mode', '?')}, CLAHE "
        f"{'on' if pre.get('clahe') else 'off'}, lung view `{pre.get('lung_view', 'none')}`",
        "- Augmentation: " + (", ".join(f"{k} {v}" for k, v in sorted(aug.items())
                                        if v not in (0, 0.0, False, None)) or "none"),
        "- The whole configuration is `config.json` beside the weights.",
    ]
    return "\n".join(lines)


def demo_weights(run: RunArtifacts) -> str:
    demo = run.demo or {}
    lines = [f"- `best.pt`: a project checkpoint read with `torch.load(weights_only=True)` (no "
             f"code is unpickled); weights stored as `{demo.get('weight_format', '?')}`: conv and "
             "linear weights int8, symmetric, one fp32 scale per output channel; biases and "
             "BatchNorm fp32. `core.model.load_checkpoint` dequantises them at load."]
    if demo.get("max_weight_error_steps") is not None:
        lines.append(f"- Largest dequantisation error: {demo['max_weight_error_steps']:.3f} of "
                     "an int8 step (at most 0.5 by construction: rounding to nearest).")
    if demo.get("fp32_agreement") is not None:
        agree = demo["fp32_agreement"]
        lines.append(f"- Against the fp32 weights it came from: the same predicted class on "
                     f"{agree['same']} of {agree['n']} test images.")
    lines.append("- Calibration, OOD statistics and the test report were computed on these "
                 "dequantised weights, not on the fp32 ones: every file beside them matches "
                 "them (each sidecar records the SHA-256 of `best.pt`).")
    lines.append("- Serving: the predictor exports the network to ONNX once, on first load, "
                 "(with its lung segmenter, for a lung view) into the user's CXR Insight "
                 "folder (`~/.local/share/cxr-insight/cache/demo-<hash>/` on Linux, "
                 "`CXR_DATA_HOME` moves it), never into the repository.")
    if run.checkpoint.is_file():
        params = f" for {demo['parameters'] / 1e6:.1f} M parameters" if demo.get("parameters") else ""
        lines.append(f"- `best.pt` is {run.checkpoint.stat().st_size / 1e6:.1f} MB{params}.")
    return "\n".join(lines)


def demo_figures(run: RunArtifacts) -> str:
    report = run.report or {}
    overall = report.get("overall") or {}
    lines = [f"Test split, {report.get('n', '?')} images, most probable class; 95% CIs from a "
             "stratified bootstrap.", "",
             f"- Accuracy {_pct(overall.get('accuracy'))}; macro F1 "
             f"{_num(overall.get('macro_f1'))}; macro ROC-AUC {_num(overall.get('macro_roc_auc'))}",
             "", "| class | sensitivity | specificity | PPV | ROC-AUC |", "|---|---|---|---|---|"]
    per = (report.get("at_argmax") or {}).get("per_class") or {}
    for cls in run.classes:
        m = per.get(cls) or {}
        auc = (((report.get("threshold_free") or {}).get("per_class") or {}).get(cls)
               or {}).get("roc_auc")
        lines.append(f"| {cls} | {_pct(m.get('sensitivity'))} | {_pct(m.get('specificity'))} | "
                     f"{_pct(m.get('ppv'))} | {_num(auc) if auc is not None else '–'} |")
    sc = overview.shortcut_summary(report)
    lines.append("")
    if sc:
        lines.append(f"**Shortcut probe** (the lungs blanked out): risk **{sc.get('risk')}**; "
                     f"full image {_pct(sc.get('full'))}, periphery only "
                     f"{_pct(sc.get('periphery'))}, centre only {_pct(sc.get('centre'))}, chance "
                     f"{_pct(sc.get('chance_accuracy'))}. {sc.get('verdict') or ''}")
    else:
        lines.append("**Shortcut probe**: not run.")
    focus = ((report.get("lung_focus") or {}).get("overall") or {})
    if focus.get("mean") is not None:
        lines.append(f"\n**Lung focus** (Grad-CAM energy on the lungs over their share of the "
                     f"image, 1 = no preference): mean {focus['mean']:.2f} over "
                     f"{focus.get('n', '?')} test images.")
    return "\n".join(lines)


def demo_limits(run: RunArtifacts) -> str:
    counts = (run.dataset or {}).get("counts") or {}
    sizes = "/".join(f"{sum((counts.get(s) or {}).values()):,}" for s in ("train", "val", "test")
                     if counts.get(s))
    absent = [c.replace("_", " ") for c in DATABASE_CLASSES if c not in run.classes]
    lines = [f"- {len(run.classes)} classes only"
             + (f": no {', '.join(absent)}; an image of it still gets one of the others."
                if absent else "."),
             "- The Viral Pneumonia images are paediatric, the Normal ones adult (RSNA), COVID "
             "from several hospitals and publications: class and source are confounded, and "
             "the figures above reward a model that reads the source.",
             f"- A small set ({sizes} train/validation/test images), one database's hospital "
             "mix, no external validation: wide intervals, and figures that will not hold "
             "elsewhere.",
             "- Trained and evaluated at low resolution on a CPU: a demonstration of the tool, "
             "not a model to rely on.",
             "- **Not a medical device.** Research and education only."]
    return "\n".join(lines)


DEMO_SECTIONS = (("Demo model: data, source and terms", demo_data),
                 ("Demo model: recipe", demo_recipe),
                 ("Demo model: test figures, shortcut probe, lung focus", demo_figures),
                 ("Demo model: shipped weights", demo_weights),
                 ("Demo model: known limits", demo_limits))


SECTIONS = (("Intended use and out-of-scope uses", intended_use),
            ("Training data", training_data),
            ("Evaluation data", evaluation_data),
            ("Operating point and why", operating_point),
            ("Calibration", calibration),
            ("Known failure modes", failure_modes),
            ("Explanation method and its limits", explanation))


def sections(run: RunArtifacts) -> list[tuple[str, str]]:
    """``(title, Markdown body)`` for each section, in order; the shipped demo's own sections
    (data terms, recipe, figures, weights, limits) first for the demo."""
    chosen = (*DEMO_SECTIONS, *SECTIONS) if run.is_demo else SECTIONS
    return [(title, build(run)) for title, build in chosen]


def markdown(run: RunArtifacts) -> str:
    """The whole model card as one Markdown document."""
    op = run.operating_point or {}
    head = [f"# Model card: {run.name}", "", f"> {DISCLAIMER}", "",
            f"- Classes: {', '.join(run.classes)}",
            f"- Architecture: {run.arch or 'unknown'}, input {run.img_size or '?'} px, "
            f"lung view `{run.lung_view}`",
            f"- Created: {overview.created(run)}"
            + (f", weights sha256 `{run.weights_sha256[:16]}…`" if run.weights_sha256 else ""),
            f"- Serving: {run.serving.get('text', 'unknown')}",
            f"- Operating point: {op.get('class')} at threshold {op['threshold']:.4f}"
            if op.get("threshold") is not None else "- Operating point: none (argmax)"]
    body = [f"## {title}\n\n{text}" for title, text in sections(run)]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n"
