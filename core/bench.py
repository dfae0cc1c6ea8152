"""Benchmarks: ``python -m core.bench <subcommand>``; each prints its figures as one line.

Structure: one function per subcommand, registered in :data:`SUBCOMMANDS` with the function
that adds its arguments. To add a benchmark, write ``add_<name>_args(parser)`` and
``bench_<name>(args) -> int`` and register them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import recipes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- metrics


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=3000, help="predictions (default %(default)s)")
    p.add_argument("--classes", type=int, default=3, help="classes (default %(default)s)")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is shown")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="leave out the occlusion-probe scores")
    p.add_argument("--seed", type=int, default=0)


def bench_metrics(args: argparse.Namespace) -> int:
    """Time the full metric report (core.report.score_predictions) on synthetic predictions.

    Covers everything evaluation computes after inference: calibration before/after, ROC-AUC
    and AP, count metrics at argmax and at an operating point, curves, and (by default) the
    two occlusion-probe conditions, all with the shared stratified bootstrap.
    """
    from core import metrics as M
    from core.report import score_predictions
    from core.scoring import Predictions

    rng = np.random.default_rng(args.seed)
    k, n = args.classes, args.n
    y = rng.integers(0, k, n)
    logits = 3.0 * (1.2 * np.eye(k)[y] + rng.normal(size=(n, k)))
    probes = {p: 3.0 * (0.6 * np.eye(k)[y] + rng.normal(size=(n, k)))
              for p in ("periphery", "centre")} if args.probe else {}
    classes = [f"class{j}" for j in range(k)]
    preds = Predictions([f"{i}.png" for i in range(n)], y, logits, classes, probes)
    temperature = M.fit_temperature(logits, y)
    thr, achieved = M.threshold_for_sensitivity(M.softmax_t(logits, temperature)[:, 0], y == 0, 0.95)
    op = {"class": classes[0], "threshold": thr, "target_sensitivity": 0.95,
          "achieved_val_sensitivity": achieved}
    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        score_predictions(preds, temperature=temperature, operating_point=op,
                          n_resamples=args.resamples, seed=args.seed)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    M.bootstrap_weights(y, args.resamples, args.seed)
    t_weights = time.perf_counter() - t0
    print(f"metrics: n={n} classes={k} resamples={args.resamples} probe={args.probe}: "
          f"full report {min(times):.2f} s (best of {len(times)}; "
          f"median {float(np.median(times)):.2f} s), of which drawing the resamples "
          f"{t_weights:.2f} s")
    return 0


# ---------------------------------------------------------------- train


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet (default %(default)s)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians shown")
    p.add_argument("--head-images", type=int, default=128,
                   help="images in the head-mode epoch comparison")


def _train_images_per_s(model, x, y, steps: int, channels_last: bool, amp_dtype) -> float:
    import torch

    from core.train import train_one_epoch, weighted_loss

    loader = [(x, y)] * steps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = torch.device("cpu")
    train_one_epoch(model, lambda o, t: weighted_loss(o, t, None), opt, loader[:1], device, 0,
                    amp_dtype, None, channels_last, progress=False)  # warm-up
    stats = train_one_epoch(model, lambda o, t: weighted_loss(o, t, None), opt, loader, device,
                            0, amp_dtype, None, channels_last, progress=False)
    return stats["images_per_s"]


def bench_train(args: argparse.Namespace) -> int:
    """Training throughput: a plain fp32 eager loop against the project's default path.

    Both use the same ResNet, random data and ``core.train.train_one_epoch``; the baseline
    keeps the default memory format and fp32, the default path uses what ``python -m
    core.train`` picks on this machine (channels_last; bf16 autocast only on CPUs with native
    bf16). Rounds alternate A/B so that machine noise hits both. Then one ``head``-mode epoch
    over cached features against the same epoch recomputing the frozen backbone.
    """
    import torch
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    from core.devices import cpu_has_native_bf16, resolve_precision
    from core.train import extract_features

    torch.manual_seed(0)
    device = torch.device("cpu")
    amp = resolve_precision("auto", device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 3, (args.batch_size,))
    base_model = getattr(torchvision.models, args.arch)(num_classes=3)
    fast_model = getattr(torchvision.models, args.arch)(num_classes=3).to(
        memory_format=torch.channels_last)
    base, fast = [], []
    for _ in range(args.rounds):
        base.append(_train_images_per_s(base_model, x, y, args.steps, False, None))
        fast.append(_train_images_per_s(fast_model, x, y, args.steps, True, amp))
    b, f = float(np.median(base)), float(np.median(fast))
    print(f"train: {args.arch} {args.img_size}px batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads, native bf16: {cpu_has_native_bf16()}")
    print(f"train: plain fp32 eager {b:.2f} img/s | default path (channels_last, "
          f"{'bf16 autocast' if amp else 'fp32'}) {f:.2f} img/s | ratio {f / b:.2f}x (target 1.8x)")

    # head mode: an epoch over cached features vs one that runs the frozen backbone
    n = args.head_images
    imgs = torch.randn(n, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 3, (n,))
    net = getattr(torchvision.models, args.arch)(num_classes=3).to(memory_format=torch.channels_last)
    head = torch.nn.Linear(net.fc.in_features, 3)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(imgs, labels), batch_size=32)

    t0 = time.perf_counter()
    feats, ys = extract_features(net, loader, device, amp, True, progress=False)
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    for fx, fy in DataLoader(TensorDataset(feats, ys), batch_size=32, shuffle=True):
        loss = torch.nn.functional.cross_entropy(head(fx), fy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    net.fc = torch.nn.Identity()
    net.eval()
    for bx, by in loader:
        with torch.no_grad():
            fx = net(bx.contiguous(memory_format=torch.channels_last))
        loss = torch.nn.functional.cross_entropy(head(fx), by)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t_uncached = time.perf_counter() - t0
    print(f"train: head-mode epoch over {n} images: cached features {t_cached * 1000:.1f} ms vs "
          f"recomputing the backbone {t_uncached:.2f} s | ratio {t_uncached / t_cached:.0f}x "
          f"(target 20x); the one-off cache costs {t_cache:.2f} s")
    return 0


# ---------------------------------------------------------------- infer


_INFER_RSS_SCRIPT = r"""
import gc, json, sys
def rss_mb():
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
import torch, torchvision  # noqa: E401,F401
gc.collect()
before = rss_mb()
from core.inference import Predictor
runtime, precision = sys.argv[3].split("-") if "-" in sys.argv[3] else ("auto", "auto")
p = Predictor.from_checkpoint(sys.argv[1], device="cpu", runtime=runtime, precision=precision)
p.explain(open(sys.argv[2], "rb").read())
gc.collect()
after = rss_mb()
paths = [q for q in open(sys.argv[4]).read().split("\n") if q]
for path in paths:  # then many distinct images: allocator and arena growth
    p.explain(open(path, "rb").read())
p.predict_batch([open(q, "rb").read() for q in paths][:16])
gc.collect()
print(json.dumps({"before": before, "after": after, "steady": rss_mb(), "n": len(paths),
                  "network": p.network}))
"""


def add_infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="a run's best.pt (default: build a random-init ResNet50 at --img-size); "
                        "its exported graphs are written beside it")
    p.add_argument("--img-size", type=int, default=224,
                   help="input size of the built checkpoint (default %(default)s)")
    from core.config import LUNG_VIEWS

    p.add_argument("--lung-view", choices=LUNG_VIEWS, default="none",
                   help="lung view of the built checkpoint (with --checkpoint, the run's own): "
                        "with one, the predict time includes the lung segmenter, and its "
                        "share is reported (default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="real X-rays for the timed calls and the agreement check (default: "
                        "../shared/data/cxr-real beside the repository, if present)")
    p.add_argument("--networks", default="auto,onnx-fp32,openvino-fp32,openvino-bf16,onnx-int8",
                   help="predictors to compare: auto (the default settings) and/or "
                        "<runtime>-<precision> pairs; pairs this CPU cannot serve are skipped "
                        "(default %(default)s)")
    p.add_argument("--calibration-images", type=int, default=64,
                   help="real images to calibrate the int8 graph with when it is missing "
                        "(default %(default)s)")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed single-image calls per contender, interleaved (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="throughput batch (default %(default)s)")
    p.add_argument("--batches", type=int, default=5,
                   help="timed batches per contender, interleaved (default %(default)s)")
    p.add_argument("--agreement-limit", type=int, default=300,
                   help="at most this many real images for the agreement check (0 = all)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the fresh-process memory measurement")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads for everything measured (default 0: the CPUs "
                        "available)")


SETTLE_S = 0.05  # idle time before each timed call (see _interleaved)


def _interleaved(contenders: dict[str, Callable[[], object]], repeats: int,
                 settle_s: float = SETTLE_S) -> dict[str, float]:
    """Median seconds per contender, timed round-robin so that load changes hit all alike.

    Each timed call starts after ``settle_s`` of idle time, as a request to a server does:
    PyTorch's OpenMP threads spin-wait for a while after parallel work, and on a 2-core CPU
    they slow whatever runs next; without the pause, the contender timed right after the
    eager baseline paid for it (predict + Grad-CAM measured faster than predict alone)."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(max(1, repeats)):
        for name, fn in contenders.items():
            if settle_s > 0:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _infer_images(data_dir, checkpoint, limit):
    """Real images: the run's manifest test split, else every image of the folder."""
    from core.data import IMAGE_EXTS, load_manifest

    paths, what = [], "images"
    manifest = checkpoint.parent / "manifest.csv"
    if manifest.is_file():
        rows = load_manifest(manifest, data_dir).split("test")
        paths = [data_dir / r["path"] for r in rows if (data_dir / r["path"]).is_file()]
        what = "test split of the run's manifest"
    if not paths and data_dir.is_dir():
        paths = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        what = "images (no run manifest: all)"
    if limit and len(paths) > limit:
        step = len(paths) / limit
        paths = [paths[int(k * step)] for k in range(limit)]
        what += f", every {step:.1f}th"
    return paths, what


def bench_infer(args: argparse.Namespace) -> int:
    """Inference speed, agreement and memory of core.inference.Predictor against a plain fp32
    eager torchvision ResNet50 forward, all measured in this process (medians of
    interleaved calls, so that a loaded machine slows every contender alike: compare the
    ratios).

    Figures per predictor (runtime-precision): single-image predict p50 (PNG bytes ->
    calibrated probabilities; target <= 0.6x the baseline forward), predict + Grad-CAM +
    overlay p50 (<= 0.8x), batch throughput (>= 2x), top-1 agreement, operating-point
    decisions and OOD flags against PyTorch fp32 eager on real X-rays, and the resident
    memory a loaded predictor adds after 30 explains and a batch of 16 in a fresh process
    (<= 250 MB). For a run with a lung view, also the lung segmenter's share of the predict
    p50 (its ``segment`` on the same images, timed in the same interleaved rounds).
    """
    import gc
    import io
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    import torch
    import torchvision
    from PIL import Image

    from core import export
    from core import network as net
    from core.config import PreprocessConfig, to_dict
    from core.devices import cpu_has_native_bf16
    from core.errors import ConfigError
    from core.imaging import decode
    from core.inference import Predictor
    from core.lungs import DEFAULT_SEGMENTER_PATH, default_segmenter
    from core.model import (
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        build_model,
        model_from_checkpoint,
        save_checkpoint,
    )
    from core.sidecars import load_run_checkpoint

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parent.parent
    data_dir = Path(args.data_dir) if args.data_dir else root.parent / "shared" / "data" / "cxr-real"
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-infer-"))
    if args.checkpoint:
        ckpt_path, origin = Path(args.checkpoint), args.checkpoint
    else:
        torch.manual_seed(0)
        model = build_model(3, weights="none", arch="resnet50")
        ckpt_path, origin = tmp / "best.pt", (f"random-init resnet50 built at {args.img_size} "
                                              f"px, lung view {args.lung_view}")
        save_checkpoint({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                         "arch": "resnet50", "classes": ["COVID", "Normal", "Viral Pneumonia"],
                         "preprocess": to_dict(PreprocessConfig(
                             img_size=args.img_size, lung_view=args.lung_view,
                             segmenter_sha256="" if args.lung_view == "none" else
                             export.file_sha256(DEFAULT_SEGMENTER_PATH))),
                         "state_dict": model.state_dict()}, ckpt_path)
        del model
    ckpt = load_run_checkpoint(ckpt_path)  # with its calibration and OOD sidecars
    size = int(ckpt["preprocess"]["img_size"])
    native = cpu_has_native_bf16()
    paths, what = _infer_images(data_dir, ckpt_path, args.agreement_limit)
    if paths:
        png = paths[0].read_bytes()
    else:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(buf, "PNG")
        png = buf.getvalue()
    (tmp / "sample.png").write_bytes(png)
    print(f"infer: checkpoint {origin} ({ckpt['arch']}, {size} px); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"CPU kind: {'native bf16 (AVX512-BF16/AMX)' if native else 'no native bf16 (AVX2)'}, "
          f"{os.cpu_count()} CPUs visible; os.getloadavg {os.getloadavg()[0]:.1f} "
          "(a loaded machine: absolute times are noisy, compare the ratios)")

    export.ensure_graph(ckpt_path, ckpt)
    helper = Predictor(ckpt, device="cpu", runtime="torch")
    wanted = [n.strip() for n in args.networks.split(",") if n.strip()]
    if "onnx-int8" in wanted or "openvino-int8" in wanted:
        sha = export.file_sha256(ckpt_path)
        if not export.is_current(export.graph_path(ckpt_path, "int8"), sha) and paths:
            files = paths[:: max(1, len(paths) // args.calibration_images)][: args.calibration_images]
            batches = [torch.stack([helper.prepare(f.read_bytes()).x for f in files[i : i + 16]])
                       for i in range(0, len(files), 16)]
            t0 = time.perf_counter()
            export.quantize_int8(ckpt_path, batches)
            print(f"infer: int8 graph quantised here (ONNX Runtime quantize_static) on "
                  f"{len(files)} real images in {time.perf_counter() - t0:.1f} s")
    predictors: dict[str, Predictor] = {}
    for name in wanted:
        runtime, precision = name.split("-") if "-" in name else ("auto", "auto")
        t0 = time.perf_counter()
        try:
            predictors[name] = Predictor.from_checkpoint(ckpt_path, device="cpu", runtime=runtime,
                                                         precision=precision,
                                                         batch_size=args.batch_size)
        except ConfigError as exc:
            print(f"infer: [{name}] skipped: {exc}")
            continue
        print(f"infer: [{name}] -> {predictors[name].network}: load and warm-up "
              f"{time.perf_counter() - t0:.1f} s")
    if "auto" in predictors and predictors["auto"].network.endswith("fp32"):
        print("infer: the default settings serve fp32 here: no reduced precision passed the "
              "run's check (serving.json) on this machine, or none was checked")

    baseline = torchvision.models.resnet50().eval()
    x1 = torch.randn(1, 3, size, size)
    xb = torch.randn(args.batch_size, 3, size, size)

    def base_forward(x: torch.Tensor) -> None:
        with torch.inference_mode():
            baseline(x)

    base_forward(x1)
    base_forward(xb)
    pool = [p.read_bytes() for p in paths[: max(args.repeats, args.batch_size)]] or [png]
    single: dict[str, Callable[[], object]] = {"baseline": lambda: base_forward(x1)}
    for b, p in predictors.items():
        images, gallery = itertools.cycle(pool), itertools.cycle(pool)  # same order for each
        single[f"predict/{b}"] = lambda p=p, it=images: p.predict(next(it))
        single[f"explain/{b}"] = lambda p=p, it=gallery: p.explain(next(it), lung_focus=False)
        if p.segmenter is not None:  # its share of predict: the same images, the same rounds
            grays = itertools.cycle([decode(png).gray for png in pool])
            single[f"segment/{b}"] = lambda s=p.segmenter, it=grays: s.segment(next(it))
    med = _interleaved(single, args.repeats)
    base_ms = med["baseline"] * 1000
    print(f"infer: baseline fp32 eager torchvision resnet50 forward, 1 image at {size} px: "
          f"p50 {base_ms:.1f} ms; predictors timed on {len(pool)} distinct "
          f"{'real X-rays' if paths else 'copies of the sample'}")
    pngs = [pool[i % len(pool)] for i in range(args.batch_size)]
    batch: dict[str, Callable[[], object]] = {"baseline": lambda: base_forward(xb)}
    for b, p in predictors.items():
        batch[b] = lambda p=p: p.predict_batch(pngs)
    bmed = _interleaved(batch, args.batches)
    base_tp = args.batch_size / bmed["baseline"]
    for b, p in predictors.items():
        pm, em = med[f"predict/{b}"] * 1000, med[f"explain/{b}"] * 1000
        tp = args.batch_size / bmed[b]
        print(f"infer: [{b} = {p.network}] predict p50 {pm:.1f} ms = {pm / base_ms:.2f}x the "
              f"baseline (target <= 0.6x) | predict + Grad-CAM + overlay p50 {em:.1f} ms = "
              f"{em / base_ms:.2f}x (target <= 0.8x) | batch {args.batch_size} throughput "
              f"{tp:.1f} img/s = {tp / base_tp:.2f}x the baseline's {base_tp:.1f} (target >= 2x)")
        if f"segment/{b}" in med:
            sm = med[f"segment/{b}"] * 1000
            print(f"infer: [{b} = {p.network}] segmenter ({p.segmenter.runtime}, lung view "
                  f"{p.preprocess.lung_view}): {sm:.1f} ms of {pm:.1f} ms predict p50, "
                  f"{100 * sm / pm:.0f}%")

    if paths:
        reference = net.TorchNetwork(model_from_checkpoint(ckpt), torch.device("cpu"), None)
        xs = [torch.stack([helper.prepare(p.read_bytes()).x for p in paths[i : i + args.batch_size]])
              for i in range(0, len(paths), args.batch_size)]
        ref = export.run_all(reference, xs)
        for b, p in predictors.items():
            c = export.compare(ref, export.run_all(p._net, xs), ckpt)
            print(f"infer: [{b} = {p.network}] against PyTorch fp32 eager on {c['n']} real {what}: "
                  f"top-1 agreement {100 * c['top1_agreement']:.2f}%, max |delta p| "
                  f"{c['max_abs_dp']:.1e}, operating-point decision changes "
                  f"{c['decision_changes']} (screening p >= threshold changes "
                  f"{c['screening_changes']}), OOD flag agreement "
                  f"{100 * c.get('ood_flag_agreement', float('nan')):.1f}%")
    else:
        print(f"infer: agreement check skipped: no real X-rays at {data_dir}")

    if args.memory:
        names = list(predictors)
        # This process lets go of its predictors first: a weights file that it still maps
        # would stay resident in the fresh process too (the kernel keeps a page that two
        # processes map), which a server loading its run once never sees.
        predictors.clear()
        single.clear()
        batch.clear()
        p = None  # the last loop's predictor
        gc.collect()
        # explain's lung focus reads the segmenter's graph from the user's cache: export it
        # here, so that the fresh processes measure serving, not a one-time export
        seg = default_segmenter()
        export.ensure_segmenter_graph(export.cached_segmenter_path(seg), seg)
        env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        (tmp / "more.txt").write_text("\n".join(str(p) for p in paths[:30]))
        for b in names:
            res = subprocess.run(
                [sys.executable, "-c", _INFER_RSS_SCRIPT, str(ckpt_path), str(tmp / "sample.png"),
                 b, str(tmp / "more.txt")],
                capture_output=True, text=True, cwd=root, env=env, check=False)
            if res.returncode != 0:
                print(f"infer: [{b}] memory measurement failed: {res.stderr.strip()[-300:]}")
                continue
            m = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"infer: [{b} = {m['network']}] resident memory added by a loaded predictor "
                  f"in a fresh process (after import torch, torchvision: {m['before']:.0f} MB): "
                  f"{m['after'] - m['before']:.0f} MB after one explain, "
                  f"{m['steady'] - m['before']:.0f} MB after {m['n']} more explains and a batch "
                  f"of 16 (target <= 250 MB)")
    return 0


# ---------------------------------------------------------------- app


_BASELINE_PAGE = (
    '"""A static page: what Streamlit and the browser cost alone (python -m core.bench app)."""\n'
    "import streamlit as st\n\n"
    'st.title("Baseline")\n'
    'st.write("A static page with a title and a line of text.")\n'
)


def add_app_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", default=None,
                   help="a run's best.pt: the app is served with that run only")
    g.add_argument("--models-dir", default=None,
                   help="a models folder: the app picks its newest run, as for a user (default: "
                        "$CXR_MODELS_DIR, else the repository's models/)")
    p.add_argument("--images", default=None,
                   help="a folder of X-rays to upload, a different one per timed prediction "
                        "(default: ../shared/data/cxr-real beside the repository if present, "
                        "else synthetic PNGs)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed loads per page and timed predictions (default %(default)s; "
                        "medians shown)")
    p.add_argument("--pages", default=None,
                   help="comma-separated URL paths of the pages to time, 'home' for / "
                        "(default: all seven)")
    p.add_argument("--page-target", type=float, default=2.0,
                   help="target seconds per page render (default %(default)s)")
    p.add_argument("--predict-target", type=float, default=1.0,
                   help="target seconds from upload to the prediction with its heatmap on "
                        "screen (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds any one wait may take before the benchmark fails "
                        "(default %(default)s)")


def _bench_images(folder: str | None, n: int, tmp: Path) -> list[Path]:
    """``n`` different X-ray files spread over ``folder`` (default: the shared real set),
    else synthetic PNGs written to ``tmp``."""
    from PIL import Image

    from core.data import IMAGE_EXTS

    root = Path(__file__).resolve().parent.parent
    src = Path(folder) if folder else root.parent / "shared" / "data" / "cxr-real"
    found = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS) \
        if src.is_dir() else []
    if found:
        step = max(1, len(found) // n)
        return [found[(k * step) % len(found)] for k in range(n)]
    if folder:
        raise SystemExit(f"app: no images under {folder}")
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        out.append(tmp / f"synthetic-{k}.png")
        Image.fromarray(rng.normal(90, 25, (256, 256)).clip(0, 255).astype(np.uint8)).save(out[-1])
    return out


def _app_checkpoint(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint, models folder to serve) from --checkpoint / --models-dir."""
    from core import runs

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_file():
            raise SystemExit(f"app: no checkpoint at {checkpoint}")
        return checkpoint, checkpoint.parent  # a run folder is a models folder with one run
    models = Path(args.models_dir) if args.models_dir else runs.models_dir()
    found = runs.list_runs(models)
    if not found:
        raise SystemExit(f"app: no trained run under {models}: train one (python -m core.train) "
                         "or pass --checkpoint / --models-dir")
    return found[0].checkpoint, models


def bench_app(args: argparse.Namespace) -> int:
    """The dashboard in a real browser (Debian's Chromium driven by Playwright): per page,
    the time from navigation start to the app being idle (its script run over, no spinner,
    nothing stale, images and charts drawn) when its URL is opened (a new session: the
    page's first complete render), and when it is reached by its sidebar link; and the time
    from uploading one X-ray on Clinical Predictions to its prediction with the Grad-CAM
    overlay on screen. Medians of --repeats, after a warm-up of
    every page and one prediction (the model is loaded once and cached, as in a served app);
    a different image per timed prediction.

    Baselines in the same run: a static Streamlit page (a title and a line of text) served
    and timed the same way, and ``Predictor.explain`` on the same images in this process
    (no server, no browser). The app is served by ``core.appserver.AppServer``, as in the
    browser tests.
    """
    import os
    import tempfile

    from core import appserver
    from core.inference import Predictor, usable_cpus

    if appserver.chromium_path() is None:
        print("app: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    checkpoint, models_dir = _app_checkpoint(args)
    by_path = {pg.path or "home": pg for pg in appserver.PAGES}
    wanted = [w.strip() for w in (args.pages or ",".join(by_path)).split(",") if w.strip()]
    if unknown := [w for w in wanted if w not in by_path]:
        print(f"app: unknown page(s) {unknown}; choose from {sorted(by_path)}", file=sys.stderr)
        return 2
    pages = [by_path[w] for w in wanted]
    n, timeout = max(1, args.repeats), args.timeout
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-app-"))
    images = _bench_images(args.images, n + 1, tmp)  # the last one warms up
    (tmp / "baseline.py").write_text(_BASELINE_PAGE)
    baseline = appserver.AppPage("", "Baseline")
    classes = Predictor.from_checkpoint(checkpoint).classes

    page_ms: dict[str, list[float]] = {pg.path: [] for pg in pages}
    nav_ms: dict[str, list[float]] = {pg.path: [] for pg in pages}
    base_ms: list[float] = []
    predict_s: list[float] = []
    shown: list[str] = []
    with appserver.AppServer("Home.py", models_dir=models_dir, start_timeout=timeout) as app, \
            appserver.AppServer(tmp / "baseline.py", cwd=tmp, start_timeout=timeout) as base, \
            appserver.chromium() as browser:
        version = browser.version
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(timeout * 1000)
        page = context.new_page()
        for pg in appserver.PAGES:  # warm-up
            appserver.open_page(page, app.url, pg, timeout)
        appserver.open_page(page, base.url, baseline, timeout)
        appserver.open_page(page, app.url, appserver.CLINICAL, timeout)
        appserver.upload(page, [images[-1]], timeout=timeout)
        appserver.wait_for_predictions(page, 1, timeout)
        if errors := appserver.errors_on_page(page):
            print(f"app: the warm-up prediction failed: {errors}", file=sys.stderr)
            return 1
        for _ in range(n):  # rounds go over every page, so that load changes hit all alike
            for pg in pages:
                page_ms[pg.path].append(appserver.open_page(page, app.url, pg, timeout))
            base_ms.append(appserver.open_page(page, base.url, baseline, timeout))
            other = next(pg for pg in appserver.PAGES if pg != pages[0])
            appserver.open_page(page, app.url, other, timeout)
            for pg in pages:  # then from page to page through the sidebar (one session)
                nav_ms[pg.path].append(appserver.navigate(page, pg, timeout))
        for image in images[:n]:
            appserver.open_page(page, app.url, appserver.CLINICAL, timeout)
            t0 = time.perf_counter()
            appserver.upload(page, [image], timeout=timeout)
            appserver.wait_for_predictions(page, 1, timeout, idle=False)
            predict_s.append(time.perf_counter() - t0)
            appserver.wait_idle(page, timeout)
            shown += appserver.predicted_classes(page, classes)
        context.close()

    predictor = Predictor.from_checkpoint(checkpoint)
    predictor.explain(images[-1].read_bytes(), name=images[-1].name)  # warm-up
    explain_s, expected = [], []
    for image in images[:n]:
        data = image.read_bytes()
        t0 = time.perf_counter()
        expected.append(predictor.explain(data, name=image.name).prediction.label)
        explain_s.append(time.perf_counter() - t0)

    def row(what: str, seconds: float, target: float | None = None,
            by_link: float | None = None) -> str:
        link = f"{by_link:.2f} s" if by_link is not None else ""
        if target is None:
            return f"| {what} | {seconds:.2f} s | {link} | | |"
        verdict = "meets" if seconds <= target else "MISSES"
        return (f"| {what} | {seconds:.2f} s | {link} | < {target:g} s | "
                f"{seconds / target:.2f} {verdict} |")

    def med(values: list[float]) -> float:
        return float(np.median(values))

    print(f"app: run {checkpoint.parent.name} ({', '.join(classes)}), Chromium {version}, "
          f"{usable_cpus()} usable CPUs; medians of {n}; "
          f"images from {os.path.commonpath([str(i.parent) for i in images])}")
    print("Pages: open the URL (a new session) -> idle; and the same page reached by its "
          "sidebar link (same session); the ratio is for the URL load.")
    print("| what | median | by sidebar link | target | ratio to target |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for pg in pages:
        print(row(f"page /{pg.path} ({pg.title})", med(page_ms[pg.path]) / 1000,
                  args.page_target, med(nav_ms[pg.path]) / 1000))
    print(row("baseline: static Streamlit page (title + a line of text)", med(base_ms) / 1000))
    print(row("upload 1 X-ray -> prediction + Grad-CAM overlay on screen", med(predict_s),
              args.predict_target))
    print(row("baseline: Predictor.explain in-process (no server, no browser)",
              med(explain_s)))
    agree = sum(a == b for a, b in zip(shown, expected, strict=False))
    print(f"app: the page showed Predictor.explain's class for {agree} of {len(expected)} "
          "timed images")
    return 0 if agree == len(expected) else 1


# ---------------------------------------------------------------- registry and CLI


SUBCOMMANDS: dict[str, Subcommand] = {
    "app": Subcommand("the dashboard in Chromium: page render and upload-to-heatmap times",
                      add_app_args, bench_app),
    "infer": Subcommand("inference latency, throughput, agreement and memory vs fp32 eager", add_infer_args, bench_infer),
    "recipes": Subcommand("screen from-scratch training recipes (lung views, augmentation, "
                          "size, depth, length) on validation; train the chosen one",
                          recipes.add_args, recipes.run),
    "metrics": Subcommand("time the metrics report with a 1,000-resample bootstrap",
                          add_metrics_args, bench_metrics),
    "train": Subcommand("training images/s: plain fp32 loop vs the default path; head-mode cache",
                        add_train_args, bench_train),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.run.__doc__)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
