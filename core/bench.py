"""Benchmarks: ``python -m core.bench <subcommand>``; each prints its figures as one line.

Structure: one function per subcommand, registered in :data:`SUBCOMMANDS` with the function
that adds its arguments. To add a benchmark, write ``add_<name>_args(parser)`` and
``bench_<name>(args) -> int`` and register them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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
    """Time the full metric report (core.evaluate.score_predictions) on synthetic predictions.

    Covers everything evaluation computes after inference: calibration before/after, ROC-AUC
    and AP, count metrics at argmax and at an operating point, curves, and (by default) the
    two occlusion-probe conditions, all with the shared stratified bootstrap.
    """
    from core import metrics as M
    from core.evaluate import Predictions, score_predictions

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

    from core.train import cpu_has_native_bf16, extract_features, resolve_precision

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


# ---------------------------------------------------------------- registry and CLI


SUBCOMMANDS: dict[str, Subcommand] = {
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
