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

Networks
--------
The predictor calls one network object (:mod:`core.network`): on the CPU by default the
run's graph exported once to ONNX (``best.onnx`` beside ``best.pt``, :mod:`core.export`)
on ONNX Runtime at fp32, which keeps PyTorch fp32's decisions; on a GPU, and with
``runtime="torch"``, the eager ``nn.Module``. A reduced precision serves only when asked
for, or with ``precision="auto"`` when the run's check passed on validation: by default
(``runtime="auto"``) OpenVINO bf16 where the CPU runs bf16 natively, else ONNX Runtime int8
(:data:`core.runs.AUTO_SERVING`). ``Prediction.network`` says which runtime and precision
answered. A run with a lung view (not ``none``) segments each image with the shipped
lung segmenter on the same runtime (``segmenter.onnx`` beside ``best.pt``, fp32; the eager
U-Net with ``runtime="torch"``); ``Prediction.segmenter`` says which. ``python -m core.bench
infer`` measures them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from core import gradcam, ood, serving, sidecars
from core.config import PreprocessConfig
from core.devices import release_free_memory, resolve_device
from core.errors import CheckpointError, ConfigError, InvalidImageError
from core.imaging import DecodedImage, decode
from core.model import load_checkpoint, preprocess_config_of
from core.network import TorchNetwork, usable_cpus
from core.preprocess import build_transform

if TYPE_CHECKING:
    from core.lungs import LungSegmenter

log = logging.getLogger(__name__)

RESEARCH_ONLY = (
    "Research use only. CXR Insight is not a medical device: its outputs are not validated "
    "for clinical use and must not be used for diagnosis, triage or treatment decisions."
)
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
        network: the runtime and precision whose outputs gave this result, e.g. ``onnx-fp32``
            (:mod:`core.network`).
        segmenter: the runtime and precision of the lung segmenter that made the lung view
            (``onnx-fp32``, ``torch-fp32``); empty for a run without a lung view.
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
    network: str = "torch-fp32"
    segmenter: str = ""
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
    network: str = ""  # the runtime and precision that answered (Predictor.network)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One decoded and preprocessed image (:meth:`Predictor.prepare`): the model input ``x``,
    the decoded grayscale image and the box of it that the model saw."""

    x: torch.Tensor  # C x S x S, normalised
    gray: np.ndarray  # the decoded image, for overlays
    box: tuple[int, int, int, int]  # (top, left, bottom, right) the model saw (lung view)
    notes: tuple[str, ...]
    lung_mask: np.ndarray | None = None  # full resolution; set by crop/mask/soft lung views

    @property
    def original_size(self) -> tuple[int, int]:
        return int(self.gray.shape[0]), int(self.gray.shape[1])


# ---------------------------------------------------------------- device, memory


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


def _as_numpy(obj: Any) -> Any:
    """Tensors (at any depth of dicts and lists) -> float64 arrays, once at load."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().double().numpy()
    if isinstance(obj, dict):
        return {k: _as_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_as_numpy(v) for v in obj)
    return obj


def _ood_stats(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    if ckpt.get("ood") is None:
        return None
    ood.check_stats(ckpt["ood"])
    return _as_numpy(ckpt["ood"])


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


def _stack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Prepared CPU tensors as one batch, copied by NumPy: ``torch.stack`` spreads a copy
    this size over torch's OpenMP threads, whose spin-wait afterwards slowed the runtime's
    call that follows by about 3.5 ms on 2 cores (20.1 -> 23.7 ms, ResNet50 at 224 px)."""
    return torch.from_numpy(np.stack([x.numpy() for x in xs]))


class Predictor:
    """A loaded run: predictions, calibrated probabilities, flags and heatmaps.

    Build with :meth:`from_checkpoint`. Thread-safe (see the module docstring); load once
    per process and share (``st.cache_resource`` in the dashboard).

    ``runtime``: ``auto`` (the exported graph on the CPU: OpenVINO bf16 or ONNX Runtime int8
    where the run's check let it serve, else ONNX Runtime fp32, :func:`core.serving.auto_serving`;
    eager torch on a GPU), ``torch``, ``onnx`` or ``openvino``; ``precision``: ``auto`` (fp32
    on the CPU unless the run's check let a reduced precision serve, :mod:`core.export`), ``fp32``,
    ``bf16``, ``fp16`` (torch on a GPU) or ``int8`` (see :mod:`core.network`).
    """

    def __init__(self, ckpt: dict[str, Any], *, device: str | torch.device = "auto",
                 runtime: str = "auto", precision: str = "auto",
                 batch_size: int = DEFAULT_BATCH_SIZE, source: str = "") -> None:
        self.source = source
        self.classes: tuple[str, ...] = tuple(str(c) for c in ckpt["classes"])
        self.preprocess: PreprocessConfig = preprocess_config_of(ckpt)
        self.arch = str(ckpt.get("arch", ""))
        self.temperature, self.calibrated, self.operating_point = _calibration(ckpt)
        self.batch_size = max(1, int(batch_size))
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            limit_threads()
        self._transform = build_transform(dataclasses.replace(self.preprocess, lung_view="none"))
        self.ood_stats = _ood_stats(ckpt)
        low = ckpt.get("low_confidence")
        self.low_confidence_threshold = float(low["threshold"]) if low else _NAN
        model = _network(ckpt)
        self._fc_weight = gradcam.classifier_layer(model).weight.detach().float().clone()
        self._net, notes = serving.open_network(ckpt, model, source=source, device=self.device,
                                               runtime=runtime, precision=precision)
        self._segmenter = (serving.open_segmenter(self._net.runtime, source)  # same runtime
                           if self.preprocess.lung_view != "none" else None)
        self._focus_segmenter: LungSegmenter | None = None  # lung focus without a lung view
        self.notes = self._static_notes(low) + notes
        self._model_lock = threading.Lock()
        # The runtime's graph holds its own weights: keep the module's structure only, and
        # its weights where no file can give them back (for the library CAM methods).
        self._model = model if isinstance(self._net, TorchNetwork) else model.to("meta")
        self._state = None if isinstance(self._net, TorchNetwork) or source else ckpt["state_dict"]
        self._net(self._example(1))  # warm-up: the runtime plans its kernels on the first call
        log.info("Predictor ready: %s, %s, %d classes, %d px, network %s on %s",
                 source or "checkpoint", self.arch, len(self.classes), self.preprocess.img_size,
                 self.network, self.device)

    @property
    def network(self) -> str:
        """The runtime and precision that answer, e.g. ``onnx-fp32`` or ``torch-bf16``."""
        return self._net.name

    @property
    def segmenter(self) -> LungSegmenter | None:
        """The lung segmenter of the run's lung view (None without one): the shipped U-Net on
        the network's runtime at fp32 (``segmenter.onnx``), or eager torch with
        ``runtime="torch"``; its ``runtime`` says which."""
        return self._segmenter

    def torch_model(self) -> nn.Module:
        """The network as an eager ``nn.Module`` (e.g. for ``core.gradcam``'s library methods
        and sanity checks). Shared: do not modify it (``core.gradcam`` works on shadow
        copies). With a runtime network its weights are read again from the checkpoint on
        first use (the exported graph holds its own copy)."""
        with self._model_lock:
            if gradcam.classifier_layer(self._model).weight.is_meta:
                if self._state is not None:
                    state = self._state
                else:
                    state = load_checkpoint(self.source)["state_dict"]
                    fc = gradcam.classifier_layer(self._model)
                    name = next(n for n, mod in self._model.named_modules() if mod is fc)
                    if not torch.equal(state[f"{name}.weight"].float(), self._fc_weight):
                        raise CheckpointError(f"{self.source} changed on disk since it was "
                                              "loaded; reload the predictor.")
                self._model.load_state_dict(state, assign=True)
                self._model.eval()
            return self._model

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto",
                        **kwargs: Any) -> Predictor:
        """Load ``models/<run>/best.pt`` (``weights_only=True``) and build a predictor.

        Keyword arguments go to the constructor (``runtime``, ``precision``, ``batch_size``).
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
        return torch.zeros(n, self.preprocess.channels, s, s)

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

            lv = lungs.apply_lung_view(gray, self.preprocess, segmenter=self._segmenter)
            view, box = lv.image, tuple(int(v) for v in lv.box)
            if lv.fallback:
                notes.append(f"Lung view fell back to the whole image: {lv.reason}.")
            lung_mask = lv.full_mask(gray.shape)
        x = self._transform(view)  # built with lung_view="none": the view is applied above
        return PreparedImage(x, gray, box, tuple(notes), lung_mask)  # type: ignore[arg-type]

    def _lung_mask(self, prep: PreparedImage) -> np.ndarray | None:
        """The lung field of a prepared image: its lung view's, else the shipped segmenter's
        on the network's runtime (None when that finds no plausible lung field)."""
        if prep.lung_mask is not None:
            return prep.lung_mask
        from core import lungs

        mask = self._lung_focus_segmenter().segment(prep.gray)
        return None if lungs.implausible(mask) else mask

    def _lung_focus_segmenter(self) -> LungSegmenter:
        """The lung view's segmenter, else (a run without one) the shipped segmenter on the
        network's runtime, opened on first use (its graph exported once into the user's
        cache, :func:`core.export.cached_segmenter_path`)."""
        if self._segmenter is not None:
            return self._segmenter
        with self._model_lock:
            if self._focus_segmenter is None:
                self._focus_segmenter = serving.open_segmenter(self._net.runtime, cache=True)
            return self._focus_segmenter

    # -- the network

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits of preprocessed tensors [N, C, S, S] (for benchmarks and audits)."""
        return self._net(x).logits

    def outputs(self, x: torch.Tensor) -> Outputs:
        """Logits, OOD scores and both flags of preprocessed tensors [N, C, S, S] (for
        audits; flags are False where unavailable)."""
        out = self._net(x)
        n = len(out.logits)
        scores = self._ood_scores(out.pooled, n)
        top = torch.softmax(out.logits.double() / self.temperature, 1).max(1).values.numpy()
        return Outputs(out.logits, scores,
                       torch.from_numpy(self.has_ood & (scores > self.ood_threshold)),
                       torch.from_numpy(self.has_low_confidence & (top < self.low_confidence_threshold)),
                       self.network)

    def _ood_scores(self, pooled: dict[str, np.ndarray], n: int) -> np.ndarray:
        if self.ood_stats is None:
            return np.full(n, _NAN)
        return np.asarray(ood.ood_score(self.ood_stats, self._ood_inputs(pooled)), np.float64)

    def _ood_inputs(self, pooled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if list(self.ood_stats["layer_names"]) == [ood.SINGLE]:  # fitted on the head's input
            return {ood.SINGLE: pooled["layer4"]}
        return pooled

    # -- results

    def _results(self, logits: torch.Tensor, pooled: dict[str, np.ndarray],
                 prepared: Sequence[PreparedImage]) -> list[Prediction]:
        z = logits.double().numpy() / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        proba = np.exp(z)
        proba /= proba.sum(axis=1, keepdims=True)
        scores = self._ood_scores(pooled, len(proba))
        out = []
        for p, score, prep in zip(proba, scores, prepared, strict=True):
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
                network=self.network,
                segmenter=self._segmenter.runtime if self._segmenter is not None else "",
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
            res = self._net(_stack([c.x for c in chunk]))  # type: ignore[union-attr]
            for i, pred in zip(idx, self._results(res.logits, res.pooled, chunk), strict=True):  # type: ignore[arg-type]
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
        ``none`` lung view this runs the shipped segmenter on the network's runtime, ~10-20
        ms; its graph is exported once into the user's cache); ``lung_contour``: draw
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
            x = _stack([c.x for c in chunk])
            res = self._net(x)
            preds = self._results(res.logits, res.pooled, chunk)
            targets = res.logits.argmax(dim=1) if t_idx is None else torch.full((len(chunk),), t_idx)
            if fast:
                maps = gradcam.upsample(self._cams(res.layer4, targets), size)
            else:
                model = self.torch_model()
                maps = gradcam.explain(model, x.to(next(model.parameters()).device), method,
                                       targets.tolist(), target_layer)
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
