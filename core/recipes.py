"""The training-recipe search behind the ``cpu-lungs`` preset: ``python -m core.bench recipes``.

Every recipe is a set of ``python -m core.train`` settings (argument names, as in
:data:`core.config.PRESETS`) over one from-scratch base, trained on the same manifest split
(same data dir, split seed and fractions). Two stages:

``screen`` (default)
    each recipe trained with at most ``--screen-epochs`` epochs per seed, then evaluated on
    the **validation** split: accuracy with its 95% CI, macro ROC-AUC, the occlusion probe
    (periphery-only and centre-only accuracy) and the mean Grad-CAM lung focus, plus the
    training time. :func:`core.compare.recommend` picks on these validation rows (mean over
    seeds): among recipes whose periphery-only accuracy is at most 0.45, the most accurate.
    The test split is not read.
``final``
    the chosen recipe (``--final NAME``, or ``auto`` = the screen's recommendation) trained
    once with its full settings and finished like any run (calibration and OOD on
    validation, serving export, then the **test** report, read once).

Runs are written under ``--output`` (default ``out/recipes``, outside ``models/`` so that the
app does not list them); a recipe whose screening report exists is not retrained, so the grid
can be extended and the table reprinted. Research use only.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from core import compare
from core.config import RunConfig
from core.errors import ConfigError

log = logging.getLogger(__name__)

# The base every recipe starts from: random initial weights, the whole network at one
# learning rate, a cosine schedule, 128 px, the default light augmentation.
BASE: dict[str, Any] = {
    "weights": "none", "mode": "finetune", "arch": "resnet50", "img_size": 128,
    "epochs": 12, "scheduler": "cosine", "lr": 1e-3, "lung_view": "none",
}
# Stronger geometric and photometric augmentation, with erasing of border bands (markers,
# text and collimation edges identify the source hospital: DeGrave et al., Nat. Mach. Intell.
# 2021); on a lung view the random resized crop lies inside the lung box.
STRONG_AUG: dict[str, Any] = {
    "crop_scale": 0.7, "gamma": 0.2, "blur": 0.2, "noise": 0.03, "erase_periphery": 0.5,
    "translate": 0.05, "scale": 0.1,
}

CHOSEN = "soft+aug-long-ema"  # the screen's recommendation; core.config.PRESETS["cpu-lungs"] is it

RECIPES: dict[str, dict[str, Any]] = {
    "none": {},
    "crop": {"lung_view": "crop"},
    "mask": {"lung_view": "mask"},
    "soft": {"lung_view": "soft"},
    "none+aug": {**STRONG_AUG},
    "crop+aug": {"lung_view": "crop", **STRONG_AUG},
    "mask+aug": {"lung_view": "mask", **STRONG_AUG},
    "soft+aug": {"lung_view": "soft", **STRONG_AUG},
    "soft+aug-r18": {"lung_view": "soft", **STRONG_AUG, "arch": "resnet18"},
    "mask+aug-r18": {"lung_view": "mask", **STRONG_AUG, "arch": "resnet18"},
    "soft+aug-224": {"lung_view": "soft", **STRONG_AUG, "img_size": 224},
    "soft+aug-long": {"lung_view": "soft", **STRONG_AUG, "epochs": 24},
    "mask+aug-long": {"lung_view": "mask", **STRONG_AUG, "epochs": 24},
    # A moving average of the weights (torchvision's reference --model-ema): from-scratch
    # validation accuracy swings by several points from one epoch to the next, and the
    # average of the last ~50-100 steps smooths those swings.
    "soft+aug-ema": {"lung_view": "soft", **STRONG_AUG, "ema_decay": 0.98},
    "soft+aug-long-ema": {"lung_view": "soft", **STRONG_AUG, "epochs": 24, "ema_decay": 0.99},
}


def recipe_settings(name: str) -> dict[str, Any]:
    """The full ``core.train`` settings of a recipe (the base, then the recipe's own)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose from: {', '.join(RECIPES)}")
    return {**BASE, **RECIPES[name]}


def _config(settings: dict[str, Any], data_dir: str, output: Path, seed: int,
            split_seed: int, final: bool) -> RunConfig:
    from core import train

    args = train.parse_args([], overrides={
        **settings, "data_dir": data_dir, "output": str(output), "seed": split_seed,
        "early_stop_patience": settings["epochs"], "evaluate": final, "export": final,
    })
    cfg = train.config_from_args(args)
    return replace(cfg, train=replace(cfg.train, seed=seed))  # the split keeps split_seed


def screen_one(name: str, seed: int, args: argparse.Namespace) -> Path:
    """Train one recipe at one seed (screening epochs) and write its validation report."""
    from core.evaluate import evaluate
    from core.train import fit

    settings = recipe_settings(name)
    if args.screen_epochs:  # shortened in proportion: a longer recipe stays longer
        settings["epochs"] = max(1, round(settings["epochs"] * args.screen_epochs
                                          / BASE["epochs"]))
    run = Path(args.output) / "screen" / name / f"seed{seed}"
    report = run / "report" / "metrics.json"
    if report.is_file() and (run / "bench.json").is_file():
        log.info("recipe %s seed %d: screened already (%s)", name, seed, report)
        return run
    trained = run / "trained.json"  # written once training ended: a rerun only evaluates
    if trained.is_file() and (run / "best.pt").is_file():
        info = json.loads(trained.read_text())
    else:
        cfg = _config(settings, args.data_dir, run, seed, args.split_seed, final=False)
        t0 = time.perf_counter()
        fit(cfg, progress=not args.quiet)
        info = {"recipe": name, "seed": seed, "settings": settings,
                "train_s": time.perf_counter() - t0, "split": "val"}
        trained.write_text(json.dumps(info, indent=1) + "\n")
    t0 = time.perf_counter()
    evaluate(run / "best.pt", args.data_dir, "val", run / "report", progress=not args.quiet,
             n_resamples=args.resamples)
    info["eval_s"] = time.perf_counter() - t0
    (run / "bench.json").write_text(json.dumps(info, indent=1) + "\n")
    return run


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def recipe_row(name: str, runs: list[Path]) -> dict[str, Any]:
    """One table row: the mean over seeds of each figure (the CI is the first seed's)."""
    rows = [compare.summarise(json.loads((r / "report" / "metrics.json").read_text()), name)
            for r in runs]
    bench = [json.loads((r / "bench.json").read_text()) for r in runs]
    row = dict(rows[0])
    for key in ("accuracy", "macro_roc_auc", "periphery_only_accuracy", "centre_only_accuracy",
                "lung_focus_mean"):
        row[key] = _mean([r[key] for r in rows])
    s = bench[0]["settings"]
    row.update(seeds=len(runs), train_min=_mean([b["train_s"] for b in bench]) / 60,
               arch=s["arch"], img_size=s["img_size"], epochs=s["epochs"],
               augment="strong" if s.get("erase_periphery") else "light",
               split=bench[0]["split"])
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The recipe table in Markdown."""
    def f(v: float | None, d: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{d}f}"

    head = ("| recipe | view | arch | px | epochs | aug | split (seeds) | accuracy [95% CI] | "
            "macro AUC | periphery-only | centre-only | lung focus | train min |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        ci = r["accuracy_ci95"]
        acc = f(r["accuracy"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        lines.append(f"| {r['run']} | {r['lung_view']} | {r['arch']} | {r['img_size']} | "
                     f"{r['epochs']} | {r['augment']} | {r['split']} ({r['seeds']}) | {acc} | "
                     f"{f(r['macro_roc_auc'])} | {f(r['periphery_only_accuracy'])} | "
                     f"{f(r['centre_only_accuracy'])} | {f(r['lung_focus_mean'], 2)} | "
                     f"{r['train_min']:.1f} |")
    return "\n".join(lines)


def screened(output: Path) -> list[dict[str, Any]]:
    """Rows of every recipe screened so far under ``output`` (grid order)."""
    rows = []
    for name in RECIPES:
        runs = sorted(p for p in (output / "screen" / name).glob("seed*")
                      if (p / "bench.json").is_file())
        if runs:
            rows.append(recipe_row(name, runs))
    return rows


def final(name: str, args: argparse.Namespace) -> Path:
    """Train the chosen recipe with its full settings and finish it (test report)."""
    from core.train import fit

    run = Path(args.output) / "final" / name
    cfg = _config(recipe_settings(name), args.data_dir, run, args.seeds[0], args.split_seed,
                  final=True)
    t0 = time.perf_counter()
    best = fit(cfg, progress=not args.quiet)
    (run / "bench.json").write_text(json.dumps(
        {"recipe": name, "seed": args.seeds[0], "settings": recipe_settings(name),
         "train_s": time.perf_counter() - t0, "split": "test",
         "note": "train_s includes the finish (calibration, OOD, export, test report)"},
        indent=1) + "\n")
    return best.parent


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (the same split for every recipe)")
    g.add_argument("--data-dir", default="../shared/data/cxr-real",
                   help="dataset to train, validate and test on (default %(default)s)")
    g.add_argument("--split-seed", type=int, default=42, help="seed of the manifest split")
    g = p.add_argument_group("grid")
    g.add_argument("--recipes", default="all",
                   help=f"comma-separated recipes or 'all' ({', '.join(RECIPES)})")
    g.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")],
                   help="training seeds per recipe, comma-separated (default %(default)s)")
    g.add_argument("--screen-epochs", type=int, default=8,
                   help="screening: the base recipe's epochs (others in proportion; 0 = each "
                   "recipe's own)")
    g.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for CIs")
    g = p.add_argument_group("stage")
    g.add_argument("--final", default=None, metavar="RECIPE",
                   help="train this recipe (or 'auto': the screen's recommendation) with its "
                   "full settings and read the test split once")
    g.add_argument("--table-only", action="store_true",
                   help="print the table of what has been screened; train nothing")
    g = p.add_argument_group("output")
    g.add_argument("--output", default="out/recipes", help="runs go under here")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Screen a grid of from-scratch training recipes on the validation split (accuracy
    with CI, macro AUC, occlusion probe, lung focus, training time), recommend one with
    ``core.compare.recommend``, and with ``--final`` train it fully and test it once."""
    out = Path(args.output)
    names = list(RECIPES) if args.recipes == "all" else [
        n.strip() for n in args.recipes.split(",") if n.strip()]
    for n in names:
        recipe_settings(n)  # unknown names fail before any training
    if not args.table_only and not args.final:
        for name in names:
            for seed in args.seeds:
                screen_one(name, seed, args)
    rows = screened(out)
    if rows:
        rec = compare.recommend(rows)
        print(f"recipes: {args.data_dir}, split seed {args.split_seed}, screened on the "
              "validation split")
        print(table(rows))
        print(f"\nRecommended: **{rec['run']}**: {rec['rule']}.")
        (out / "screen.json").write_text(json.dumps({"rows": rows, "recommendation": rec},
                                                    indent=1) + "\n")
    if args.final:
        name = args.final
        if name == "auto":
            if not rows:
                raise ConfigError("--final auto needs screened recipes; run the screen first")
            name = compare.recommend(rows)["run"]
        row = recipe_row(name, [final(name, args)])
        print(f"\nfinal: {name} trained in full and finished (calibration, OOD, export, "
              f"test report) in {row['train_min']:.1f} min; test split, read once:")
        print(table([row]))
    return 0
