"""Which network serves a run, and opening it: the runtime and precision the predictor's
settings resolve to (for ``auto``: the run's check in ``serving.json``, the CPU kind and the
runtimes installed), OpenVINO's own copy of a graph, and the network and lung segmenter the
predictor calls (:mod:`core.network`).

The graphs themselves are made, and the check is run, by :mod:`core.export`.

OpenVINO reads a graph from its own format (IR: ``.xml`` + ``.bin``), converted once from
the ONNX file into the user's cache (:func:`openvino_ir`), so that it maps the weights from
the ``.bin`` instead of copying them (at bf16, :mod:`core.network` then hands the fp32 source
weights' pages back after the first call).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core import network as net
from core.devices import cpu_has_native_bf16, resolve_precision
from core.errors import ConfigError
from core.export import (
    SEGMENTER_OUTPUTS,
    cache_dir,
    cached_segmenter_path,
    cached_sha256,
    ensure_graph,
    ensure_segmenter_graph,
    export_graph,
    export_segmenter,
    fitted_hashes,
    graph_path,
    is_current,
    segmenter_graph_path,
)
from core.files import file_sha256
from core.model import preprocess_config_of
from core.runs import AUTO_SERVING, SERVING_FILE

if TYPE_CHECKING:
    from core.lungs import LungSegmenter

log = logging.getLogger(__name__)

OLD_INT8_NOTE = ("This run holds an int8 block from an earlier version (FX quantisation); it is "
                 "ignored: the serving network is the exported graph (python -m core.export).")


OPENVINO_IR_KEEP = 4
"""Graphs kept in OpenVINO's cache folder (~100 MB each for a ResNet50); older ones are
deleted when a new one is converted."""


def openvino_ir(onnx_path: str | Path) -> Path:
    """OpenVINO's own format (IR) of an ONNX graph: ``<cache>/openvino/<name>.<SHA-256 of
    the ONNX file, 16 hex>.xml`` and its ``.bin`` (:func:`cache_dir`), converted now when
    missing (``ov.save_model``, weights kept fp32). The graph is the same; read from an IR,
    OpenVINO maps the weights from the ``.bin`` instead of copying them into the process.
    The cache keeps the :data:`OPENVINO_IR_KEEP` most recently used graphs. Raises
    ``OSError`` where the cache cannot be written."""
    import openvino as ov

    onnx_path = Path(onnx_path)
    folder = cache_dir() / "openvino"
    xml = folder / f"{onnx_path.stem}.{cached_sha256(onnx_path)[:16]}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        with contextlib.suppress(OSError):
            os.utime(xml)  # most recently used
        return xml
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = folder / f"{xml.stem}.tmp-{os.getpid()}.xml"
    try:
        ov.save_model(ov.Core().read_model(str(onnx_path)), str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)  # last: an .xml is only ever beside its complete .bin
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            with contextlib.suppress(OSError):
                leftover.unlink()
    log.info("Converted %s to OpenVINO's format in %.1f s", onnx_path.name,
             time.perf_counter() - t0)
    kept = [p for p in folder.glob("*.xml") if ".tmp-" not in p.name]
    older = sorted(kept, key=lambda p: p.stat().st_mtime, reverse=True)
    for old in older[OPENVINO_IR_KEEP:]:  # a process still reading one keeps its open copy
        for part in (old, old.with_suffix(".bin")):
            with contextlib.suppress(OSError):
                part.unlink()
    return xml


def _runtime_graph(graph: Path, runtime: str) -> Path:
    """The file ``runtime`` reads for the ONNX graph ``graph``: itself, or for OpenVINO its
    IR (:func:`openvino_ir`; the ONNX file where the cache cannot be written)."""
    if runtime != "openvino":
        return graph
    try:
        return openvino_ir(graph)
    except OSError as exc:
        log.warning("Cannot write OpenVINO's copy of %s (%s); reading the ONNX file",
                    graph.name, exc)
        return graph


# ---------------------------------------------------------------- choosing and opening


def _serving_checks(checkpoint: Path, sha: str) -> dict[str, Any]:
    """The checks of ``serving.json`` when they were made on these weights and with the
    calibration and OOD sidecars now beside them (a refit operating point voids them)."""
    path = checkpoint.parent / SERVING_FILE
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if (data.get("weights_sha256") == sha
                and data.get("sidecars_sha256", {}) == fitted_hashes(checkpoint)):
            return dict(data.get("checks", {}))
    return {}


def auto_precision(checkpoint: Path | None, runtime: str, sha: str = "") -> str:
    """The precision ``precision="auto"`` serves with ``runtime`` on this CPU: a reduced one
    only where ``serving.json`` records its passed check for these weights, else fp32."""
    if checkpoint is None:
        return "fp32"
    checks = _serving_checks(checkpoint, sha or file_sha256(checkpoint))
    for prec in ("bf16", "int8"):
        c = checks.get(f"{runtime}-{prec}")
        if not (c and c.get("passed")):
            continue
        if prec == "bf16" and not cpu_has_native_bf16():
            continue
        if prec == "int8" and not is_current(graph_path(checkpoint, "int8"), sha):
            continue
        return prec
    return "fp32"


def auto_serving(checkpoint: Path | None, sha: str = "") -> tuple[str, str]:
    """``(runtime, precision)`` for ``runtime="auto", precision="auto"`` on the CPU: the
    first of :data:`core.runs.AUTO_SERVING` whose runtime is installed and whose check passed
    for these weights on this CPU (:func:`auto_precision`), else fp32 on
    :data:`core.network.DEFAULT_RUNTIME`."""
    for runtime, prec in AUTO_SERVING:
        if net.runtime_available(runtime) and auto_precision(checkpoint, runtime, sha) == prec:
            return runtime, prec
    return net.DEFAULT_RUNTIME, "fp32"


def resolve_runtime(runtime: str, device: torch.device) -> str:
    if runtime not in net.RUNTIMES:
        raise ConfigError(f"runtime={runtime!r} is not valid; choose one of: {', '.join(net.RUNTIMES)}")
    if runtime == "auto":
        if device.type != "cpu":
            return "torch"
        return net.DEFAULT_RUNTIME if net.runtime_available(net.DEFAULT_RUNTIME) else "torch"
    if runtime != "torch" and device.type != "cpu":
        raise ConfigError(f"runtime={runtime!r} runs on the CPU; use runtime='torch' on {device}")
    return runtime


def open_network(ckpt: dict[str, Any], model: nn.Module, *, source: str = "",
                 device: torch.device, runtime: str = "auto", precision: str = "auto",
                 ) -> tuple[net.Network, tuple[str, ...]]:
    """The network the predictor calls, and notes for its predictions.

    ``model``: the checkpoint's ``nn.Module`` (its weights); ``source``: the ``best.pt`` it
    came from (the exported graph is kept beside it; without one it is exported in memory).
    """
    notes = [OLD_INT8_NOTE] if ckpt.get("int8") is not None else []
    if notes:
        log.info("%s", OLD_INT8_NOTE)
    checkpoint = Path(source) if source and Path(source).is_file() else None
    sha = cached_sha256(checkpoint) if checkpoint else ""
    if runtime == "auto" and device.type == "cpu" and net.runtime_available(net.DEFAULT_RUNTIME):
        if precision == "auto":
            runtime, precision = auto_serving(checkpoint, sha)
        elif precision == "bf16" and net.runtime_available("openvino"):
            runtime = "openvino"  # the runtime that serves bf16 on the CPU
    runtime = resolve_runtime(runtime, device)
    if runtime == "torch":
        if precision == "int8":
            raise ConfigError("precision='int8' is served by the runtimes (onnx, openvino), "
                              "not by torch")
        # fp32 on the CPU for "auto": the same image gets the same answer on every CPU.
        prec = "fp32" if precision == "auto" and device.type == "cpu" else precision
        return net.TorchNetwork(model, device, resolve_precision(prec, device)), tuple(notes)
    prec = auto_precision(checkpoint, runtime, sha) if precision == "auto" else precision
    widths = net.stage_widths(model)
    if prec == "int8":
        if checkpoint is None or not is_current(graph_path(checkpoint, "int8"), sha):
            raise ConfigError("No int8 graph of these weights: run `python -m core.export RUN_DIR "
                              "--data-dir DATA` (it quantises and checks it)")
        return net.RuntimeNetwork(_runtime_graph(graph_path(checkpoint, "int8"), runtime), widths,
                                  runtime, prec), tuple(notes)
    net.check_precision(runtime, prec)
    graph: Path | bytes
    if checkpoint is None:
        graph = export_graph(model, int(preprocess_config_of(ckpt).img_size),
                             preprocess_config_of(ckpt).channels)
    else:
        try:
            graph = _runtime_graph(ensure_graph(checkpoint, ckpt), runtime)
        except OSError as exc:  # a read-only run folder: export in memory for this process
            log.warning("Cannot write the exported graph beside %s (%s); exporting in memory",
                        checkpoint, exc)
            graph = export_graph(model, int(preprocess_config_of(ckpt).img_size),
                                 preprocess_config_of(ckpt).channels)
    return net.RuntimeNetwork(graph, widths, runtime, prec), tuple(notes)


def open_segmenter(runtime: str, source: str = "", *, cache: bool = False) -> LungSegmenter:
    """The lung segmenter a predictor whose network runs on ``runtime`` uses: the shipped
    one, eager torch for ``torch``, else its U-Net on that runtime at fp32. The graph:
    ``segmenter.onnx`` beside the checkpoint ``source`` (a lung-view run's), or with
    ``cache`` the user's copy (:func:`cached_segmenter_path`; lung focus of runs without a
    lung view), exported there when missing or stale; in memory otherwise or where the
    folder is not writable. Its ``runtime`` attribute says which (``onnx-fp32``...)."""
    from core import lungs

    segmenter = lungs.default_segmenter()
    if runtime == "torch":
        return segmenter
    path = (segmenter_graph_path(source) if source and Path(source).is_file()
            else cached_segmenter_path(segmenter) if cache else None)
    graph: Path | bytes
    try:
        graph = ensure_segmenter_graph(path, segmenter) if path else export_segmenter(segmenter)
    except OSError as exc:  # a read-only folder: export in memory for this process
        log.warning("Cannot write %s (%s); exporting in memory", path, exc)
        graph = export_segmenter(segmenter)
    run = net.runtime_session(graph, runtime, "fp32", SEGMENTER_OUTPUTS)
    return segmenter.on_runtime(lambda x: run(x)[0][0, 0], f"{runtime}-fp32")
