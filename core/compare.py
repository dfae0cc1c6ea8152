"""Side-by-side comparison of trained runs from their evaluation reports.

Made for the lung-view question (``none`` vs ``crop`` vs ``mask``): for each run it lists
internal accuracy and macro ROC-AUC (95% CIs), the occlusion probe (periphery-only and
centre-only accuracy, shortcut risk), the mean Grad-CAM lung-focus ratio and, where the run
was also evaluated on an independent hospital's images (``--external-dir``), the external
macro ROC-AUC and its drop. It reads ``<run>/report/metrics.json``; it never recomputes.

    python -m core.compare models/none models/crop models/mask [--output comparison.json]

:func:`recommend` applies the documented selection rule, which does not reward the
shortcut: among runs whose periphery-only accuracy is at most ``PERIPHERY_MAX`` (0.45; chance
is 1/K), the most accurate (ties: the higher lung focus). Internal accuracy alone never
decides, because a model that reads the image's source scores well inside the database. When
no run meets the limit, it says so and falls back to the lowest periphery-only accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import CXRError, DatasetError

log = logging.getLogger(__name__)

PERIPHERY_MAX = 0.45  # a run "does not read the periphery" at or below this probe accuracy


def report_path(run: str | Path) -> Path:
    """``run`` may be a run folder, its ``report/`` folder or a ``metrics.json``."""
    p = Path(run)
    for cand in (p, p / "metrics.json", p / "report" / "metrics.json"):
        if cand.is_file():
            return cand
    raise DatasetError(f"No evaluation report for {run}: expected {p / 'report' / 'metrics.json'} "
                       "(written at the end of training, or by python -m core.evaluate).")


def _value(m: dict[str, Any] | None) -> float | None:
    return None if not m else m.get("value")


def _ci(m: dict[str, Any] | None) -> list[float] | None:
    return None if not m else m.get("ci95")


def summarise(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The comparison row of one report."""
    overall = doc["at_argmax"]["overall"]
    auc = doc["threshold_free"]["macro_roc_auc"]
    sc = doc.get("shortcut") or {}
    cond = sc.get("conditions") or {}
    focus = ((doc.get("lung_focus") or {}).get("overall") or {})
    ext = doc.get("external") or None
    return {
        "run": name,
        "lung_view": doc["run"].get("lung_view")
        or (doc.get("lung_focus") or {}).get("lung_view") or "none",
        "n": doc["n"],
        "accuracy": _value(overall["accuracy"]), "accuracy_ci95": _ci(overall["accuracy"]),
        "macro_f1": _value(overall["macro_f1"]),
        "macro_roc_auc": _value(auc), "macro_roc_auc_ci95": _ci(auc),
        "chance_accuracy": sc.get("chance_accuracy"),
        "periphery_only_accuracy": _value((cond.get("periphery") or {}).get("accuracy")),
        "centre_only_accuracy": _value((cond.get("centre") or {}).get("accuracy")),
        "shortcut_risk": sc.get("risk"),
        "lung_focus_mean": focus.get("mean"),
        "external_macro_roc_auc": _value(ext["threshold_free"]["macro_roc_auc"]) if ext else None,
        "external_auc_drop": ext["drop"]["macro_roc_auc"]["drop"] if ext else None,
    }


def recommend(rows: Sequence[dict[str, Any]],
              periphery_max: float = PERIPHERY_MAX) -> dict[str, Any]:
    """The run to prefer, and why: among runs with a periphery-only accuracy of at most
    ``periphery_max``, the most accurate, ties broken by the higher lung focus; when none
    qualifies (or none was probed), the lowest periphery-only accuracy, flagged
    ``meets_limit=False``."""
    scored = [r for r in rows if r["accuracy"] is not None]
    if not scored:
        raise DatasetError("No run has a defined accuracy; nothing to compare.")

    def focus(r: dict[str, Any]) -> float:
        return r["lung_focus_mean"] if r["lung_focus_mean"] is not None else float("-inf")

    keep = [r for r in scored if r["periphery_only_accuracy"] is not None
            and r["periphery_only_accuracy"] <= periphery_max]
    if keep:
        choice = max(keep, key=lambda r: (r["accuracy"], focus(r)))
        rule = (f"among runs whose periphery-only accuracy is at most {periphery_max:.2f}, "
                "the most accurate (ties: the higher lung focus)")
    else:
        choice = min(scored, key=lambda r: (
            r["periphery_only_accuracy"] if r["periphery_only_accuracy"] is not None
            else float("inf"), -r["accuracy"]))
        rule = (f"no run has a periphery-only accuracy at or below {periphery_max:.2f}: the "
                "lowest periphery-only accuracy (every run may read the image's source)")
    return {"run": choice["run"], "lung_view": choice["lung_view"], "rule": rule,
            "kept": [r["run"] for r in keep], "meets_limit": bool(keep)}


def compare(runs: Sequence[str | Path]) -> dict[str, Any]:
    rows = []
    for run in runs:
        path = report_path(run)
        name = path.parent.parent.name if path.parent.name == "report" else path.parent.name
        rows.append(summarise(json.loads(path.read_text()), name))
    return {"rows": rows, "recommendation": recommend(rows)}


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table plus the recommendation."""
    head = ("| run | lung view | n | accuracy [95% CI] | macro ROC-AUC | periphery-only acc. | "
            "centre-only acc. | shortcut risk | lung focus | external AUC (drop) |")
    lines = [head, "|" + "---|" * 10]
    for r in result["rows"]:
        ci = r["accuracy_ci95"]
        acc = _f(r["accuracy"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        ext = ("n/a" if r["external_macro_roc_auc"] is None else
               f"{r['external_macro_roc_auc']:.3f} ({r['external_auc_drop']:+.3f})")
        lines.append(f"| {r['run']} | {r['lung_view']} | {r['n']} | {acc} | {_f(r['macro_roc_auc'])} "
                     f"| {_f(r['periphery_only_accuracy'])} | {_f(r['centre_only_accuracy'])} "
                     f"| {r['shortcut_risk'] or 'n/a'} | {_f(r['lung_focus_mean'], 2)} | {ext} |")
    rec = result["recommendation"]
    lines.append("")
    lines.append(f"Recommended: **{rec['run']}** (lung view `{rec['lung_view']}`): {rec['rule']}.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.compare",
                                description="Compare trained runs (e.g. lung views) from their "
                                            "evaluation reports.")
    g = p.add_argument_group("input")
    g.add_argument("runs", nargs="+", help="run folders (models/<run>), report folders or "
                                           "metrics.json files")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="also write the comparison as JSON here")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = compare(args.runs)
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
