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


# ---------------------------------------------------------------- registry and CLI


SUBCOMMANDS: dict[str, Subcommand] = {
    "metrics": Subcommand("time the metrics report with a 1,000-resample bootstrap",
                          add_metrics_args, bench_metrics),
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
