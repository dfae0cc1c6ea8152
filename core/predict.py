"""Batch prediction from the command line: ``python -m core.predict``.

Example::

    python -m core.predict --checkpoint models/run/best.pt scans/ extra.png \\
        --csv predictions.csv --heatmaps heatmaps/

Writes one CSV row per input file (columns: path, label, decision, ``p_<class>`` for every
class, confidence, low_confidence, ood, ood_score, network, [heatmap, lung_focus,] error;
``network``: the runtime and precision that answered, e.g. ``onnx-fp32``). A file that cannot be
used (damaged, not an image, too small...) gets a row with the reason in ``error`` and the
rest of the batch goes on. Each file's prediction or refusal is recorded in the audit log
(:mod:`core.audit`: never the image or its name) before its row is written; ``CXR_AUDIT=0``
turns the log off, and the run then says so. Exit status: 0 when every file was predicted,
1 when some files failed, 2 when nothing could run (bad checkpoint or arguments).

Research use only: not a medical device.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from core import gradcam
from core.errors import CXRError, InvalidImageError
from core.imaging import accepted_extensions
from core.network import PRECISIONS, RUNTIMES

if TYPE_CHECKING:
    from core.audit import AuditLog, ModelIdentity
    from core.inference import Predictor

log = logging.getLogger(__name__)


def find_images(inputs: Iterable[str | Path], recursive: bool = False) -> list[tuple[Path, Path | None]]:
    """Expand files and folders into (file, folder it came from or None), in a stable order.

    Folders contribute their files with an accepted extension (see
    :func:`core.imaging.accepted_extensions`); files named directly are always kept, so
    that a bad one is reported rather than silently skipped.
    """
    exts = {"." + e for e in accepted_extensions()}
    out: list[tuple[Path, Path | None]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = p.rglob("*") if recursive else p.iterdir()
            out.extend((f, p) for f in sorted(files)
                       if f.is_file() and f.suffix.lower() in exts and not f.name.startswith("."))
        else:
            out.append((p, None))
    return out


def heatmap_name(path: Path, root: Path | None, method: str, used: set[str]) -> str:
    """A unique PNG file name for a heatmap: the path under its folder, '/' -> '__'."""
    rel = path.relative_to(root) if root is not None else Path(path.name)
    stem = "__".join(rel.with_suffix("").parts)
    name = f"{stem}.{method}.png"
    k = 1
    while name in used:
        k += 1
        name = f"{stem}.{method}-{k}.png"
    used.add(name)
    return name


def csv_fields(classes: Sequence[str], heatmaps: bool) -> list[str]:
    fields = ["path", "label", "decision", *(f"p_{c}" for c in classes), "confidence",
              "low_confidence", "ood", "ood_score", "network"]
    if heatmaps:
        fields += ["heatmap", "lung_focus"]
    return [*fields, "error"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m core.predict",
        description="Predict chest X-ray images with a trained run and write a CSV "
                    "(optionally with Grad-CAM overlays). Research use only.",
        epilog="Exit status: 0 all files predicted; 1 some files failed (see the error "
               "column); 2 nothing could run.",
    )
    g = ap.add_argument_group("input")
    g.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help=f"image files or folders of images ({', '.join(accepted_extensions())})")
    g.add_argument("--checkpoint", required=True, help="models/<run>/best.pt")
    g.add_argument("--recursive", action="store_true", help="also search sub-folders")
    g = ap.add_argument_group("output")
    g.add_argument("--csv", required=True, help="CSV file to write (one row per file)")
    g.add_argument("--heatmaps", default=None, metavar="DIR",
                   help="also write a heatmap overlay PNG per image into DIR")
    g.add_argument("--method", default="gradcam", choices=gradcam.METHODS,
                   help="heatmap method (default %(default)s)")
    g.add_argument("--lung-contour", action="store_true",
                   help="draw the lung outline on the heatmap overlays")
    g = ap.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    g.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    g.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="what runs the network: onnx (ONNX Runtime on the graph exported "
                        "beside best.pt, python -m core.export), openvino, or torch (eager "
                        "PyTorch); auto: on the CPU onnx, or openvino for bf16 where the CPU runs "
                        "it natively and the run's check passed; torch on a GPU. A run with a lung "
                        "view segments on the same runtime at fp32 (segmenter.onnx beside "
                        "best.pt) (default auto)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp32 on the CPU unless the run's check (serving.json) let bf16 "
                        "or int8 serve; on a GPU the device's autocast. fp32 keeps PyTorch "
                        "fp32's decisions; bf16 (openvino or torch, CPUs with native bf16 or "
                        "GPUs), fp16 (torch on a GPU), int8 (onnx/openvino, after "
                        "core.export --data-dir) trade exactness for speed (default auto)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the network, any runtime (default 0: the CPUs available)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return ap


def _row(path: Path, classes: Sequence[str], pred: object = None, heatmap: str = "",
         error: str = "", lung_focus: float | None = None) -> dict[str, object]:
    row: dict[str, object] = {"path": str(path), "error": error}
    if pred is not None:
        row.update({
            "label": pred.label,  # type: ignore[attr-defined]
            "decision": pred.decision,  # type: ignore[attr-defined]
            **{f"p_{c}": f"{pred.probabilities[c]:.6f}" for c in classes},  # type: ignore[attr-defined]
            "confidence": f"{pred.confidence:.6f}",  # type: ignore[attr-defined]
            "low_confidence": pred.low_confidence,  # type: ignore[attr-defined]
            "ood": pred.ood,  # type: ignore[attr-defined]
            "ood_score": f"{pred.ood_score:.4f}",  # type: ignore[attr-defined]
            "network": pred.network,  # type: ignore[attr-defined]
        })
        if heatmap:
            row["heatmap"] = heatmap
            row["lung_focus"] = "" if lung_focus is None or lung_focus != lung_focus else \
                f"{lung_focus:.4f}"
    return row


def _audit_log(predictor: Predictor) -> tuple[AuditLog, ModelIdentity | None, str]:
    """The deployment's audit log (``core.audit``), the model's identity and this batch's id."""
    from core.audit import AuditLog, ModelIdentity, new_session_id

    audit = AuditLog.from_env()
    if not audit.enabled:
        log.warning("The audit log is off in this deployment (CXR_AUDIT=0): these predictions "
                    "are not recorded.")
        return audit, None, ""
    return audit, ModelIdentity.from_predictor(predictor), new_session_id()


def _audit_summary(audit: AuditLog) -> None:
    """Say what could not be written to the audit database (spooled or lost)."""
    c = audit.counters
    if c.spooled:
        log.warning("Audit log: %d record(s) were written to the local spool %s because the "
                    "database was unavailable; they are replayed when it is back "
                    "(python -m core.audit replay).", c.spooled, audit.spool.path)
    if c.failed:
        log.error("Audit log: %d record(s) could not be recorded at all (see above).", c.failed)
    audit.close()


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from core.inference import Explanation, Predictor

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device,
                                          runtime=args.runtime, precision=args.precision,
                                          batch_size=args.batch_size)
    files = find_images(args.inputs, args.recursive)
    if not files:
        log.error("No images found in the given paths.")
        return 2
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    if heat_dir is not None:
        heat_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = predictor.classes
    used: set[str] = set()
    failed = 0
    for note in predictor.notes:
        log.warning("%s", note)
    audit, audit_model, batch_id = _audit_log(predictor)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=csv_fields(classes, heat_dir is not None),
                                lineterminator="\n", restval="")
        writer.writeheader()
        bar = tqdm(total=len(files), desc="predicting", unit="img", disable=not args.progress)
        for start in range(0, len(files), args.batch_size):
            chunk = files[start : start + args.batch_size]
            paths = [p for p, _ in chunk]
            if heat_dir is not None:
                results = predictor.explain_batch(paths, args.method, on_error="return",
                                                  lung_contour=args.lung_contour)
            else:
                results = predictor.predict_batch(paths, on_error="return")
            for (path, root), res in zip(chunk, results, strict=True):
                audit.record_result(res, input=path, name=path.name, source="cli",
                                    model=audit_model, session_id=batch_id)
                if isinstance(res, InvalidImageError):
                    failed += 1
                    writer.writerow(_row(path, classes, error=str(res)))
                    continue
                heat, focus = "", None
                if isinstance(res, Explanation):
                    focus = res.lung_focus
                    heat_path = heat_dir / heatmap_name(path, root, args.method, used)  # type: ignore[operator]
                    Image.fromarray(res.overlay).save(heat_path)
                    heat = str(heat_path)
                    res = res.prediction
                writer.writerow(_row(path, classes, res, heat, lung_focus=focus))
            bar.update(len(chunk))
        bar.close()
    tmp.replace(out)
    _audit_summary(audit)
    log.info("Wrote %d rows to %s (%d predicted, %d failed)%s", len(files), out,
             len(files) - failed, failed,
             f"; heatmaps in {heat_dir}" if heat_dir is not None else "")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        log.error("--batch-size must be at least 1")
        return 2
    try:
        return run(args)
    except CXRError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
