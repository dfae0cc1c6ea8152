"""The inference engine: one loaded run, shared by the dashboard, the CLI and scripts.

>>> from core.inference import Predictor
>>> predictor = Predictor.from_checkpoint("models/run/best.pt")      # doctest: +SKIP
>>> p = predictor.predict("chest.png")                               # doctest: +SKIP
>>> p.label, p.decision, p.probabilities, p.ood, p.low_confidence   # doctest: +SKIP
>>> e = predictor.explain("chest.png")  # e.heatmap, e.overlay at the original resolution

What a prediction carries
-------------------------
* ``probabilities``: softmax of the logits divided by the run's **temperature** (fitted on
  validation by ``core.evaluate``), i.e. calibrated; uncalibrated when the checkpoint has none.
* ``label``: the most probable class. ``decision``: the class at the stored **operating
  point** -- the screening class when its probability reaches the threshold (set on
  validation for a target sensitivity), otherwise the most probable of the other classes
  (``core.metrics.predict_at_threshold``); equal to ``label`` when none is stored.
* ``low_confidence``: the top probability is below the run's cut-off (the 5th percentile of
  validation top probabilities, ``core.ood``). ``ood`` / ``ood_score``: the Mahalanobis
  distance of the image's features to the training X-rays exceeds the cut-off that 95 % of
  validation X-rays pass -- the input is probably not a chest X-ray like the training ones.
  Checkpoints without these statistics give ``False`` / ``nan`` and say so in ``notes``.

Threads
-------
A :class:`Predictor` holds no per-call state: every call works on its own tensors, the
network runs under ``torch.inference_mode`` (no autograd state, BatchNorm frozen), and
Grad-CAM comes from the forward pass itself (``core.gradcam``'s fast path: the class weights
of the linear head times the ``layer4`` activations, no hooks). Other CAM methods run in
``core.gradcam`` on a shadow copy of the network under that module's lock. One predictor can
therefore serve every thread and session of a Streamlit server.

Speed on CPU
------------
At load the network is specialised for inference (``backend="auto"``): BatchNorm folded
into the preceding convolutions, channels-last memory format, then a frozen TorchScript
graph (``torch.jit.freeze`` + ``optimize_for_inference``: oneDNN convolutions with
pre-packed weights and fused ReLU/add) that returns the logits *and* the ``layer4``
activations in one pass. bf16 is used only where the CPU runs it natively
(:func:`core.devices.cpu_has_native_bf16`; elsewhere oneDNN emulates it and it is ~10x
slower); CUDA uses fp16/bf16 autocast. On CPUs without native bf16 a run's **int8 network**
(:mod:`core.quantize`, stored by training when it agrees with fp32 on >= 99 % of validation)
is used instead, frozen the same way, with its own OOD and low-confidence cut-offs. int8
moves each calibrated probability by at most ``e`` (the largest change seen on validation),
so it can change the top class only where its own top-two margin is at most ``2e``: those
close calls (a few percent of images) are re-computed by the fp32 network, kept in memory
for them (``Prediction.network`` says which network answered).
``python -m core.bench infer`` measures the options.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import gradcam, ood, sidecars
from core.config import PreprocessConfig
from core.devices import release_free_memory, resolve_device, resolve_precision
from core.errors import CheckpointError, ConfigError, InvalidImageError
from core.imaging import DecodedImage, decode
from core.model import load_checkpoint, preprocess_config_of
from core.preprocess import build_transform

log = logging.getLogger(__name__)

RESEARCH_ONLY = (
    "Research use only. CXR Insight is not a medical device: its outputs are not validated "
    "for clinical use and must not be used for diagnosis, triage or treatment decisions."
)
BACKENDS = ("auto", "eager", "fused", "jit", "int8")
"""``eager``: the network as trained (fp32, contiguous); ``fused``: BatchNorm folded into the
convolutions, channels-last; ``jit``: ``fused`` frozen into an optimised TorchScript graph;
``int8``: the run's calibrated int8 network (:mod:`core.quantize`; CPU only), frozen the same
way; ``auto``: on CPU ``int8`` when the checkpoint has one and the CPU lacks native bf16,
else ``jit`` (``fused`` with bf16 autocast on CPUs with native bf16), ``fused`` with
fp16/bf16 autocast on CUDA."""
DEFAULT_BATCH_SIZE = 16
_NAN = float("nan")  # one object for "unavailable", so equal predictions compare equal

ImageInput = Any  # bytes | str | os.PathLike | PIL.Image.Image | np.ndarray | binary file object


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Prediction:
    """The result for one image (immutable; :meth:`to_dict` gives JSON-friendly types).

    Attributes:
        label: the most probable class.
        probabilities: class -> calibrated probability (sums to 1).
        decision: the class at the stored operating point (see the module docstring);
            equal to ``label`` when the checkpoint stores none.
        low_confidence: the top probability is below the run's low-confidence cut-off.
        ood: the input is unlikely to be a chest X-ray like the training images.
        ood_score: Mahalanobis distance to the training features (``nan`` when unavailable);
            compare with ``ood_threshold``.
        classes: the checkpoint's classes, in the model's output order.
        original_size: (height, width) of the decoded input image.
        confidence: the top calibrated probability.
        calibrated: probabilities use a temperature fitted on validation.
        ood_available, low_confidence_available: the checkpoint stores these statistics.
        ood_threshold, low_confidence_threshold: the cut-offs (``nan`` when unavailable).
        decision_rule: the rule that gave ``decision``, in words.
        network: ``fp32`` or ``int8``: the network whose logits gave the probabilities (the
            ``int8`` backend re-computes close calls in fp32, see the module docstring).
        notes: what a reader should know (missing statistics, lung-view fallback, EXIF...).
        research_only: the disclaimer to show beside every result.
    """

    label: str
    probabilities: dict[str, float]
    decision: str
    low_confidence: bool
    ood: bool
    ood_score: float
    classes: tuple[str, ...]
    original_size: tuple[int, int]
    confidence: float
    calibrated: bool
    ood_available: bool
    low_confidence_available: bool
    ood_threshold: float
    low_confidence_threshold: float
    decision_rule: str
    network: str = "fp32"
    notes: tuple[str, ...] = ()
    research_only: str = RESEARCH_ONLY

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["original_size"] = list(self.original_size)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True, eq=False)
class Explanation:
    """A class activation map for one image.

    Attributes:
        heatmap: float32 H x W in [0, 1] at the image's original resolution.
        overlay: RGB uint8 H x W x 3: the heatmap colour-mapped onto the original image.
        prediction: the :class:`Prediction` of the same forward pass.
        method: ``gradcam``, ``gradcam++`` or ``eigencam`` (``core.gradcam.METHODS``).
        target: the class the map explains (the top class unless one was asked for).
        lung_mask: bool H x W lung field at the original resolution (the lung view's own
            segmentation, else the shipped segmenter's); None when not asked for or when no
            plausible lung field was found.
        lung_focus: share of the heatmap's energy on the lungs divided by the lungs' share of
            the original image (1 = no preference, higher = on the lungs; a lung view's map is
            zero outside its crop; see ``core.lungs.lung_focus_ratio``); nan without a lung
            mask.
    """

    heatmap: np.ndarray
    overlay: np.ndarray
    prediction: Prediction
    method: str
    target: str
    lung_mask: np.ndarray | None = None
    lung_focus: float = math.nan


@dataclass(frozen=True, eq=False)
class Outputs:
    """What the network gives for a batch of preprocessed tensors (:meth:`Predictor.outputs`)."""

    logits: torch.Tensor  # [N, C] fp32, uncalibrated
    ood_score: np.ndarray  # [N] float64, nan without OOD statistics
    ood: torch.Tensor  # [N] bool
    low_confidence: torch.Tensor  # [N] bool
    fp32: torch.Tensor  # [N] bool: logits from the fp32 network (always, except int8 ones)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One decoded and preprocessed image (:meth:`Predictor.prepare`): the model input ``x``,
    the decoded grayscale image and the box of it that the model saw."""

    x: torch.Tensor  # C x S x S, normalised
    gray: np.ndarray  # the decoded image, for overlays
    box: tuple[int, int, int, int]  # (top, left, bottom, right) the model saw (lung view)
    notes: tuple[str, ...]
    lung_mask: np.ndarray | None = None  # full resolution; set by crop/mask lung views

    @property
    def original_size(self) -> tuple[int, int]:
        return int(self.gray.shape[0]), int(self.gray.shape[1])


# ---------------------------------------------------------------- network variants


class _Trunk(nn.Module):
    """``x -> (logits, layer4 activations, pooled layer1, layer2, layer3 activations)`` of a
    torchvision ResNet in one pass: the operations of ``model(x)`` and of
    :func:`core.gradcam.forward_with_cam`, plus the global averages that
    :func:`core.ood.pooled_layer_features` gives for the OOD score."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h1 = m.layer1(x)
        h2 = m.layer2(h1)
        h3 = m.layer3(h2)
        feats = m.layer4(h3)
        logits = m.fc(torch.flatten(m.avgpool(feats), 1))
        return logits, feats, h1.mean(dim=(2, 3)), h2.mean(dim=(2, 3)), h3.mean(dim=(2, 3))


def inference_trunk(model: nn.Module) -> nn.Module:
    """The one-pass inference network of a torchvision ResNet (see ``_Trunk``): what every
    backend runs, and what :mod:`core.quantize` quantises."""
    return _Trunk(model).eval()


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An eval-mode ResNet with every BatchNorm folded into its convolution (a copy unless
    ``inplace``).

    Same outputs up to float rounding; one op fewer per convolution. The BatchNorm modules
    become ``nn.Identity`` so that the module structure (``bn1``, ``layer4``...) stays.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = (model if inplace else copy.deepcopy(model)).eval()

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())

    fold(folded, "conv1", "bn1")
    for stage in gradcam.STAGES:
        for block in getattr(folded, stage):
            for k in (1, 2, 3):
                if hasattr(block, f"conv{k}"):
                    fold(block, f"conv{k}", f"bn{k}")
            ds = getattr(block, "downsample", None)
            if isinstance(ds, nn.Sequential) and len(ds) == 2:
                conv, bn = ds[0], ds[1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    ds[0], ds[1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _freeze(trunk: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace and freeze the trunk into an optimised TorchScript graph (oneDNN on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(trunk.eval(), example, check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
            return torch.jit.optimize_for_inference(frozen)


# ---------------------------------------------------------------- device, precision, memory


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (containers), where torch's default thread count may count the whole host."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(float(quota) / float(period))))
    return max(1, n)


def limit_threads() -> int:
    """Lower torch's intra-op threads to :func:`usable_cpus` when it is set higher (more
    threads than CPUs make every parallel region wait for descheduled threads); never
    raises it. Returns the thread count in use."""
    n = usable_cpus()
    if torch.get_num_threads() > n:
        log.info("Using %d torch threads (the CPUs available to this process), not %d", n,
                 torch.get_num_threads())
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _network(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's network, built on the meta device and given the checkpoint's tensors
    (``assign=True``): no random initialisation and no copy of the weights."""
    from core.model import build_model

    with torch.device("meta"):
        model = build_model(len(ckpt["classes"]), weights="none", arch=ckpt["arch"],
                            dropout=float(ckpt.get("dropout", 0.0)))
    try:
        model.load_state_dict(ckpt["state_dict"], assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint weights do not fit {ckpt['arch']}: {exc}") from exc
    return model.eval()


# ---------------------------------------------------------------- checkpoint contents


def _int8_usable(state: Any) -> bool:
    """A checkpoint's int8 block can serve ``backend="auto"``: present and its engine in this
    torch build. (Only asked on CPUs without native bf16, where ``auto`` means fp32.)"""
    if not isinstance(state, dict):
        return False
    from core import quantize

    return quantize.available(str(state.get("engine", quantize.DEFAULT_ENGINE)))


def _as_numpy(obj: Any) -> Any:
    """Tensors (at any depth of dicts and lists) -> float64 arrays, once at load."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().double().numpy()
    if isinstance(obj, dict):
        return {k: _as_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_as_numpy(v) for v in obj)
    return obj


def _calibration(ckpt: dict[str, Any]) -> tuple[float, bool, dict[str, Any] | None]:
    raw = ckpt.get("temperature")
    t = 1.0 if raw is None else float(raw)
    if not (math.isfinite(t) and t > 0):
        raise CheckpointError(f"Checkpoint temperature {t} is not a positive number; "
                              "recalibrate the run with `python -m core.evaluate --calibrate`.")
    op = ckpt.get("operating_point")
    if op is not None:
        if not isinstance(op, dict) or op.get("class") not in ckpt["classes"]:
            raise CheckpointError(f"Operating point {op!r} does not name a checkpoint class "
                                  f"({ckpt['classes']}); recalibrate the run.")
        thr = float(op.get("threshold", float("nan")))
        if not 0.0 <= thr <= 1.0:
            raise CheckpointError(f"Operating point threshold {thr} is not a probability.")
        op = dict(op)
    return t, raw is not None, op


class Predictor:
    """A loaded run: predictions, calibrated probabilities, flags and heatmaps.

    Build with :meth:`from_checkpoint`. Thread-safe (see the module docstring); load once
    per process and share (``st.cache_resource`` in the dashboard).
    """

    def __init__(
        self,
        ckpt: dict[str, Any],
        *,
        device: str | torch.device = "auto",
        backend: str = "auto",
        precision: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        source: str = "",
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
        self.source = source
        self.classes: tuple[str, ...] = tuple(str(c) for c in ckpt["classes"])
        self.preprocess: PreprocessConfig = preprocess_config_of(ckpt)
        self.arch = str(ckpt.get("arch", ""))
        self.temperature, self.calibrated, self.operating_point = _calibration(ckpt)
        self.batch_size = max(1, int(batch_size))
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            limit_threads()
        # On the CPU, "auto" serves fp32: bf16 changes decisions (3 of 150 real X-rays changed
        # class in a test), and the same image must get the same answer on every CPU. bf16 on
        # the CPU is opt-in (precision="bf16" with backend="fused").
        auto_precision = precision == "auto"
        if auto_precision and self.device.type == "cpu":
            precision = "fp32"
        self.amp_dtype = resolve_precision(precision, self.device)
        self._transform = build_transform(dataclasses.replace(self.preprocess, lung_view="none"))

        self.ood_stats: dict[str, Any] | None = None
        if ckpt.get("ood") is not None:
            ood.check_stats(ckpt["ood"])
            self.ood_stats = _as_numpy(ckpt["ood"])
        low = ckpt.get("low_confidence")
        self.low_confidence_threshold = float(low["threshold"]) if low else _NAN
        self.notes = self._static_notes(low)

        int8_state = ckpt.get("int8")
        if backend == "auto":
            backend = "jit" if self.device.type == "cpu" and self.amp_dtype is None else "fused"
            if backend == "jit" and auto_precision and _int8_usable(int8_state):
                backend = "int8"
        if backend in ("jit", "int8") and self.amp_dtype is not None:
            raise ConfigError(f"backend={backend!r} does not take bf16/fp16 autocast; use "
                              "backend='fused' for those")
        if backend == "int8":
            if self.device.type != "cpu":
                raise ConfigError("backend='int8' runs on the CPU only; use device='cpu'")
            if int8_state is None:
                raise ConfigError("This checkpoint has no int8 network; run `python -m "
                                  "core.quantize RUN_DIR --data-dir DATA` or use backend='jit'")
        notes = []
        self._channels_last = backend not in ("eager", "int8")
        model = self._build_model(ckpt, backend)
        self._fc_weight = gradcam.classifier_layer(model).weight.detach().float().clone()
        self._model_lock = threading.Lock()
        self._model_path: Path | None = None  # set when the weights live only in a frozen graph
        self._model = model
        self._net: nn.Module | torch.jit.ScriptModule = _Trunk(model)
        self._fp32_net: nn.Module | None = None  # the int8 backend's network for close calls
        self.fp32_margin = 0.0
        if backend == "int8":
            from core import quantize

            try:
                self._net = quantize.build(self._net, int8_state, self._example(1))
                self.fp32_margin = float(int8_state.get("fp32_margin", 0.0))
                if self.fp32_margin > 0:  # channels-last: ~40 % less memory held after a close call
                    model = model.to(memory_format=torch.channels_last)
                    self._fp32_net = _Trunk(model)
            except (quantize.QuantizationError, ConfigError) as exc:
                log.warning("int8 network unavailable (%s); using the fp32 network", exc)
                notes.append(f"The int8 network could not be built ({exc}); predictions come "
                             "from the fp32 network.")
                self._channels_last = True
                model = model.to(memory_format=torch.channels_last)
                self._net = _Trunk(model)
                backend = "jit"
        if backend == "jit":
            try:
                self._net = _freeze(self._net, self._example(1))
            except (RuntimeError, AttributeError) as exc:  # TorchScript is deprecated upstream
                log.warning("TorchScript freezing failed (%s); using the fused eager network", exc)
                backend = "fused"
        if backend in ("jit", "int8") and self._fp32_net is None and source and Path(source).is_file():
            # The frozen graph holds its own (pre-packed) weights; keep only the module
            # structure and reload the weights from the file if a library CAM needs them.
            self._model = model.to("meta")
            self._model_path = Path(source)
        self.backend = backend
        self.notes = self.notes + tuple(notes)
        if backend == "int8":  # the int8 network's own cut-offs (core.quantize), where stored
            if self.ood_stats is not None and "ood_threshold" in int8_state:
                self.ood_stats["threshold"] = float(int8_state["ood_threshold"])
            if self.has_low_confidence and "low_confidence_threshold" in int8_state:
                self.low_confidence_threshold = float(int8_state["low_confidence_threshold"])
        self._warm_up()
        log.info("Predictor ready: %s, %s, %d classes, %d px, backend %s%s on %s", source or "checkpoint",
                 self.arch, len(self.classes), self.preprocess.img_size, backend,
                 f" ({self.amp_dtype})" if self.amp_dtype else "", self.device)

    def _build_model(self, ckpt: dict[str, Any], backend: str) -> nn.Module:
        model = _network(ckpt)
        if backend != "eager":  # fused, jit and int8 start from the folded network
            model = fold_batchnorm(model, inplace=True)
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.device).eval()

    def torch_model(self) -> nn.Module:
        """The network as an ``nn.Module`` (BatchNorm folded except with ``backend="eager"``),
        e.g. for ``core.gradcam``'s library methods and sanity checks. Shared: do not modify
        it (``core.gradcam`` works on shadow copies). With the ``jit`` backend its weights are
        re-read from the checkpoint file on first use (the frozen graph holds its own copy)."""
        with self._model_lock:
            if self._model_path is not None:
                ckpt = load_checkpoint(self._model_path)
                model = self._build_model(ckpt, "fused")
                fc = gradcam.classifier_layer(model).weight.detach().float()
                if not torch.equal(fc.to(self._fc_weight.device), self._fc_weight):
                    raise CheckpointError(f"{self._model_path} changed on disk since it was "
                                          "loaded; reload the predictor.")
                self._model, self._model_path = model, None
            return self._model

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto",
                        **kwargs: Any) -> Predictor:
        """Load ``models/<run>/best.pt`` (``weights_only=True``) and build a predictor.

        Keyword arguments go to the constructor (``backend``, ``precision``, ``batch_size``).
        Raises :class:`~core.errors.CheckpointError` for a missing or unusable checkpoint.
        """
        predictor = cls(sidecars.load_run_checkpoint(path), device=device, source=str(path), **kwargs)
        release_free_memory()  # the checkpoint's tensors are garbage now
        return predictor

    # -- properties

    @property
    def has_ood(self) -> bool:
        return self.ood_stats is not None

    @property
    def has_low_confidence(self) -> bool:
        return not math.isnan(self.low_confidence_threshold)

    @property
    def ood_threshold(self) -> float:
        return float(self.ood_stats["threshold"]) if self.ood_stats else _NAN

    @property
    def decision_rule(self) -> str:
        op = self.operating_point
        if op is None:
            return "the most probable class (the checkpoint stores no operating point)"
        sens = op.get("target_sensitivity")
        why = f", set on validation for sensitivity {float(sens):.0%}" if sens is not None else ""
        return (f"{op['class']} when P({op['class']}) >= {float(op['threshold']):.4f}{why}; "
                "otherwise the most probable other class")

    def _static_notes(self, low: dict[str, Any] | None) -> tuple[str, ...]:
        notes = []
        if not self.calibrated:
            notes.append("Probabilities are not calibrated: the checkpoint has no temperature "
                         "(run `python -m core.evaluate --calibrate`).")
        if self.operating_point is None:
            notes.append("No operating point is stored: the decision is the most probable class.")
        if self.ood_stats is None:
            notes.append("Out-of-distribution check unavailable: the checkpoint has no feature "
                          "statistics (run core.ood.calibrate_run_ood on its run folder).")
        if low is None:
            notes.append("Low-confidence check unavailable: the checkpoint has no cut-off (run "
                         "core.ood.calibrate_run_ood on its run folder).")
        elif abs(float(low.get("temperature", self.temperature)) - self.temperature) > 1e-6:
            notes.append("The low-confidence cut-off was set with another temperature than the "
                         "stored one; rerun core.ood.calibrate_run_ood.")
        return tuple(notes)

    # -- preprocessing

    def _example(self, n: int) -> torch.Tensor:
        s = self.preprocess.img_size
        x = torch.zeros(n, self.preprocess.channels, s, s, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def prepare(self, image: ImageInput, name: str | None = None) -> PreparedImage:
        """Decode (``core.imaging.decode``: safe intake) and preprocess one image.

        Raises :class:`~core.errors.InvalidImageError` with a message for the user.
        """
        try:
            decoded: DecodedImage = decode(image, name=name)
        except TypeError as exc:
            raise InvalidImageError(f"{exc}. Pass the image file's bytes, its path, a PIL image "
                                    "or a NumPy array.") from None
        gray = decoded.gray
        notes = list(decoded.notes)
        view, box = gray, (0, 0, gray.shape[0], gray.shape[1])
        lung_mask = None
        if self.preprocess.lung_view != "none":
            from core import lungs

            lv = lungs.apply_lung_view(gray, self.preprocess)
            view, box = lv.image, tuple(int(v) for v in lv.box)
            if lv.fallback:
                notes.append(f"Lung view fell back to the whole image: {lv.reason}.")
            lung_mask = lv.full_mask(gray.shape)
        x = self._transform(view)  # built with lung_view="none": the view is applied above
        return PreparedImage(x, gray, box, tuple(notes), lung_mask)  # type: ignore[arg-type]

    def _lung_mask(self, prep: PreparedImage) -> np.ndarray | None:
        """The lung field of a prepared image: its lung view's, else the shipped segmenter's
        (None when that finds no plausible lung field)."""
        if prep.lung_mask is not None:
            return prep.lung_mask
        from core import lungs

        mask = lungs.default_segmenter().segment(prep.gray)
        return None if lungs.implausible(mask) else mask

    # -- the network

    def _forward(self, x: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray], torch.Tensor]:
        """(logits fp32 CPU [N, C], layer4 activations [N, K, h, w] on the device, pooled
        activations of every stage as float64 arrays, as ``core.ood.pooled_layer_features``,
        bool [N]: logits and activations came from the fp32 network).

        With the int8 backend, the images whose int8 top-two margin (calibrated
        probabilities) is at most ``fp32_margin`` get the fp32 network's logits and layer4
        activations; the pooled activations (the OOD score) stay the int8 network's, which
        its OOD cut-off was set on."""
        x = x.to(self.device, non_blocking=True)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                    logits, feats, *low = self._net(x)
            else:
                logits, feats, *low = self._net(x)
            pooled = [*low, feats.mean(dim=(2, 3))]
            arrays = {n: p.float().cpu().double().numpy() for n, p in zip(ood.LAYERS, pooled, strict=True)}
            logits = logits.float().cpu()
            if self._fp32_net is None:
                return logits, feats, arrays, torch.full((len(logits),), self.backend != "int8")
            from core.quantize import top2_margin

            close = top2_margin(logits, self.temperature) <= self.fp32_margin
            if close.any():
                idx = close.nonzero().flatten()
                x32 = x.index_select(0, idx).contiguous(memory_format=torch.channels_last)
                logits32, feats32, *_ = self._fp32_net(x32)
                logits = logits.index_copy(0, idx, logits32.float())
                feats = feats.float().index_copy(0, idx.to(feats.device), feats32.float())
            return logits, feats, arrays, close

    def _warm_up(self) -> None:
        # TorchScript's profiling executor optimises the graph over the first calls.
        for _ in range(2 if self.backend == "jit" else 1):
            self._forward(self._example(1))
        if self._fp32_net is not None:  # the close-call network too (its buffers count now)
            with torch.inference_mode():
                self._fp32_net(self._example(1).contiguous(memory_format=torch.channels_last))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits of preprocessed tensors [N, C, S, S] (for benchmarks and audits)."""
        return self._forward(x)[0]

    def outputs(self, x: torch.Tensor) -> Outputs:
        """Logits, OOD scores and both flags of preprocessed tensors [N, C, S, S] (for
        audits such as :func:`core.quantize.collect`; flags are False where unavailable)."""
        logits, _, pooled, fp32 = self._forward(x)
        n = len(logits)
        if self.ood_stats is not None:
            scores = np.asarray(ood.ood_score(self.ood_stats, self._ood_inputs(pooled)), np.float64)
        else:
            scores = np.full(n, _NAN)
        top = torch.softmax(logits.double() / self.temperature, 1).max(1).values.numpy()
        return Outputs(logits, scores,
                       torch.from_numpy(self.has_ood & (scores > self.ood_threshold)),
                       torch.from_numpy(self.has_low_confidence & (top < self.low_confidence_threshold)),
                       fp32)

    def _ood_inputs(self, pooled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if list(self.ood_stats["layer_names"]) == [ood.SINGLE]:  # fitted on the head's input
            return {ood.SINGLE: pooled["layer4"]}
        return pooled

    # -- results

    def _results(self, logits: torch.Tensor, pooled: dict[str, np.ndarray],
                 prepared: Sequence[PreparedImage], fp32: torch.Tensor) -> list[Prediction]:
        z = logits.double().numpy() / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        proba = np.exp(z)
        proba /= proba.sum(axis=1, keepdims=True)
        if self.ood_stats is not None:
            scores = ood.ood_score(self.ood_stats, self._ood_inputs(pooled))
        else:
            scores = [_NAN] * len(proba)
        out = []
        for p, score, prep, full in zip(proba, scores, prepared, fp32.tolist(), strict=True):
            top = int(p.argmax())
            out.append(Prediction(
                label=self.classes[top],
                probabilities={c: float(v) for c, v in zip(self.classes, p, strict=True)},
                decision=self.classes[self._decide(p)],
                low_confidence=bool(self.has_low_confidence and p[top] < self.low_confidence_threshold),
                ood=bool(self.has_ood and score > self.ood_threshold),
                ood_score=float(score) if self.has_ood else _NAN,
                classes=self.classes,
                original_size=prep.original_size,
                confidence=float(p[top]),
                calibrated=self.calibrated,
                ood_available=self.has_ood,
                low_confidence_available=self.has_low_confidence,
                ood_threshold=self.ood_threshold,
                low_confidence_threshold=self.low_confidence_threshold,
                decision_rule=self.decision_rule,
                network="fp32" if full else "int8",
                notes=self.notes + prep.notes,
            ))
        return out

    def _decide(self, p: np.ndarray) -> int:
        """The operating-point rule (``core.metrics.predict_at_threshold``) for one image."""
        op = self.operating_point
        if op is None:
            return int(p.argmax())
        j = self.classes.index(op["class"])
        if p[j] >= float(op["threshold"]):
            return j
        others = p.copy()
        others[j] = -np.inf
        return int(others.argmax())

    def _target_index(self, target: str | int | None) -> int | None:
        if target is None:
            return None
        if isinstance(target, str):
            if target not in self.classes:
                raise ConfigError(f"target={target!r} is not a class; choose one of: "
                                  f"{', '.join(self.classes)}")
            return self.classes.index(target)
        t = int(target)
        if not 0 <= t < len(self.classes):
            raise ConfigError(f"target={target} is out of range; classes are 0..{len(self.classes) - 1}")
        return t

    # -- public API

    def predict(self, image: ImageInput, *, name: str | None = None) -> Prediction:
        """Predict one image (bytes, a path, a PIL image, a NumPy array or a binary file).

        ``name``: the original file name, only used to recognise DICOM by its extension.
        Raises :class:`~core.errors.InvalidImageError` for input that cannot be used.
        """
        return self.predict_batch([image], names=[name])[0]  # type: ignore[return-value]

    def predict_batch(self, images: Sequence[ImageInput], *, names: Sequence[str | None] | None = None,
                      on_error: str = "raise") -> list[Prediction | InvalidImageError]:
        """Predict many images with batched forward passes (``batch_size`` at a time).

        ``on_error="raise"`` (default) raises the first :class:`InvalidImageError`;
        ``"return"`` puts the error in that image's place and goes on with the rest.
        """
        items = self._prepare_all(images, names, on_error)
        out: list[Prediction | InvalidImageError] = list(items)  # errors stay in place
        ok = [i for i, it in enumerate(items) if isinstance(it, PreparedImage)]
        for start in range(0, len(ok), self.batch_size):
            idx = ok[start : start + self.batch_size]
            chunk = [items[i] for i in idx]
            logits, _, pooled, fp32 = self._forward(torch.stack([c.x for c in chunk]))  # type: ignore[union-attr]
            for i, pred in zip(idx, self._results(logits, pooled, chunk, fp32), strict=True):  # type: ignore[arg-type]
                out[i] = pred
        return out

    def explain(self, image: ImageInput, method: str = "gradcam", target: str | int | None = None,
                *, name: str | None = None, target_layer: str = "layer4", alpha: float = 0.4,
                colormap: str = "jet", lung_focus: bool = True,
                lung_contour: bool = False) -> Explanation:
        """Prediction plus a class activation map at the image's original resolution.

        ``method``: one of ``core.gradcam.METHODS`` (``gradcam`` at ``layer4``, the
        default, comes from the forward pass itself); ``target``: a class name or index
        (default: the predicted label); ``alpha``/``colormap``: how the overlay is drawn.
        ``lung_focus``: also give the lung mask and the heatmap's lung-focus ratio (for a
        ``none`` lung view this runs the shipped segmenter, ~20 ms); ``lung_contour``: draw
        the lung outline on the overlay.
        """
        return self.explain_batch([image], method, target, names=[name], target_layer=target_layer,
                                  alpha=alpha, colormap=colormap, lung_focus=lung_focus,
                                  lung_contour=lung_contour)[0]  # type: ignore[return-value]

    def explain_batch(self, images: Sequence[ImageInput], method: str = "gradcam",
                      target: str | int | None = None, *, names: Sequence[str | None] | None = None,
                      target_layer: str = "layer4", alpha: float = 0.4, colormap: str = "jet",
                      lung_focus: bool = True, lung_contour: bool = False,
                      on_error: str = "raise") -> list[Explanation | InvalidImageError]:
        """:meth:`explain` for a gallery, with batched forward passes; ``on_error`` as in
        :meth:`predict_batch`."""
        if method not in gradcam.METHODS:
            raise ConfigError(f"method={method!r} is not valid; choose one of: "
                              f"{', '.join(gradcam.METHODS)}")
        if colormap not in gradcam.COLORMAPS:
            raise ConfigError(f"colormap={colormap!r} is not valid; choose one of: "
                              f"{', '.join(gradcam.COLORMAPS)}")
        gradcam.resolve_layer(self._model, target_layer)  # validates the name (structure only)
        t_idx = self._target_index(target)
        items = self._prepare_all(images, names, on_error)
        out: list[Explanation | InvalidImageError] = list(items)  # type: ignore[arg-type]
        ok = [i for i, it in enumerate(items) if isinstance(it, PreparedImage)]
        size = (self.preprocess.img_size, self.preprocess.img_size)
        fast = method == "gradcam" and target_layer == "layer4"
        for start in range(0, len(ok), self.batch_size):
            idx = ok[start : start + self.batch_size]
            chunk: list[PreparedImage] = [items[i] for i in idx]  # type: ignore[misc]
            x = torch.stack([c.x for c in chunk])
            logits, feats, pooled, fp32 = self._forward(x)
            preds = self._results(logits, pooled, chunk, fp32)
            targets = logits.argmax(dim=1) if t_idx is None else torch.full((len(chunk),), t_idx)
            if fast:
                maps = gradcam.upsample(self._cams(feats, targets), size)
            else:
                x_dev = x.to(self.device)
                if self._channels_last:
                    x_dev = x_dev.contiguous(memory_format=torch.channels_last)
                maps = gradcam.explain(self.torch_model(), x_dev, method, targets.tolist(),
                                       target_layer)
            for i, prep, pred, hm, t in zip(idx, chunk, preds, maps, targets.tolist(), strict=True):
                heat = self._to_original(hm, prep)
                over = gradcam.overlay(prep.gray, heat, alpha=alpha, colormap=colormap)
                mask, focus = None, math.nan
                if lung_focus or lung_contour:
                    from core import lungs

                    mask = self._lung_mask(prep)
                    if mask is not None:  # on the original image (zero outside a lung crop)
                        focus = lungs.lung_focus_ratio(heat, mask)
                        if lung_contour:
                            over = lungs.draw_lung_contour(over, mask)
                out[i] = Explanation(heat, over, pred, method, self.classes[int(t)], mask, focus)
        return out

    # -- helpers

    def _prepare_all(self, images: Sequence[ImageInput], names: Sequence[str | None] | None,
                     on_error: str) -> list[PreparedImage | InvalidImageError]:
        if on_error not in ("raise", "return"):
            raise ConfigError(f"on_error={on_error!r} is not valid; choose raise or return")
        if isinstance(images, bytes | bytearray | str | Path | np.ndarray):
            raise TypeError("predict_batch/explain_batch expect a list of images; use "
                            "predict/explain for one image")
        images = list(images)
        names = list(names) if names is not None else [None] * len(images)
        if len(names) != len(images):
            raise ValueError(f"{len(images)} images but {len(names)} names")
        items: list[PreparedImage | InvalidImageError] = []
        for image, name in zip(images, names, strict=True):
            try:
                items.append(self.prepare(image, name))
            except InvalidImageError as exc:
                if on_error == "raise":
                    raise
                items.append(exc)
        return items

    def _cams(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Grad-CAM at layer4 from the activations: ``core.gradcam.forward_with_cam``'s
        formula (ReLU of the class weights times the activations, min-max normalised)."""
        w = self._fc_weight[targets.to(self._fc_weight.device)].float()
        cams = torch.relu(torch.einsum("nk,nkhw->nhw", w, feats.float()))
        flat = cams.flatten(1)
        lo = flat.min(dim=1).values.view(-1, 1, 1)
        span = flat.max(dim=1).values.view(-1, 1, 1) - lo
        return torch.where(span > 0, (cams - lo) / span.clamp_min(1e-30), torch.zeros_like(cams))

    def _to_original(self, heatmap: np.ndarray, prep: PreparedImage) -> np.ndarray:
        """Model-input heatmap -> the original image's pixel grid (letterbox and lung crop undone)."""
        top, left, bottom, right = prep.box
        inner = gradcam.to_original(heatmap, (bottom - top, right - left),
                                    self.preprocess.img_size, self.preprocess.resize_mode)
        if (top, left, bottom, right) == (0, 0, *prep.original_size):
            return np.clip(inner, 0.0, 1.0).astype(np.float32)
        full = np.zeros(prep.original_size, np.float32)
        full[top:bottom, left:right] = np.clip(inner, 0.0, 1.0)
        return full
