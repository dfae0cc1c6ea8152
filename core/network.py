"""One small interface for the classifier's network at inference: a torch implementation
and a runtime implementation of the same one-pass graph.

``network(x)`` takes preprocessed tensors [N, C, S, S] and returns a :class:`NetOutput`:
the logits, the ``layer4`` activations (for the fast Grad-CAM) and the pooled activations
of the four ResNet stages that :mod:`core.ood` scores, all from one forward pass of
:func:`inference_trunk`.

* :class:`TorchNetwork`: the ``nn.Module`` itself (eager PyTorch): GPUs, bf16/fp16
  autocast, training's checks, and the library CAM methods that need gradients.
* :class:`RuntimeNetwork`: the trunk exported once to ONNX (:mod:`core.export`) and run by
  a maintained CPU runtime, ONNX Runtime (``onnx``) or OpenVINO (``openvino``), at fp32,
  bf16 (OpenVINO, only where the CPU has native bf16) or int8 (the graph quantised by ONNX
  Runtime's ``quantize_static``).

``network.name`` says which runtime and precision answered (``torch-fp32``, ``onnx-fp32``,
``openvino-bf16``...); every :class:`core.inference.Prediction` carries it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from core import ood
from core.devices import cpu_has_native_bf16, page_out_file, trim_heap
from core.errors import ConfigError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx", "openvino")
"""``torch``: eager PyTorch; ``onnx``: ONNX Runtime (CPU); ``openvino``: OpenVINO (CPU);
``auto``: on the CPU, :data:`DEFAULT_RUNTIME`, or the runtime of a reduced precision the run's
check let serve (``core.serving.auto_serving``); torch on a GPU."""
DEFAULT_RUNTIME = "onnx"
"""The CPU serving runtime at fp32, chosen by measurement (``docs/ARCHITECTURE.md``)."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
"""``auto``: fp32 on the CPU unless a reduced precision passed the run's check
(:mod:`core.export`); the device's autocast dtype on a GPU."""
OUTPUT_NAMES = ("logits", "layer4", "pooled")


@dataclass(frozen=True, eq=False)
class NetOutput:
    """What one forward pass gives for a batch."""

    logits: torch.Tensor  # [N, C] float32, CPU, uncalibrated
    layer4: torch.Tensor  # [N, K, h, w] float (on the network's device)
    pooled: dict[str, np.ndarray]  # ood.LAYERS -> [N, C_k] float64


class Network(Protocol):
    """The interface the predictor calls."""

    name: str  # "<runtime>-<precision>"
    runtime: str  # "torch", "onnx" or "openvino"

    def __call__(self, x: torch.Tensor) -> NetOutput: ...


# ---------------------------------------------------------------- the graph


class _Trunk(nn.Module):
    """``x -> (logits, layer4 activations, pooled activations of every stage)`` of a
    torchvision ResNet in one pass: the operations of ``model(x)`` and of
    :func:`core.gradcam.forward_with_cam`, plus the global averages that
    :func:`core.ood.pooled_layer_features` gives, concatenated in ``ood.LAYERS`` order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h1 = m.layer1(x)
        h2 = m.layer2(h1)
        h3 = m.layer3(h2)
        feats = m.layer4(h3)
        logits = m.fc(torch.flatten(m.avgpool(feats), 1))
        pooled = torch.cat([h.mean(dim=(2, 3)) for h in (h1, h2, h3, feats)], dim=1)
        return logits, feats, pooled


def inference_trunk(model: nn.Module) -> nn.Module:
    """The one-pass inference network of a torchvision ResNet (see ``_Trunk``): what
    :class:`TorchNetwork` runs and what :mod:`core.export` exports."""
    return _Trunk(model).eval()


def stage_widths(model: nn.Module) -> list[int]:
    """Output channels of each of ``ood.LAYERS`` (the pooled output's column blocks)."""
    widths = []
    for name in ood.LAYERS:
        last = list(getattr(model, name).children())[-1]
        bn = getattr(last, "bn3", None) or last.bn2
        widths.append(int(bn.num_features))
    return widths


def _split_pooled(pooled: np.ndarray, widths: list[int]) -> dict[str, np.ndarray]:
    cuts = np.cumsum(widths)[:-1]
    parts = np.split(np.asarray(pooled, np.float64), cuts, axis=1)
    return dict(zip(ood.LAYERS, parts, strict=True))


# ---------------------------------------------------------------- torch


class TorchNetwork:
    """Eager PyTorch (``inference_mode``, optional autocast)."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                 ) -> None:
        self.model = model.to(device).eval()
        self.device, self.amp_dtype = device, amp_dtype
        self._trunk = inference_trunk(self.model)
        self._widths = stage_widths(model)
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        self.name, self.runtime = f"torch-{prec}", "torch"

    def __call__(self, x: torch.Tensor) -> NetOutput:
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode():
            amp = (torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
                   if self.amp_dtype is not None else contextlib.nullcontext())
            with amp:
                logits, feats, pooled = self._trunk(x)
            return NetOutput(logits.float().cpu(), feats,
                             _split_pooled(pooled.float().cpu().numpy(), self._widths))


# ---------------------------------------------------------------- runtimes


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (containers), where a runtime's default thread count may count the whole host."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(float(quota) / float(period))))
    return max(1, n)


def runtime_available(runtime: str) -> bool:
    """The runtime's Python package is installed."""
    import importlib.util

    pkg = {"onnx": "onnxruntime", "openvino": "openvino"}.get(runtime)
    return pkg is None or importlib.util.find_spec(pkg) is not None


def check_precision(runtime: str, precision: str) -> None:
    """Raise :class:`ConfigError` when ``runtime`` cannot run ``precision`` on this machine."""
    ok = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}[runtime]
    if precision not in ok:
        raise ConfigError(f"precision={precision!r} is not served by runtime={runtime!r} "
                          f"(it serves {', '.join(ok)}); use --runtime torch for autocast")
    if precision == "bf16" and not cpu_has_native_bf16():
        raise ConfigError("bf16 is served only on CPUs with native bf16 (AVX512-BF16 or AMX); "
                          "this CPU would emulate it, slower than fp32")
    if not runtime_available(runtime):
        pkg = {"onnx": "onnxruntime", "openvino": "openvino"}[runtime]
        raise ConfigError(f"runtime={runtime!r} needs the `{pkg}` package (pip install {pkg})")


def runtime_session(graph: str | Path | bytes, runtime: str, precision: str,
                    outputs: tuple[str, ...], threads: int = 0,
                    ) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``run(x) -> [outputs...]``: an ONNX graph (its path or bytes, input ``x``) on ONNX
    Runtime (``onnx``) or OpenVINO (``openvino``) on the CPU, at ``precision`` (see
    :func:`check_precision`); thread-safe. ``threads``: intra-op threads (default: torch's
    setting, at most the CPUs available). The classifier's :class:`RuntimeNetwork` and the
    lung segmenter's runtime (:func:`core.serving.open_segmenter`) both run on it."""
    check_precision(runtime, precision)
    threads = threads or min(usable_cpus(), torch.get_num_threads())
    if runtime == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No arena: activations are freed after each call instead of kept at their peak
        # (a batch of 16 at 224 px would otherwise hold ~200 MB for the process's life).
        opts.enable_cpu_mem_arena = False
        # Spin-wait inside a call, never between calls. Within one call the worker threads
        # spin between operators instead of sleeping: waking a sleeping thread costs tens of
        # microseconds per operator (ResNet50 at 224 px on 2 cores: 20-21 ms a call, against
        # 21-37 ms without spinning). ``force_spinning_stop`` ends the spinning when the call
        # returns: without it, the threads burnt ~45 ms of CPU in the 50 ms after each call,
        # slowing the app's other work (and any other session, e.g. the lung segmenter's);
        # with it, 0.1 ms, as without spinning (figures: docs/ARCHITECTURE.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        src = graph if isinstance(graph, bytes) else str(graph)
        session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        names = list(outputs)
        return lambda x: session.run(names, {"x": x})
    import openvino as ov

    core = ov.Core()
    # From a file, OpenVINO maps the weights (an IR's .bin; core.serving.openvino_ir) instead
    # of copying them into the process.
    model = core.read_model(graph if isinstance(graph, bytes) else str(graph))
    # Compiled for one image (a static batch of 1), and a batch runs image by image. With
    # a dynamic batch, OpenVINO kept the memory of every batch size it had run (a batch of
    # 16 at 224 px: ~110 MB for the process's life); a loaded predictor after 30 explains
    # and a batch of 16 now adds 357 MB at fp32 (was 463) and 312 MB at bf16 (was 328)
    # (docs/ARCHITECTURE.md). On 2 CPUs the loop lost no throughput (fp32 2.60x the eager
    # baseline, against 2.52x with batches of 16): each image already fills the cores.
    model.reshape(ov.PartialShape([1, *model.input(0).get_partial_shape()[1:]]))
    hint = "bf16" if precision == "bf16" else "f32"  # int8 graphs keep their int8 ops
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    in_shape = [int(d) for d in model.input(0).get_shape()]
    del model
    outs = [compiled.output(n) for n in outputs]
    # One infer request, one call at a time: a request serves a single call (called from two
    # threads at once, ``compiled(x)``'s shared request raised "Infer Request is busy"), and
    # one request keeps one set of activations (the cores are busy with one call anyway).
    request, lock = compiled.create_infer_request(), threading.Lock()
    if precision == "bf16" and isinstance(graph, str | Path) and Path(graph).suffix == ".xml":
        # At bf16 the compiled network computes with bf16 copies of the weights, made at its
        # first call, yet keeps the fp32 source weights it was compiled from; mapped from the
        # IR's .bin, their pages are only read once. Handing them back to the OS after that
        # first call takes ~90 MB (ResNet50) off the process, and the answers stay the same
        # (tests/test_export.py; figures: docs/ARCHITECTURE.md).
        request.infer({0: np.zeros(in_shape, np.float32)})
        released = page_out_file(Path(graph).with_suffix(".bin"))
        log.debug("OpenVINO bf16: paged out %.0f MB of mapped source weights", released / 2**20)

    def run(x: np.ndarray) -> list[np.ndarray]:
        with lock:  # results are copied out (share_outputs=False) before the next image
            res = [request.infer({0: x[i : i + 1]}) for i in range(len(x))]
        return [np.concatenate([r[o] for r in res]) for o in outs]

    return run


class RuntimeNetwork:
    """An exported graph (:mod:`core.export`) on ONNX Runtime or OpenVINO, on the CPU.

    ``graph``: the ONNX file's path or bytes (the fp32 graph, or the int8 one);
    ``precision``: ``fp32``, ``bf16`` (OpenVINO on native-bf16 CPUs) or ``int8`` (a graph
    quantised by :func:`core.export.quantize_int8`); ``threads``: intra-op threads (default:
    torch's setting, at most the CPUs available)."""

    def __init__(self, graph: str | Path | bytes, widths: list[int], runtime: str,
                 precision: str, threads: int = 0) -> None:
        self._run = runtime_session(graph, runtime, precision, OUTPUT_NAMES, threads)
        self.name = f"{runtime}-{precision}"
        self._widths = widths
        self.runtime, self.precision = runtime, precision

    def __call__(self, x: torch.Tensor) -> NetOutput:
        arr = np.ascontiguousarray(x.detach().cpu().float().numpy())
        logits, feats, pooled = self._run(arr)
        if len(arr) > 1:  # a batch's activations: give their pages back (~140 MB at 16 x 224 px)
            trim_heap()
        return NetOutput(torch.from_numpy(np.asarray(logits, np.float32).copy()),
                         torch.from_numpy(np.asarray(feats, np.float32).copy()),
                         _split_pooled(pooled, self._widths))
