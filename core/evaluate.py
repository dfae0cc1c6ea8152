"""Evaluation of a trained run: the entry point (``evaluate``, training's finish, the CLI).

``python -m core.evaluate --checkpoint models/<run>/best.pt --data-dir D --split test``
writes ``metrics.json`` (schema ``core/schemas/metrics.schema.json``, documented in
``docs/METRICS.md``) and ``predictions.csv`` into ``models/<run>/report/``. The dashboard
reads that report; it never recomputes metrics.

Flow (one module per step)

1. Calibration (validation split only, :mod:`core.calibration`): temperature and operating
   point, written beside the checkpoint (``best.calibration.json``, :mod:`core.sidecars`).
   Training does this at its end (:func:`finalize_run`); ``--calibrate`` redoes it, and the
   OOD cut-offs after it, for an older or retrained run.
2. Predictions (:mod:`core.scoring`): the run's model over a split of its manifest
   (:func:`core.data.run_split_rows`, which checks the manifest against the checkpoint) and
   over an optional external folder (mapped here), with the occlusion probe and lung focus.
3. The report (:mod:`core.report`): every metric with stratified-bootstrap 95% intervals, at
   argmax and at the operating point, calibration before/after temperature scaling, curve
   points, the shortcut verdict, findings; and, where the dataset has
   ``<Class>.metadata.xlsx``, the image sources per class (:mod:`core.metadata`).

Evaluation never writes a checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core import metrics as M
from core import ood
from core.calibration import (
    DEFAULT_SCREENING_CLASS,
    DEFAULT_TARGET_SENSITIVITY,
    recalibrate_checkpoint,
    stored_calibration,
)
from core.config import default_data_dir
from core.data import discover, run_split_rows
from core.errors import ConfigError, CXRError, DatasetError
from core.files import write_json
from core.metadata import source_report
from core.model import model_from_checkpoint, preprocess_config_of
from core.report import (
    build_document,
    drop_block,
    findings,
    lung_focus_block,
    score_predictions,
    validate_document,
    write_predictions_csv,
)
from core.scoring import loader_settings, predict_rows
from core.sidecars import load_run_checkpoint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- external validation


def parse_class_map(text: str | None) -> dict[str, str]:
    """``"old=new,old2=new2"`` -> dict; ``old=`` (empty) drops that external class."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"--class-map entry {part!r} is not old=new (e.g. "
                              "'covid=COVID,normal=Normal,Lung_Opacity=')")
        old, new = (s.strip() for s in part.split("=", 1))
        out[old] = new
    return out


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def map_external_classes(external: Sequence[str], model_classes: Sequence[str],
                         class_map: dict[str, str] | None = None) -> dict[str, str | None]:
    """External class -> model class (None: dropped), by ``class_map`` first, then by name."""
    class_map = class_map or {}
    by_name = {_norm(c): c for c in model_classes}
    out: dict[str, str | None] = {}
    unmapped = []
    for c in external:
        if c in class_map:
            target = class_map[c] or None
            if target is not None and target not in model_classes:
                raise ConfigError(f"--class-map maps {c!r} to {target!r}, which is not a model "
                                  f"class ({', '.join(model_classes)})")
            out[c] = target
        elif _norm(c) in by_name:
            out[c] = by_name[_norm(c)]
        else:
            unmapped.append(c)
    if unmapped:
        raise DatasetError(
            f"External classes {unmapped} match no model class ({', '.join(model_classes)}). "
            "Map them with --class-map old=new,... (old= drops a class).")
    for c in set(class_map) - set(external):
        log.warning("--class-map names %r, which is not a class folder of the external set", c)
    return out


def external_rows(external_dir: str | Path, model_classes: Sequence[str],
                  class_map: dict[str, str] | None) -> tuple[list[dict[str, str]], dict[str, str | None]]:
    """Rows (path relative to ``external_dir``, mapped class) of every external image."""
    ds = discover(external_dir)
    mapping = map_external_classes(ds.classes, model_classes, class_map)
    rows = []
    for p, c in ds.items:
        target = mapping[c]
        if target is not None:
            rows.append({"path": p, "class": target})
    if not rows:
        raise DatasetError(f"No external images left in {external_dir} after class mapping.")
    return rows, mapping


def _overlap_with_manifest(external_dir: Path, rows: list[dict[str, str]], run_dir: Path) -> int:
    """External images byte-identical to an image of the run's manifest (any split)."""
    path = run_dir / "manifest.csv"
    if not path.is_file():
        return 0
    with path.open(newline="") as fh:
        known = {r["sha1"] for r in csv.DictReader(fh)}
    return sum(hashlib.sha1((external_dir / r["path"]).read_bytes()).hexdigest() in known
               for r in rows)



def parse_prevalence(value: str | float | dict[str, float] | None,
                     classes: Sequence[str]) -> dict[str, float] | None:
    """``0.05`` (every class, one-vs-rest) or ``"COVID=0.05,Normal=0.8"`` -> class -> p."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        out = {str(k): float(v) for k, v in value.items()}
    elif isinstance(value, int | float) or re.fullmatch(r"\s*[0-9.eE+-]+\s*", str(value)):
        out = dict.fromkeys(classes, float(value))
    else:
        out = {}
        for part in str(value).split(","):
            if "=" not in part:
                raise ConfigError(f"--prevalence {value!r}: use a number or Class=p,Class=p")
            k, v = part.split("=", 1)
            out[k.strip()] = float(v)
    bad = [k for k in out if k not in classes]
    if bad:
        raise ConfigError(f"--prevalence names unknown class(es) {bad}; classes: {list(classes)}")
    if any(not 0.0 < p < 1.0 for p in out.values()):
        raise ConfigError("--prevalence values must lie strictly between 0 and 1")
    return out



def evaluate(
    checkpoint: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    output: str | Path | None = None,
    *,
    external_dir: str | Path | None = None,
    class_map: dict[str, str] | None = None,
    n_resamples: int = M.DEFAULT_RESAMPLES,
    seed: int = 0,
    prevalence: str | float | dict[str, float] | None = None,
    calibrate: bool = False,
    screening_class: str = DEFAULT_SCREENING_CLASS,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    occlusion: bool = True,
    lung_focus: bool = True,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    allow_manifest_change: bool = False,
) -> Path:
    """Write the report for ``split`` of the checkpoint's run; returns the metrics.json path.

    The run's calibration, operating point and OOD statistics come from its sidecars
    (:func:`core.sidecars.load_run_checkpoint`); ``best.pt`` is never written. Only
    ``calibrate=True`` refits them, from the validation split (and the training split for
    the OOD statistics): :func:`core.calibration.recalibrate_checkpoint` then
    :func:`core.ood.calibrate_run_ood`, whose low-confidence cut-off depends on the
    temperature. ``batch_size`` and ``workers`` default to the run's training settings; a
    manifest that is not the one the run was trained on stops it unless
    ``allow_manifest_change`` (:func:`core.data.run_split_rows`).
    """
    checkpoint = Path(checkpoint)
    data_dir = Path(data_dir or default_data_dir())
    out_dir = Path(output) if output else checkpoint.parent / "report"
    if n_resamples < 0:
        raise ConfigError("--bootstrap must be 0 (no intervals) or more")
    calibration_source = "checkpoint"
    if calibrate:
        recalibrate_checkpoint(checkpoint, data_dir, screening_class=screening_class,
                               target_sensitivity=target_sensitivity, device=device,
                               batch_size=batch_size, workers=workers, progress=progress,
                               allow_manifest_change=allow_manifest_change)
        ood.calibrate_run_ood(checkpoint.parent, data_dir, device=device, progress=progress,
                              allow_manifest_change=allow_manifest_change)
        calibration_source = "refit"
    ckpt = load_run_checkpoint(checkpoint)
    batch_size, workers = loader_settings(ckpt, batch_size, workers)
    if ckpt.get("temperature") is None:
        ckpt.pop("temperature", None)
        calibration_source = "none"
    prev = parse_prevalence(prevalence, ckpt["classes"])
    splits, notes = run_split_rows(checkpoint.parent, data_dir, ckpt, (split,),
                                   allow_manifest_change=allow_manifest_change)
    rows = splits[split]
    if split == "val" and "temperature" in ckpt:
        notes.append("These are validation figures: the temperature and operating point were "
                     "fitted on this split, so they are optimistic.")
    model = model_from_checkpoint(ckpt)
    pcfg = preprocess_config_of(ckpt)
    has_ood = ckpt.get("ood") is not None  # per-image OOD scores need the stage features
    preds = predict_rows(model, data_dir, rows, ckpt["classes"], pcfg, device=device,
                         batch_size=batch_size, workers=workers, occlusion=occlusion,
                         lung_focus=lung_focus, features=has_ood, progress=progress, desc=split)
    log.info("Scoring %d %s predictions (%d bootstrap resamples)", len(rows), split, n_resamples)
    doc = build_document(ckpt, checkpoint, preds, data_dir=data_dir, split=split,
                         n_resamples=n_resamples, seed=seed, prevalence=prev,
                         calibration_source=calibration_source, notes=notes)
    doc["sources"] = source_report(data_dir, ckpt["classes"], preds)
    doc["lung_focus"] = lung_focus_block(preds, pcfg.lung_view)
    temperature, op = stored_calibration(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    ext_preds = None
    doc["external"] = None
    if external_dir is not None:
        ext_dir = Path(external_dir)
        ext_rows, mapping = external_rows(ext_dir, ckpt["classes"], class_map)
        ext_preds = predict_rows(model, ext_dir, ext_rows, ckpt["classes"], pcfg, device=device,
                                 batch_size=batch_size, workers=workers, features=has_ood,
                                 progress=progress, desc="external")
        ext = score_predictions(ext_preds, temperature=temperature, operating_point=op,
                                n_resamples=n_resamples, seed=seed, prevalence=prev)
        doc["external"] = {
            "data_dir": str(ext_dir), "class_map": mapping,
            "overlap_with_manifest": _overlap_with_manifest(ext_dir, ext_rows, checkpoint.parent),
            **ext, "drop": drop_block(doc, ext),
        }
        write_predictions_csv(out_dir / "predictions_external.csv", ext_preds, temperature, op,
                              ckpt)
    doc["findings"] = findings(doc)
    validate_document(doc)
    write_json(out_dir / "metrics.json", doc)
    write_predictions_csv(out_dir / "predictions.csv", preds, temperature, op, ckpt)
    _log_summary(doc, out_dir)
    return out_dir / "metrics.json"


def _fmt(m: dict[str, Any]) -> str:
    if m["value"] is None:
        return f"undefined ({m['undefined_reason']})"
    ci = f" [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else ""
    return f"{m['value']:.3f}{ci}"


def _log_summary(doc: dict[str, Any], out_dir: Path) -> None:
    o = doc["at_argmax"]["overall"]
    log.info("%s (n=%d): accuracy %s, macro F1 %s, macro ROC-AUC %s, ECE %s -> %s (T=%.3f)",
             doc["run"]["split"], doc["n"], _fmt(o["accuracy"]), _fmt(o["macro_f1"]),
             _fmt(doc["threshold_free"]["macro_roc_auc"]),
             _fmt(doc["calibration"]["before"]["ece"]), _fmt(doc["calibration"]["after"]["ece"]),
             doc["calibration"]["temperature"])
    for f in doc["findings"]:
        log.warning("[%s] %s", f["severity"], f["text"])
    log.info("Report written to %s", out_dir)


def finalize_run(run_dir: str | Path, data_dir: str | Path, device: str = "cpu",
                 progress: bool = True, *, export: bool = False) -> Path:
    """End of training, in this order; ``best.pt`` is read, never written (each step writes
    its own sidecar, stamped with the hash of ``best.pt``: :mod:`core.sidecars`):

    1. temperature and operating point on the validation split
       (:func:`core.calibration.recalibrate_checkpoint`, ``best.calibration.json``);
    2. OOD statistics and the OOD and low-confidence cut-offs on the validation split
       (:func:`core.ood.calibrate_run_ood`, which uses the temperature of step 1,
       ``best.ood.safetensors``);
    3. with ``export``, the serving graph ``best.onnx`` and the check of which reduced
       precisions may serve (:func:`core.export.finish_run`, ``serving.json``; nothing
       passes: fp32 serves);
    4. the test report, whose per-image records carry each image's OOD score and flags under
       the cut-offs of step 2 and whose ``checkpoint_sha256`` is that of ``best.pt``.

    Training then writes ``run.json`` (``core.runs.summarise``). Returns the path of
    ``run_dir/report/metrics.json``.
    """
    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    recalibrate_checkpoint(best, data_dir, device=device, progress=progress)
    ood.calibrate_run_ood(run_dir, data_dir, device=device, progress=progress)
    if export:
        from core import export as export_lib

        export_lib.finish_run(run_dir, data_dir)
    return evaluate(best, data_dir, "test", run_dir / "report", device=device, progress=progress)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.evaluate",
        description="Evaluate a trained run: metrics with bootstrap CIs, calibration, operating "
                    "point, occlusion shortcut probe, optional external validation. Writes "
                    "metrics.json and predictions.csv (see docs/METRICS.md).",
    )
    g = p.add_argument_group("input")
    g.add_argument("--checkpoint", required=True, help="models/<run>/best.pt")
    g.add_argument("--data-dir", default=default_data_dir(),
                   help="dataset root the run was trained on (default: %(default)s, from "
                        "$CXR_DATA_DIR or data/COVID-19_Radiography_Dataset)")
    g.add_argument("--split", default="test", choices=("test", "val"),
                   help="manifest split to evaluate (default: test)")
    g = p.add_argument_group("external validation")
    g.add_argument("--external-dir", default=None,
                   help="another labelled folder (<Class>/images/*.png or <Class>/*.png)")
    g.add_argument("--class-map", default=None,
                   help="map external classes: old=new,... (old= drops a class); "
                        "unmapped classes are matched by name")
    g = p.add_argument_group("metrics")
    g.add_argument("--bootstrap", type=int, default=M.DEFAULT_RESAMPLES,
                   help="bootstrap resamples for the 95%% CIs (0 = none; default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    g.add_argument("--prevalence", default=None,
                   help="assumed prevalence for PPV/NPV: a number (every class) or "
                        "Class=p,Class=p")
    g.add_argument("--no-occlusion", dest="occlusion", action="store_false",
                   help="skip the occlusion shortcut probe (it triples inference time)")
    g.add_argument("--no-lung-focus", dest="lung_focus", action="store_false",
                   help="skip the Grad-CAM lung-focus score (it segments every image unless "
                        "the dataset has <Class>/masks/)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calibrate", action="store_true",
                   help="refit temperature and operating point, then the OOD and "
                        "low-confidence cut-offs, on the validation split and write them "
                        "beside the checkpoint (best.calibration.json, best.ood.safetensors) "
                        "before evaluating; best.pt is not modified")
    g.add_argument("--screening-class", default=DEFAULT_SCREENING_CLASS,
                   help="class of the operating point (default %(default)s)")
    g.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="validation sensitivity the threshold must reach (default %(default)s)")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--output", default=None, help="report folder (default: <run>/report/)")
    g.add_argument("--allow-manifest-change", action="store_true",
                   help="go on when the run's manifest.csv is not the one its checkpoint was "
                        "trained on (the report then warns that the split may overlap the "
                        "training images); without it that is an error")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="inference batch size (default: the run's training batch size)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: the run's training setting)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar")
    g.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = evaluate(
            args.checkpoint, args.data_dir, args.split, args.output,
            external_dir=args.external_dir, class_map=parse_class_map(args.class_map),
            n_resamples=args.bootstrap, seed=args.seed, prevalence=args.prevalence,
            calibrate=args.calibrate, screening_class=args.screening_class,
            target_sensitivity=args.target_sensitivity, occlusion=args.occlusion,
            lung_focus=args.lung_focus, device=args.device, batch_size=args.batch_size,
            workers=args.workers, progress=args.progress,
            allow_manifest_change=args.allow_manifest_change,
        )
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    log.info("metrics: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
