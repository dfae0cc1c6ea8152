"""The serving network: a run's classifier (and its lung segmenter, for a lung view)
exported once to ONNX, beside its checkpoint, and the check that decides whether a reduced
precision may serve.

``python -m core.export RUN_DIR [--data-dir DATA]``

Files (sidecars of ``best.pt``, each recording the SHA-256 of the ``best.pt`` it came from)
-----------------------------------------------------------------------------------------
* ``best.onnx``: :func:`core.network.inference_trunk` exported by ``torch.onnx.export``
  (the ``torch.export``-based exporter, ``dynamo=True``; batch size dynamic), with three
  outputs: ``logits``, ``layer4`` (activations, for the fast Grad-CAM) and ``pooled`` (the
  global averages of the four ResNet stages that :mod:`core.ood` scores, concatenated).
  Its ONNX metadata holds ``weights_sha256``, the export version and the stage widths. The
  predictor re-exports it when the hash does not match ``best.pt`` (retrained, recalibrated
  or replaced): a stale graph never serves.
* ``best.int8.onnx``: the same graph quantised by ONNX Runtime's ``quantize_static`` (QDQ,
  per-channel int8 weights, activations calibrated on training images); needs the data.
* ``serving.json``: the reduced-precision check (:func:`check_reduced_precisions`) on the
  run's validation split, with the weights' hash. ``precision="auto"`` serves a reduced
  precision only where its check passed: top-1 agreement with PyTorch fp32 of at least
  99.5 %, no changed decision at the operating point (``p[class] >= threshold``, the
  screening rule, not only the top-two margin) and OOD flags agreeing on at least 98 %.
  Otherwise fp32.

* ``segmenter.onnx`` (runs with a lung view: not ``none``): the lung segmenter's
  U-Net (:mod:`core.unet`) exported the same way; its metadata holds the SHA-256 of the
  segmenter weights it came from (``assets/lung_segmenter.pt``, the hash the run's
  ``preprocess.segmenter_sha256`` records), and it is exported again when that does not
  match. A predictor serving from a runtime runs it there (:func:`core.serving.open_segmenter`), with
  :class:`core.lungs.LungSegmenter`'s own pre- and post-processing; with ``runtime="torch"``
  the eager U-Net segments.

Which of these graphs serves, at which precision, and opening it: :mod:`core.serving`.

A checkpoint's old ``int8`` block (the FX quantisation statistics of earlier versions) is
loaded and ignored, with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from core import network as net
from core.devices import cpu_has_native_bf16
from core.errors import CheckpointError, ConfigError, CXRError
from core.files import file_sha256
from core.model import load_checkpoint, model_from_checkpoint, preprocess_config_of
from core.runs import SERVING_FILE, is_shipped

if TYPE_CHECKING:
    from core.lungs import LungSegmenter

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
MIN_TOP1_AGREEMENT = 0.995
MAX_DECISION_CHANGES = 0
MIN_OOD_AGREEMENT = 0.98
DEFAULT_CALIBRATION_IMAGES = 128
SEGMENTER_GRAPH = "segmenter.onnx"
SEGMENTER_OUTPUTS = ("logits",)


def cache_dir() -> Path:
    """Where graphs exported on first use are kept outside any run folder: ``cache/`` in the
    user's CXR Insight folder (:func:`core.files.data_dir`: ``~/.local/share/cxr-insight``
    on Linux; ``CXR_DATA_HOME`` moves it)."""
    from core.files import data_dir

    return data_dir() / "cache"


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """``file_sha256``, remembered per path, size and modification time."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def graph_dir(checkpoint: str | Path) -> Path:
    """The folder of a run's exported graphs: beside ``best.pt``; for a run that ships with
    the repository (the demo: ``demo.json`` beside it, :func:`core.runs.is_shipped`),
    ``<cache>/demo-<first 12 hex of best.pt's SHA-256>/`` (:func:`cache_dir`) instead, so
    that serving it never writes into the repository."""
    p = Path(checkpoint)
    if is_shipped(p.parent) and p.is_file():
        return cache_dir() / f"demo-{cached_sha256(p)[:12]}"
    return p.parent


def graph_path(checkpoint: str | Path, precision: str = "fp32") -> Path:
    """``best.onnx`` (fp32) or ``best.int8.onnx`` in :func:`graph_dir` (beside ``best.pt``)."""
    p = Path(checkpoint)
    return graph_dir(p) / (p.stem + (".int8.onnx" if precision == "int8" else ".onnx"))


# ---------------------------------------------------------------- export


def _to_onnx(module: nn.Module, example: torch.Tensor, outputs: tuple[str, ...],
             props: dict[str, str]) -> bytes:
    """``module`` (input ``x``, batch dynamic) as ONNX bytes by ``torch.onnx.export`` (the
    ``torch.export``-based exporter), its metadata ``props`` plus the export version."""
    import onnx

    for name in ("onnx_ir", "onnxscript"):  # their passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=["x"], output_names=list(outputs),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            external_data=False, optimize=True, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"cxr_export_version": str(EXPORT_VERSION),
                                        "torch": str(torch.__version__), **props})
    return proto.SerializeToString()


def export_graph(model: nn.Module, img_size: int, channels: int = 3,
                 weights_sha256: str = "") -> bytes:
    """The ONNX graph (bytes) of a torchvision ResNet's one-pass trunk, fp32, batch dynamic."""
    trunk = net.inference_trunk(model.float().cpu().eval())
    t0 = time.perf_counter()
    data = _to_onnx(trunk, torch.zeros(2, channels, img_size, img_size), net.OUTPUT_NAMES,
                    {"weights_sha256": weights_sha256,
                     "stage_widths": json.dumps(net.stage_widths(model))})
    log.info("Exported the network to ONNX in %.1f s", time.perf_counter() - t0)
    return data


def graph_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported graph ({} for a file that is not one)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as exc:
        log.warning("Cannot read %s: %s", path, exc)
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_current(path: Path, sha: str) -> bool:
    """``path`` is an exported graph of the weights whose hash is ``sha``, of this version."""
    if not path.is_file():
        return False
    meta = graph_metadata(path)
    return (meta.get("weights_sha256") == sha
            and meta.get("cxr_export_version") == str(EXPORT_VERSION))


def ensure_graph(checkpoint: str | Path, ckpt: dict[str, Any] | None = None,
                 force: bool = False) -> Path:
    """``best.onnx`` beside ``checkpoint``, exported now when missing, of other weights
    (hash mismatch) or ``force``. Returns its path."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"Checkpoint not found: {checkpoint}")
    sha = file_sha256(checkpoint)
    path = graph_path(checkpoint)
    if not force and is_current(path, sha):
        return path
    if path.is_file():
        log.info("%s is not the export of the current %s (hash mismatch): exporting again",
                 path.name, checkpoint.name)
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    data = export_graph(model_from_checkpoint(ckpt), int(preprocess_config_of(ckpt).img_size),
                        preprocess_config_of(ckpt).channels, sha)
    _write_atomic(path, data)
    return path


# ---------------------------------------------------------------- the lung segmenter


def segmenter_graph_path(checkpoint: str | Path) -> Path:
    """``segmenter.onnx`` in :func:`graph_dir` (beside ``best.pt``): the run's lung
    segmenter, exported."""
    return graph_dir(checkpoint) / SEGMENTER_GRAPH


def cached_segmenter_path(segmenter: LungSegmenter) -> Path:
    """The user's exported copy of a segmenter, for the lung focus of runs without a lung
    view: ``<data folder>/cache/lung_segmenter.<sha256[:16]>.onnx`` (:func:`cache_dir`:
    the data folder of :func:`core.files.data_dir`, ``CXR_DATA_HOME`` overrides it)."""
    return cache_dir() / f"lung_segmenter.{segmenter.sha256[:16]}.onnx"


def export_segmenter(segmenter: LungSegmenter) -> bytes:
    """The ONNX graph (bytes) of a lung segmenter's U-Net (normalised input [N, 1, S, S] ->
    ``logits`` [N, 1, S, S], fp32, batch dynamic), with its weights file's SHA-256."""
    model = copy.deepcopy(segmenter.model).float().eval()  # the shared module stays untouched
    model = model.to(memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    data = _to_onnx(model, torch.zeros(1, 1, segmenter.img_size, segmenter.img_size),
                    SEGMENTER_OUTPUTS, {"weights_sha256": segmenter.sha256,
                                        "segmenter_img_size": str(segmenter.img_size)})
    log.info("Exported the lung segmenter to ONNX in %.1f s", time.perf_counter() - t0)
    return data


def run_segmenter(ckpt: dict[str, Any]) -> LungSegmenter | None:
    """The segmenter a run's lung view uses (the shipped one, refused with
    :class:`CheckpointError` when it is not the one the run was trained with), or None for a
    run without a lung view (``lung_view = "none"``)."""
    from core import lungs

    cfg = preprocess_config_of(ckpt)
    if cfg.lung_view == "none":
        return None
    segmenter = lungs.default_segmenter()
    lungs.check_segmenter_hash(cfg, segmenter)
    return segmenter


def ensure_segmenter_graph(path: str | Path, segmenter: LungSegmenter,
                           force: bool = False) -> Path:
    """The exported ``segmenter`` at ``path`` (a run's :func:`segmenter_graph_path`, or
    :func:`cached_segmenter_path`), exported now when missing, of other segmenter weights
    (its stamp is not ``segmenter.sha256``) or ``force``. Returns ``path``."""
    path = Path(path)
    if not force and is_current(path, segmenter.sha256):
        return path
    if path.is_file():
        log.info("%s is not the export of the current lung segmenter (hash mismatch): "
                 "exporting again", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, export_segmenter(segmenter))
    return path


def ensure_run_graphs(checkpoint: str | Path, force: bool = False) -> list[Path]:
    """The serving graphs of a run: ``best.onnx`` and, for a run with a lung view,
    ``segmenter.onnx``; each exported only when missing or stale (or ``force``)."""
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"Checkpoint not found: {checkpoint}")
    ckpt = load_checkpoint(checkpoint)
    paths = [ensure_graph(checkpoint, ckpt, force=force)]
    segmenter = run_segmenter(ckpt)
    if segmenter is not None:
        paths.append(ensure_segmenter_graph(segmenter_graph_path(checkpoint), segmenter,
                                            force=force))
    return paths


# ---------------------------------------------------------------- int8 and the check


def fitted_hashes(checkpoint: Path) -> dict[str, str]:
    """SHA-256 of the calibration and OOD sidecars the check's decisions and flags used."""
    from core import sidecars

    return {p.name: file_sha256(p) for p in sidecars.sidecar_files(checkpoint)
            if not p.name.endswith(".int8.pt")}


def _loader(data_dir: str | Path, rows: list[dict[str, str]], classes: list[str],
            ckpt: dict[str, Any], batch_size: int = 32) -> Any:
    from torch.utils.data import DataLoader

    from core.scoring import evaluation_dataset

    ds = evaluation_dataset(data_dir, rows, classes, preprocess_config_of(ckpt))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def _sample(rows: list[dict[str, str]], n: int, seed: int = 0) -> list[dict[str, str]]:
    if n <= 0 or len(rows) <= n:
        return list(rows)
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return [rows[i] for i in idx]


def quantize_int8(checkpoint: str | Path, batches: list[torch.Tensor]) -> Path:
    """``best.int8.onnx``: the fp32 graph quantised by ONNX Runtime's ``quantize_static``
    (QDQ, per-channel int8 weights, activations calibrated on ``batches`` of preprocessed
    training images), with the weights' hash in its metadata."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    checkpoint = Path(checkpoint)
    fp32 = ensure_graph(checkpoint)
    sha = file_sha256(checkpoint)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"x": x.float().numpy()}

    out = graph_path(checkpoint, "int8")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        q = Path(tmp) / "int8.onnx"
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        proto = onnx.load(str(q))
    meta = graph_metadata(fp32)
    onnx.helper.set_model_props(proto, {**meta, "weights_sha256": sha, "precision": "int8"})
    _write_atomic(out, proto.SerializeToString())
    return out


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            ckpt: dict[str, Any]) -> dict[str, Any]:
    """Agreement of a candidate's outputs with the reference's on the same images.

    Both: ``logits`` [N, C] and ``pooled`` (ood.LAYERS -> [N, C_k]). Decisions at the
    operating point use the screening rule ``p[class] >= threshold`` (else the most probable
    other class, :func:`core.metrics.predict_at_threshold`); OOD flags use the run's cut-off.
    """
    from core import metrics as M
    from core import ood

    t = float(ckpt.get("temperature") or 1.0)

    def proba(logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, np.float64) / t
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    pr, pc = proba(reference["logits"]), proba(candidate["logits"])
    out: dict[str, Any] = {
        "n": len(pr),
        "top1_agreement": float((pr.argmax(1) == pc.argmax(1)).mean()),
        "max_abs_dp": float(np.abs(pr - pc).max()),
    }
    op = ckpt.get("operating_point")
    if op is not None:
        j = list(ckpt["classes"]).index(op["class"])
        thr = float(op["threshold"])
        dr, dc = M.predict_at_threshold(pr, j, thr), M.predict_at_threshold(pc, j, thr)
        out["decision_changes"] = int((dr != dc).sum())
        out["screening_changes"] = int(((pr[:, j] >= thr) != (pc[:, j] >= thr)).sum())
    else:
        out["decision_changes"] = int((pr.argmax(1) != pc.argmax(1)).sum())
        out["screening_changes"] = 0
    if ckpt.get("ood") is not None:
        stats = ckpt["ood"]

        def flags(pooled: dict[str, np.ndarray]) -> np.ndarray:
            feats = ({ood.SINGLE: pooled["layer4"]}
                     if list(stats["layer_names"]) == [ood.SINGLE] else pooled)
            return np.asarray(ood.ood_score(stats, feats)) > float(stats["threshold"])

        out["ood_flag_agreement"] = float((flags(reference["pooled"]) == flags(candidate["pooled"])).mean())
    out["passed"] = bool(out["top1_agreement"] >= MIN_TOP1_AGREEMENT
                         and out["decision_changes"] + out["screening_changes"] <= MAX_DECISION_CHANGES
                         and out.get("ood_flag_agreement", 1.0) >= MIN_OOD_AGREEMENT)
    return out


def run_all(network: net.Network, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Logits and pooled stage activations of a network over batches, concatenated."""
    outs = [network(x) for x in batches]
    return {"logits": torch.cat([o.logits for o in outs]).numpy(),
            "pooled": {k: np.concatenate([o.pooled[k] for o in outs]) for k in outs[0].pooled}}


def candidates_here() -> list[tuple[str, str]]:
    """(runtime, reduced precision) pairs this machine can serve."""
    out = []
    for runtime in ("onnx", "openvino"):
        if not net.runtime_available(runtime):
            continue
        out.append((runtime, "int8"))
        if runtime == "openvino" and cpu_has_native_bf16():
            out.append((runtime, "bf16"))
    return out


def check_reduced_precisions(run_dir: str | Path, data_dir: str | Path, *,
                             calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                             agreement_images: int = 0, seed: int = 0) -> dict[str, Any]:
    """Export ``best.onnx`` (if needed), quantise ``best.int8.onnx`` on training images, and
    check every reduced precision this machine can serve against PyTorch fp32 on the
    validation split; write ``serving.json`` and return it."""
    from core.data import run_split_rows
    from core.sidecars import load_run_checkpoint

    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    ckpt = load_run_checkpoint(best)  # with its calibration and OOD sidecars
    classes = list(ckpt["classes"])
    t0 = time.perf_counter()
    ensure_graph(best, ckpt)
    splits, warnings_ = run_split_rows(run_dir, data_dir, ckpt, ("train", "val"))
    for w in warnings_:
        log.warning("%s", w)
    val = [x for x, *_ in _loader(data_dir, _sample(splits["val"], agreement_images, seed), classes, ckpt)]
    model = model_from_checkpoint(ckpt)
    reference = run_all(net.TorchNetwork(model, torch.device("cpu"), None), val)
    widths = net.stage_widths(model)
    checks: dict[str, Any] = {}
    fp32_graph = graph_path(best)
    fp32 = run_all(net.RuntimeNetwork(fp32_graph, widths, net.DEFAULT_RUNTIME, "fp32"), val)
    checks[f"{net.DEFAULT_RUNTIME}-fp32"] = compare(reference, fp32, ckpt)
    pairs = candidates_here()
    if any(p == "int8" for _, p in pairs):
        calib = [x for x, *_ in _loader(data_dir, _sample(splits["train"], calibration_images, seed),
                                        classes, ckpt)]
        quantize_int8(best, calib)
    for runtime, prec in pairs:
        graph = graph_path(best, prec)
        try:
            checks[f"{runtime}-{prec}"] = compare(
                reference, run_all(net.RuntimeNetwork(graph, widths, runtime, prec), val), ckpt)
        except (RuntimeError, ConfigError) as exc:  # the runtime refused the graph
            checks[f"{runtime}-{prec}"] = {"passed": False, "error": str(exc)[:300]}
    summary = {"weights_sha256": file_sha256(best), "sidecars_sha256": fitted_hashes(best),
               "export_version": EXPORT_VERSION,
               "split": "val", "cpu_native_bf16": cpu_has_native_bf16(),
               "criteria": {"min_top1_agreement": MIN_TOP1_AGREEMENT,
                            "max_decision_changes": MAX_DECISION_CHANGES,
                            "min_ood_flag_agreement": MIN_OOD_AGREEMENT},
               "checks": checks, "seconds": round(time.perf_counter() - t0, 1)}
    (run_dir / SERVING_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    for name, c in checks.items():
        log.info("%s on %s val images: top-1 agreement %s, decision changes %s, OOD flags %s: %s",
                 name, c.get("n"), c.get("top1_agreement"), c.get("decision_changes"),
                 c.get("ood_flag_agreement"), "passed" if c.get("passed") else "not used")
    return summary


def finish_run(run_dir: str | Path, data_dir: str | Path | None) -> dict[str, Any] | None:
    """Training's last step: export the graphs (``best.onnx``; ``segmenter.onnx`` for a run
    with a lung view) and, with the data, check reduced precisions. A runtime missing here
    only logs (the torch network still serves)."""
    best = Path(run_dir) / "best.pt"
    if not net.runtime_available(net.DEFAULT_RUNTIME):
        log.warning("%s is not installed: no exported graph; the predictor serves torch",
                    net.DEFAULT_RUNTIME)
        return None
    ensure_run_graphs(best)
    if data_dir is None:
        return None
    return check_reduced_precisions(run_dir, data_dir)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m core.export",
        description="Export a run's network once to one ONNX graph beside best.pt (best.onnx: "
        "logits, layer4 activations and the pooled stage activations the OOD score uses), "
        "re-exported when best.pt's hash changed; for a run with a lung view (not none) "
        "also its lung segmenter (segmenter.onnx, re-exported when the segmenter weights' hash "
        "changed), which then segments on the same runtime. With --data-dir also quantise it "
        "to int8 "
        "(best.int8.onnx) and check every reduced precision this CPU serves against PyTorch "
        f"fp32 on validation (top-1 agreement >= {MIN_TOP1_AGREEMENT:.1%}, no changed decision "
        f"at the operating point, OOD flags >= {MIN_OOD_AGREEMENT:.0%}); serving.json records "
        "it, and precision 'auto' uses only what passed (by default OpenVINO bf16 first, "
        "then ONNX Runtime int8).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("run_dir", help="the run folder (best.pt)")
    ap.add_argument("--data-dir", default=None,
                    help="the data the run was trained on (default: the run's config.json); "
                         "needed for int8 and the check")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="only export the fp32 graphs (no int8, no check)")
    ap.add_argument("--force", action="store_true",
                    help="export even when the graphs are current")
    ap.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                    help="training images for int8 activation ranges (0 = all)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _run_data_dir(run_dir: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads((run_dir / "config.json").read_text())["data"]["data_dir"])
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = Path(args.run_dir)
    try:
        for path in ensure_run_graphs(run_dir / "best.pt", force=args.force):
            log.info("Exported graph: %s", path)
        data_dir = args.data_dir or _run_data_dir(run_dir)
        if args.check and data_dir and Path(data_dir).is_dir():
            check_reduced_precisions(run_dir, data_dir, calibration_images=args.calibration_images)
        elif args.check:
            log.info("No data folder: reduced precisions not checked, fp32 serves")
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
