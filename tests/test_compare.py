"""core.compare: rows from reports and the documented rule that picks a lung view.

The reports are real ones: ``small_run``'s report as the template, with its metric sections
computed by ``core.report.score_predictions`` from constructed predictions (exact
accuracies), and every document validated against ``core/schemas/metrics.schema.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from core import compare, scoring
from core import report as R
from core.errors import DatasetError

N = 200


def _preds(classes: list[str], acc: float, periphery: float, seed: int) -> scoring.Predictions:
    """N images whose argmax is right for exactly ``acc`` x N of them, with occlusion-probe
    logits right for ``periphery`` x N (periphery only) and half (centre only)."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    y = np.arange(N) % k

    def logits(share: float) -> np.ndarray:
        right = np.zeros(N, bool)
        right[rng.permutation(N)[: round(share * N)]] = True
        pred = np.where(right, y, (y + 1) % k)
        out = rng.normal(0, 0.3, (N, k))
        out[np.arange(N), pred] += 2.0
        return out

    return scoring.Predictions([f"{classes[c]}/images/{i}.png" for i, c in enumerate(y)], y,
                         logits(acc), list(classes),
                         probe_logits={"periphery": logits(periphery), "centre": logits(0.5)})


def write_report(template: dict, run: Path, view: str, acc: float, peri: float,
                 focus: float | None, ext_acc: float | None = None, seed: int = 0) -> dict:
    doc = copy.deepcopy(template)
    classes = doc["run"]["classes"]
    doc.update(R.score_predictions(_preds(classes, acc, peri, seed), n_resamples=200))
    doc["run"]["lung_view"] = view
    if focus is None:
        doc["lung_focus"] = None
    else:
        doc["lung_focus"]["overall"]["mean"] = focus
    doc["external"] = None
    if ext_acc is not None:
        ext = R.score_predictions(_preds(classes, ext_acc, 0.5, seed + 100), n_resamples=200)
        ext.pop("shortcut", None)
        doc["external"] = {"data_dir": "/external", "class_map": {c: c for c in classes},
                           "overlap_with_manifest": 0, **ext, "drop": R.drop_block(doc, ext)}
    R.validate_document(doc)  # what core.evaluate would write
    (run / "report").mkdir(parents=True)
    (run / "report" / "metrics.json").write_text(json.dumps(doc))
    return doc


@pytest.fixture(scope="module")
def template(small_run: Path) -> dict:
    return json.loads((small_run / "report" / "metrics.json").read_text())


def test_rule_picks_the_most_accurate_run_within_the_periphery_limit(tmp_path, template):
    a, b, c, d = (tmp_path / n for n in ("none", "crop", "mask", "worse"))
    docs = {
        "none": write_report(template, a, "none", 0.88, 0.65, 1.2, ext_acc=0.6),  # shortcut
        "crop": write_report(template, b, "crop", 0.87, 0.40, 1.7, ext_acc=0.8),  # most accurate ok
        "mask": write_report(template, c, "mask", 0.865, 0.40, 1.5),  # within the limit, less acc.
        "worse": write_report(template, d, "mask", 0.80, 0.33, 1.9),  # least periphery, least acc.
    }
    result = compare.compare([a, b / "report", c / "report" / "metrics.json", d])
    assert [r["run"] for r in result["rows"]] == ["none", "crop", "mask", "worse"]
    rows = {r["run"]: r for r in result["rows"]}
    for name, doc in docs.items():  # every figure is the report's
        row = rows[name]
        assert row["n"] == N
        assert row["accuracy"] == doc["at_argmax"]["overall"]["accuracy"]["value"]
        assert row["accuracy_ci95"] == doc["at_argmax"]["overall"]["accuracy"]["ci95"]
        assert row["macro_roc_auc"] == doc["threshold_free"]["macro_roc_auc"]["value"]
        peri = doc["shortcut"]["conditions"]["periphery"]["accuracy"]["value"]
        assert row["periphery_only_accuracy"] == peri
    assert [rows[n]["accuracy"] for n in docs] == [0.88, 0.87, 0.865, 0.8]
    assert [rows[n]["periphery_only_accuracy"] for n in docs] == [0.65, 0.4, 0.4, 0.33]
    rec = result["recommendation"]
    assert rec["run"] == "crop" and rec["lung_view"] == "crop"
    assert rec["kept"] == ["crop", "mask", "worse"] and rec["meets_limit"]
    ext = docs["crop"]["external"]
    assert rows["crop"]["external_macro_roc_auc"] == ext["threshold_free"]["macro_roc_auc"]["value"]
    assert rows["crop"]["external_auc_drop"] == pytest.approx(
        docs["crop"]["threshold_free"]["macro_roc_auc"]["value"]
        - ext["threshold_free"]["macro_roc_auc"]["value"], abs=1e-6)
    assert rows["mask"]["external_macro_roc_auc"] is None
    lo, hi = rows["crop"]["accuracy_ci95"]
    assert f"| crop | crop | {N} | 0.870 [{lo:.3f}, {hi:.3f}]" in compare.markdown(result)


def test_cli_writes_json_and_reports_missing_runs(tmp_path, capsys, template):
    write_report(template, tmp_path / "a", "none", 0.9, 0.6, None)
    out = tmp_path / "cmp.json"
    assert compare.main([str(tmp_path / "a"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["recommendation"]["run"] == "a"
    assert "Recommended: **a**" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "nowhere")]) == 2
    with pytest.raises(DatasetError, match="No evaluation report"):
        compare.report_path(tmp_path / "nowhere")


def _row(name: str, acc: float, peri: float | None, focus: float | None = 1.5) -> dict:
    return {"run": name, "lung_view": "none", "accuracy": acc, "periphery_only_accuracy": peri,
            "lung_focus_mean": focus}


def test_rule_never_picks_a_run_over_the_periphery_limit_when_one_meets_it():
    import random

    rnd = random.Random(0)
    for trial in range(300):  # random grids, always with at least one run within the limit
        rows = [_row(f"r{i}", rnd.uniform(0.5, 1.0), rnd.choice([None, rnd.uniform(0.3, 0.9)]),
                     rnd.choice([None, rnd.uniform(0.8, 2.0)])) for i in range(rnd.randint(1, 8))]
        rows.append(_row("ok", rnd.uniform(0.3, 0.9), rnd.uniform(0.3, compare.PERIPHERY_MAX)))
        rec = compare.recommend(rows)
        chosen = next(r for r in rows if r["run"] == rec["run"])
        assert chosen["periphery_only_accuracy"] <= compare.PERIPHERY_MAX, trial
        eligible = [r for r in rows if r["periphery_only_accuracy"] is not None
                    and r["periphery_only_accuracy"] <= compare.PERIPHERY_MAX]
        assert chosen["accuracy"] == max(r["accuracy"] for r in eligible), trial
    # exactly at the limit counts; a far more accurate shortcut model does not win
    rows = [_row("shortcut", 0.99, 0.46), _row("at-limit", 0.70, 0.45)]
    assert compare.recommend(rows)["run"] == "at-limit"
    # ties on accuracy: the higher lung focus
    rows = [_row("a", 0.9, 0.40, 1.2), _row("b", 0.9, 0.42, 1.8)]
    assert compare.recommend(rows)["run"] == "b"


def test_rule_without_an_eligible_run_says_so_and_takes_the_least_periphery():
    rows = [_row("a", 0.95, 0.70), _row("b", 0.80, 0.50), _row("c", 0.90, None)]
    rec = compare.recommend(rows)
    assert rec["run"] == "b" and not rec["meets_limit"] and rec["kept"] == []
    assert "no run" in rec["rule"]
