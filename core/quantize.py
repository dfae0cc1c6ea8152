"""Post-training static int8 quantisation of a run's network, for fast CPU inference.

Why
---
On a CPU without native bf16 (AVX2 only, most laptops and many servers) an fp32 ResNet50
at 224 px takes ~110 ms per image on two cores, and bf16 is emulated (~10x slower). int8
convolutions (``VPMADDUBSW``/VNNI through fbgemm/oneDNN) run the same network in about a
third of the time. ``python -m core.bench infer`` measures it against the plain fp32 model.

How (PyTorch's own FX graph-mode quantisation, ``torch.ao.quantization``; nothing hand-made)
--------------------------------------------------------------------------------------------
1. The inference network of :mod:`core.inference` (BatchNorm folded, one pass returning
   the logits, the ``layer4`` activations for Grad-CAM and the pooled stage activations for
   the OOD score) is prepared for the ``onednn`` engine (default): the folded BatchNorms'
   placeholders removed so that each convolution fuses with its ReLU, per-channel int8
   weights, histogram observers on 7-bit activations (:func:`_qconfig_mapping`).
2. **Calibration**: a seeded sample of the run's *training* images (the checkpoint's
   preprocessing contract, no augmentation) passes through it; the observers record the
   activation ranges.
3. **Check and close calls**: the int8 network is compared with the fp32 one on the run's
   *validation* images. int8 changes each calibrated probability a little (by at most ``e``
   there), so it can flip the top class only where its top-two margin is at most ``2 e``;
   the predictor re-computes those close calls with the fp32 network (a few percent of
   images; :func:`close_call_check`). Stored only when the predictor's top-1 agreement with
   fp32 (estimated out of sample by cross-fitting the margin) is at least ``min_agreement``
   (99 % by default) and at most ``max_fp32_share`` of the images need fp32; also recorded:
   int8's own agreement, the largest probability change, and agreement of the
   out-of-distribution and low-confidence flags.
4. **Storage**: only the observers' statistics (plain tensors) go into ``best.int8.pt`` beside
   ``best.pt`` (read back as ``ckpt["int8"]`` by ``core.sidecars.load_run_checkpoint``) with the engine, the graph version, the torch version, the close-call
   margin, the int8 network's own OOD / low-confidence cut-offs and the check's figures; it still
   loads with ``torch.load(..., weights_only=True)``. At load the predictor repeats step 1,
   restores the statistics and converts (a few seconds): the same int8 network, with no
   pickled code.

The predictor uses it by default on CPUs without native bf16 (``backend="auto"``); pass
``backend="jit"`` for the exact fp32 network. Grad-CAM's fast path uses the int8 network's
``layer4`` activations (dequantised; the fp32 ones for a close call); the other CAM methods
run on the fp32 network.

FX graph-mode quantisation is in maintenance upstream (its successor, PT2E, needs
``torch.compile``'s compiler, which gave no gain here and takes minutes to start). If the
API is missing or the stored statistics no longer fit (another torch version), the
predictor logs why and falls back to the fp32 network.

``python -m core.quantize RUN_DIR --data-dir DATA`` does steps 2-4 for a finished run;
``core.train`` runs it at the end of training (``--no-int8`` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ConfigError, CXRError

log = logging.getLogger(__name__)

KEY = "int8"
ENGINES = ("onednn", "x86", "fbgemm")
DEFAULT_ENGINE = "onednn"
GRAPH_VERSION = 2  # 2: folded-BatchNorm placeholders removed, conv+ReLU fused; 7-bit activations
DEFAULT_CALIBRATION_IMAGES = 512
DEFAULT_AGREEMENT_IMAGES = 1000
DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_MAX_FP32_SHARE = 0.25
_OBSERVER = "activation_post_process"


class QuantizationError(CXRError, RuntimeError):
    """int8 quantisation is unavailable here or did not match the fp32 network closely enough."""


def available(engine: str = DEFAULT_ENGINE) -> bool:
    """True when this torch build has FX graph-mode quantisation and the engine."""
    try:
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: F401
    except ImportError:
        return False
    return engine in torch.backends.quantized.supported_engines


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not valid; choose one of: {', '.join(ENGINES)}")
    if not available(engine):
        raise QuantizationError(
            f"int8 quantisation with the {engine!r} engine is not available in this torch build "
            f"(engines: {', '.join(torch.backends.quantized.supported_engines)}); use the fp32 "
            "network (backend='jit').")


def _qconfig_mapping(engine: str) -> Any:
    """The engine's default mapping (per-channel int8 weights, histogram-calibrated
    activations) with every activation at 7 bits (``reduce_range``), as fbgemm does by
    default: CPUs without VNNI (AVX2) multiply u8 x s8 pairs into 16-bit sums, which
    full-range activations can saturate. Measured on a 224 px run with ``onednn``: OOD flag
    agreement with fp32 92 % -> 98 % on validation, fewer close calls."""
    from torch.ao.quantization import (
        HistogramObserver,
        QConfig,
        default_per_channel_weight_observer,
        get_default_qconfig_mapping,
    )

    return get_default_qconfig_mapping(engine).set_global(QConfig(
        activation=HistogramObserver.with_args(reduce_range=True),
        weight=default_per_channel_weight_observer))


def _fusable(trunk: nn.Module) -> nn.Module:
    """A copy of the trunk as an FX graph without the ``nn.Identity`` placeholders that
    BatchNorm folding leaves between each convolution and its ReLU, so that FX quantisation
    fuses them (one quantised conv+ReLU: ~15 % faster, and the ReLU's 7 bits all positive)."""
    gm = torch.fx.symbolic_trace(copy.deepcopy(trunk).eval())
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _prepare(trunk: nn.Module, engine: str, example: torch.Tensor) -> nn.Module:
    """The observed (not yet quantised) FX graph of an fp32 inference trunk."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    _check_engine(engine)
    torch.backends.quantized.engine = engine  # process-wide; the packed weights follow it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        return prepare_fx(_fusable(trunk), _qconfig_mapping(engine), (example,))


def _release_graphs() -> None:
    """Drop the FX quantisation's module cache.

    ``torch.ao.quantization.fx.utils.assert_and_get_unique_device`` is an unbounded
    ``functools.cache`` keyed by module: it keeps every prepared graph alive, and with it (through
    the qconfigs' device closures) a full fp32 copy of the network, ~100 MB per build. Nothing
    else holds those graphs once :func:`calibrate` / :func:`build` return.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from torch.ao.quantization.fx import utils

        utils.assert_and_get_unique_device.cache_clear()


def observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The activation observers' statistics of a prepared graph (plain tensors)."""
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if _OBSERVER in k}


def calibrate(trunk: nn.Module, batches: Iterable[torch.Tensor], engine: str = DEFAULT_ENGINE,
              ) -> dict[str, torch.Tensor]:
    """Run preprocessed batches [N, C, S, S] through the observed trunk; return the
    observers' statistics (what :func:`build` needs)."""
    prepared = None
    n = 0
    with torch.no_grad():
        for x in batches:
            x = x.float().contiguous()
            if prepared is None:
                prepared = _prepare(trunk, engine, x[:1])
            prepared(x)
            n += len(x)
    if prepared is None or n == 0:
        raise QuantizationError("No calibration images: int8 calibration needs some of the "
                                "run's training images.")
    state = observer_state(prepared)
    del prepared
    _release_graphs()
    return state


def build(trunk: nn.Module, state: dict[str, Any], example: torch.Tensor) -> torch.jit.ScriptModule:
    """The int8 trunk from an fp32 trunk and a checkpoint's ``int8`` block, traced and frozen
    (TorchScript) like the fp32 ``jit`` backend. Raises :class:`QuantizationError` when the
    statistics do not fit this network or torch version."""
    from torch.ao.quantization.quantize_fx import convert_fx

    engine = str(state.get("engine", DEFAULT_ENGINE))
    observers = state.get("observers")
    if not isinstance(observers, dict) or not observers:
        raise QuantizationError("The checkpoint's int8 block has no observer statistics; rerun "
                                "`python -m core.quantize` on the run.")
    if state.get("graph") != GRAPH_VERSION:
        raise QuantizationError(
            f"The checkpoint's int8 statistics were made for another quantised graph (version "
            f"{state.get('graph', 1)}, this version of CXR Insight builds {GRAPH_VERSION}); "
            "rerun `python -m core.quantize` on the run.")
    prepared = _prepare(trunk, engine, example)
    expected = set(observer_state(prepared))
    if set(observers) != expected:
        raise QuantizationError(
            f"The checkpoint's int8 statistics ({len(observers)} tensors, made with torch "
            f"{state.get('torch', '?')}) do not fit this network under torch "
            f"{torch.__version__} ({len(expected)} expected); rerun `python -m core.quantize`.")
    try:
        prepared.load_state_dict(observers, strict=False)
        with warnings.catch_warnings():
            # TracerWarning: the quantisation scales are read as Python floats, i.e. traced as
            # the constants they are.
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning,
                                             torch.jit.TracerWarning))
            quantized = convert_fx(prepared)
            with torch.inference_mode(False), torch.no_grad():
                return torch.jit.freeze(torch.jit.trace(quantized.eval(), example.contiguous(),
                                                        check_trace=False).eval())
    except (RuntimeError, AttributeError) as exc:
        raise QuantizationError(f"Could not build the int8 network: {exc}") from exc
    finally:
        del prepared
        _release_graphs()


# ---------------------------------------------------------------- a finished run


def _loader(data_dir: str | Path, rows: list[dict[str, str]], classes: list[str],
            ckpt: dict[str, Any], batch_size: int, workers: int) -> Any:
    from torch.utils.data import DataLoader

    from core.model import preprocess_config_of
    from core.scoring import evaluation_dataset

    ds = evaluation_dataset(data_dir, rows, classes, preprocess_config_of(ckpt))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


def _sample(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    if n <= 0 or len(rows) <= n:
        return list(rows)
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return [rows[i] for i in idx]


def collect(predictor: Any, loader: Iterable[Any], progress: bool = False,
            desc: str = "outputs") -> Any:
    """:meth:`core.inference.Predictor.outputs` over every batch of a loader, concatenated."""
    from tqdm.auto import tqdm

    from core.inference import Outputs

    parts = [predictor.outputs(x) for x, *_ in tqdm(loader, desc=desc, leave=False,
                                                    disable=not progress, unit="batch")]
    if not parts:
        raise QuantizationError("No images to run: the split is empty.")
    return Outputs(torch.cat([p.logits for p in parts]), np.concatenate([p.ood_score for p in parts]),
                   torch.cat([p.ood for p in parts]), torch.cat([p.low_confidence for p in parts]),
                   torch.cat([p.fp32 for p in parts]))


def top2_margin(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Top-1 minus top-2 calibrated probability of each row of logits [N, C] (float64)."""
    top2 = torch.softmax(logits.double() / temperature, 1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def close_call_check(reference: torch.Tensor, int8: torch.Tensor, temperature: float,
                     seed: int = 0) -> dict[str, float]:
    """The close-call rule of the int8 predictor, set and checked on the same images' fp32 and
    int8 logits [N, C].

    If int8 moves every calibrated probability of an image by at most ``e``, its top class
    can differ from fp32's only where its own top-two margin is at most ``2 e`` (the fp32
    top class is at most ``2 e`` behind in int8). ``fp32_margin`` is ``2 e`` with ``e`` the
    largest change on these images; the predictor re-computes images under it in fp32.

    Returns ``fp32_margin``, ``fp32_share`` (the share of these images under it),
    ``top1_agreement_int8_only`` and ``top1_agreement``: the rule's agreement with fp32
    estimated out of sample by two-fold cross-fitting (margin set on one half, agreement
    counted on the other, both ways; in sample it is 1 by construction).
    """
    pr = torch.softmax(reference.double() / temperature, 1)
    pc = torch.softmax(int8.double() / temperature, 1)
    change = (pr - pc).abs().max(dim=1).values
    margin = top2_margin(int8, temperature)
    ref_top, int8_top = pr.argmax(1), pc.argmax(1)
    n = len(pr)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    halves = (perm[: n // 2], perm[n // 2 :]) if n >= 2 else (perm, perm)

    def agreeing(fit: torch.Tensor, held: torch.Tensor) -> int:
        use_fp32 = margin[held] <= 2 * float(change[fit].max())
        top = torch.where(use_fp32, ref_top[held], int8_top[held])
        return int((top == ref_top[held]).sum())

    a, b = halves
    held_out = (agreeing(a, b) + agreeing(b, a)) / (len(a) + len(b))
    fp32_margin = 2 * float(change.max())
    return {"fp32_margin": fp32_margin,
            "fp32_share": float((margin <= fp32_margin).double().mean()),
            "top1_agreement_int8_only": float((ref_top == int8_top).double().mean()),
            "top1_agreement": float(held_out)}


def agreement(reference: Any, candidate: Any, temperature: float) -> dict[str, Any]:
    """How closely two :class:`core.inference.Outputs` of the same images agree: top-1, the
    largest change of a calibrated probability, and both flags."""
    n = len(reference.logits)
    pr = torch.softmax(reference.logits.double() / temperature, 1)
    pc = torch.softmax(candidate.logits.double() / temperature, 1)
    return {
        "n": n,
        "top1_agreement": float((pr.argmax(1) == pc.argmax(1)).double().mean()),
        "max_abs_dp": float((pr - pc).abs().max()),
        "ood_flag_agreement": float((reference.ood == candidate.ood).double().mean()),
        "low_confidence_flag_agreement": float(
            (reference.low_confidence == candidate.low_confidence).double().mean()),
    }


def calibrate_run_int8(
    run_dir: str | Path,
    data_dir: str | Path,
    *,
    engine: str = DEFAULT_ENGINE,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    agreement_images: int = DEFAULT_AGREEMENT_IMAGES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_fp32_share: float = DEFAULT_MAX_FP32_SHARE,
    batch_size: int = 32,
    workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    allow_manifest_change: bool = False,
) -> dict[str, Any]:
    """Calibrate (train split), check (validation split) and store the int8 network of a
    finished run in ``best.int8.pt`` beside its ``best.pt`` (``core.sidecars``; ``best.pt``
    is not modified). Writes ``int8.json`` beside it with the settings and figures, and
    returns them. See :func:`core.data.run_split_rows` for ``allow_manifest_change``.

    The validation images also set the close-call margin under which the predictor
    re-computes an image in fp32 (:func:`close_call_check`) and the int8 network's OOD and
    low-confidence cut-offs. Raises :class:`QuantizationError` (nothing stored) when the
    predictor's top-1 agreement with fp32 (cross-fitted on validation) is below
    ``min_agreement``, or when more than ``max_fp32_share`` of the validation images would
    need the fp32 network (no speed left to gain).
    """
    import json

    from core import sidecars
    from core.data import run_split_rows
    from core.files import file_sha256
    from core.inference import Predictor, fold_batchnorm, inference_trunk
    from core.model import model_from_checkpoint

    _check_engine(engine)
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement={min_agreement} must lie in [0, 1]")
    if not 0.0 <= max_fp32_share <= 1.0:
        raise ConfigError(f"max_fp32_share={max_fp32_share} must lie in [0, 1]")
    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    sha = file_sha256(best) if best.is_file() else ""
    ckpt = sidecars.load_run_checkpoint(best, parts=("calibration", "ood"))
    classes = list(ckpt["classes"])
    splits, _ = run_split_rows(run_dir, data_dir, ckpt, ("train", "val"),
                               allow_manifest_change=allow_manifest_change)
    t0 = time.perf_counter()
    calib_rows = _sample(splits["train"], calibration_images, seed)
    trunk = inference_trunk(fold_batchnorm(model_from_checkpoint(ckpt), inplace=True))
    batches = (x for x, *_ in _tqdm(_loader(data_dir, calib_rows, classes, ckpt, batch_size, workers),
                                     progress, "int8 calibration"))
    state: dict[str, Any] = {"engine": engine, "graph": GRAPH_VERSION, "torch": str(torch.__version__),
                             "observers": calibrate(trunk, batches, engine),
                             "calibration_images": len(calib_rows)}
    candidate = dict(ckpt, **{KEY: state})
    reference = Predictor(ckpt, device="cpu", backend="jit", precision="fp32")
    int8 = Predictor(candidate, device="cpu", backend="int8", precision="fp32")
    if int8.backend != "int8":
        raise QuantizationError("The int8 network could not be built here; see the log.")
    val_rows = _sample(splits["val"], agreement_images, seed)
    loader = _loader(data_dir, val_rows, classes, ckpt, batch_size, workers)
    ref_out = collect(reference, loader, progress, "fp32 (val)")
    out = collect(int8, loader, progress, "int8 (val)")  # int8 alone: no close-call margin yet
    close = close_call_check(ref_out.logits, out.logits, reference.temperature, seed)
    state["fp32_margin"] = close["fp32_margin"]
    redo = top2_margin(out.logits, reference.temperature) <= close["fp32_margin"]
    out = dataclasses.replace(out, logits=torch.where(redo[:, None], ref_out.logits, out.logits),
                              fp32=redo)  # what the predictor gives on these images
    # The int8 network's own cut-offs, set on the same validation images the same way as
    # core.ood sets the fp32 ones, so that their stated rates hold for the network that serves
    # (int8 shifts the pooled features a little); the flags are compared under them.
    fp32_cutoff_pass = float((~out.ood).double().mean())
    if ckpt.get("ood") is not None:
        state["ood_threshold"] = float(np.quantile(out.ood_score, float(ckpt["ood"]["pass_rate"])))
        out = dataclasses.replace(out, ood=torch.from_numpy(out.ood_score > state["ood_threshold"]))
    if ckpt.get("low_confidence") is not None:
        low = ckpt["low_confidence"]
        top = torch.softmax(out.logits.double() / float(low["temperature"]), 1).max(1).values
        state["low_confidence_threshold"] = float(np.quantile(top.numpy(), float(low["quantile"])))
        out = dataclasses.replace(out, low_confidence=top < state["low_confidence_threshold"])
    check = agreement(ref_out, out, reference.temperature)
    check["top1_agreement_in_sample"] = check["top1_agreement"]
    check.update(close)
    if ckpt.get("ood") is not None:
        check["ood_pass_rate_fp32_cutoff"] = fp32_cutoff_pass
        check["ood_pass_rate"] = float((~out.ood).double().mean())
    state["check"] = {"split": "val", **check}
    summary = {"engine": engine, "torch": str(torch.__version__),
               "calibration_images": len(calib_rows), "check": state["check"],
               "min_agreement": min_agreement, "max_fp32_share": max_fp32_share,
               "seconds": round(time.perf_counter() - t0, 1)}
    problem = None
    if check["top1_agreement"] < min_agreement:
        problem = (f"the int8 predictor's top-1 agreement with fp32 on {check['n']} validation "
                   f"images (cross-fitted) is {check['top1_agreement']:.2%}, below "
                   f"{min_agreement:.0%}")
    elif check["fp32_share"] > max_fp32_share:
        problem = (f"{check['fp32_share']:.0%} of the validation images fall within the "
                   f"close-call margin {check['fp32_margin']:.3f} and would need the fp32 network "
                   f"(at most {max_fp32_share:.0%})")
    if problem:
        summary["stored"] = False
        (run_dir / "int8.json").write_text(json.dumps(summary, indent=2) + "\n")
        raise QuantizationError(
            f"{problem}: not stored, the predictor keeps the fp32 network. Try more "
            "--calibration-images or another --engine.")
    sidecars.write_int8(best, state, weights_sha256=sha)  # best.pt itself is not modified
    summary["stored"] = True
    (run_dir / "int8.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("int8 network for %s (%s engine, %d calibration images), on %d val images: top-1 "
             "agreement %.2f%% (int8 alone %.2f%%), close calls re-computed in fp32 %.1f%% "
             "(margin %.3f); %.1f s", best, engine, len(calib_rows), check["n"],
             100 * check["top1_agreement"], 100 * check["top1_agreement_int8_only"],
             100 * check["fp32_share"], check["fp32_margin"], summary["seconds"])
    return summary


def _tqdm(it: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, disable=not progress, unit="batch")


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m core.quantize",
        description="Calibrate, check and store the int8 CPU network of a finished run "
        "(post-training static quantisation). The predictor then uses it on CPUs without "
        "native bf16.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = ap.add_argument_group("run")
    g.add_argument("run_dir", help="the run folder (best.pt and manifest.csv)")
    g.add_argument("--data-dir", required=True, help="the data folder the run was trained on")
    g = ap.add_argument_group("quantisation")
    g.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                   help="quantised kernels (onednn: fastest here, 34 vs 42 ms per 224 px "
                        "image; x86 picks fbgemm or oneDNN per operator)")
    g.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   help="training images for the activation ranges (0 = all)")
    g = ap.add_argument_group("check")
    g.add_argument("--agreement-images", type=int, default=DEFAULT_AGREEMENT_IMAGES,
                   help="validation images compared with fp32 (0 = all)")
    g.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help="least top-1 agreement with fp32 (int8 plus fp32 close calls, "
                        "cross-fitted) to store the int8 network")
    g.add_argument("--max-fp32-share", type=float, default=DEFAULT_MAX_FP32_SHARE,
                   help="most validation images that may need the fp32 network (close calls)")
    g = ap.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--workers", type=int, default=0, help="data-loading processes")
    g.add_argument("--seed", type=int, default=0, help="seed of the image samples")
    g.add_argument("--allow-manifest-change", action="store_true",
                   help="go on when the run's manifest.csv is not the one it was trained on")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = calibrate_run_int8(
            args.run_dir, args.data_dir, engine=args.engine,
            calibration_images=args.calibration_images, agreement_images=args.agreement_images,
            min_agreement=args.min_agreement, max_fp32_share=args.max_fp32_share,
            batch_size=args.batch_size, workers=args.workers,
            seed=args.seed, progress=args.progress,
            allow_manifest_change=args.allow_manifest_change)
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    c = summary["check"]
    log.info("stored: top-1 agreement %.2f%% on %d val images (%.1f%% re-computed in fp32)",
             100 * c["top1_agreement"], c["n"], 100 * c["fp32_share"])
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
