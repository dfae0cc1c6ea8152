"""core.metrics against scikit-learn, hand-computed cases, edge cases and the bootstrap."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from core import metrics as M

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]


def random_case(n: int, k: int = 3, seed: int = 0, signal: float = 1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = signal * np.eye(k)[y] + rng.normal(size=(n, k))
    proba = M.softmax_t(logits)
    return y, proba, logits


def value(block: dict, *keys: str) -> float | None:
    for k in keys:
        block = block[k]
    return block["value"]


# ---------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_metrics_match_sklearn(seed: int) -> None:
    y, proba, _ = random_case(500, 4, seed, signal=1.0)
    classes = list("ABCD")
    pred = proba.argmax(1)
    block = M.classification_block(y, pred, classes)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=range(4),
                                                             zero_division=np.nan)
    mcm = multilabel_confusion_matrix(y, pred, labels=range(4))
    for j, c in enumerate(classes):
        (tn, fp), (fn, tp) = mcm[j]
        pc = block["per_class"][c]
        assert (pc["tp"], pc["fp"], pc["fn"], pc["tn"], pc["support"]) == (tp, fp, fn, tn, support[j])
        assert pc["sensitivity"]["value"] == pytest.approx(rec[j], abs=1e-6)
        assert pc["ppv"]["value"] == pytest.approx(prec[j], abs=1e-6)
        assert pc["f1"]["value"] == pytest.approx(f1[j], abs=1e-6)
        assert pc["specificity"]["value"] == pytest.approx(tn / (tn + fp), abs=1e-6)
        assert pc["npv"]["value"] == pytest.approx(tn / (tn + fn), abs=1e-6)
    o = block["overall"]
    assert o["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert o["macro_f1"]["value"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert o["weighted_f1"]["value"] == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-6)
    assert o["weighted_recall"]["value"] == pytest.approx(
        recall_score(y, pred, average="weighted"), abs=1e-6)
    assert o["cohen_kappa"]["value"] == pytest.approx(cohen_kappa_score(y, pred), abs=1e-6)
    assert block["confusion_matrix"]["counts"] == confusion_matrix(y, pred).tolist()


def test_ranking_metrics_match_sklearn() -> None:
    y, proba, _ = random_case(400, 3, 5, signal=1.0)
    block = M.ranking_block(y, proba, CLASSES)
    for j, c in enumerate(CLASSES):
        assert value(block, "per_class", c, "roc_auc") == pytest.approx(
            roc_auc_score(y == j, proba[:, j]), abs=1e-6)
        assert value(block, "per_class", c, "average_precision") == pytest.approx(
            average_precision_score(y == j, proba[:, j]), abs=1e-6)
    assert value(block, "macro_roc_auc") == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_auc_and_ap_equal_weighted_sklearn(ties: bool) -> None:
    y, proba, _ = random_case(300, 3, 7, signal=1.0)
    score = np.round(proba[:, 0], 1) if ties else proba[:, 0]  # rounding makes many ties
    positive = y == 0
    weights = M.bootstrap_weights(y, 5, seed=3)
    auc = M.weighted_roc_auc(positive, score, weights)
    ap = M.weighted_average_precision(positive, score, weights)
    for b in range(5):
        assert auc[b] == pytest.approx(roc_auc_score(positive, score, sample_weight=weights[b]))
        assert ap[b] == pytest.approx(
            average_precision_score(positive, score, sample_weight=weights[b]))


def test_weighted_confusion_equals_repeated_samples() -> None:
    y, proba, _ = random_case(60, 3, 2)
    pred = proba.argmax(1)
    w = M.bootstrap_weights(y, 3, seed=1)
    cms = M.weighted_confusion(y, pred, 3, w)
    for b in range(3):
        idx = np.repeat(np.arange(len(y)), w[b].astype(int))
        assert cms[b].tolist() == confusion_matrix(y[idx], pred[idx], labels=range(3)).tolist()


# ---------------------------------------------------------------- hand-computed cases


def test_hand_computed_small_case() -> None:
    # truth:     A A A B B C
    # predicted: A A B B A C
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    block = M.classification_block(y, pred, ["A", "B", "C"])
    a = block["per_class"]["A"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 1, 1, 2)
    assert a["sensitivity"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    assert a["specificity"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    assert a["ppv"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    assert a["npv"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    b = block["per_class"]["B"]
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (1, 1, 1, 3)
    assert b["f1"]["value"] == pytest.approx(0.5)
    assert block["per_class"]["C"]["f1"]["value"] == 1.0
    assert value(block, "overall", "accuracy") == pytest.approx(4 / 6, abs=1e-6)
    # kappa: po = 4/6; pe = (3*3 + 2*2 + 1*1) / 36 = 14/36
    assert value(block, "overall", "cohen_kappa") == pytest.approx((4 / 6 - 14 / 36) / (1 - 14 / 36),
                                                                   abs=1e-6)
    assert block["confusion_matrix"]["row_normalised"][0] == pytest.approx([2 / 3, 1 / 3, 0], abs=1e-6)


def test_prevalence_adjusted_ppv_npv_bayes() -> None:
    out = M.prevalence_adjusted(np.array([0.9]), np.array([0.8]), np.array([0.1]))
    # PPV = .9*.1 / (.9*.1 + .2*.9) = 1/3;  NPV = .8*.9 / (.8*.9 + .1*.1) = .72/.73
    assert out["ppv_at_prevalence"][0] == pytest.approx(1 / 3)
    assert out["npv_at_prevalence"][0] == pytest.approx(0.72 / 0.73)
    # at the set's own prevalence it equals the plain PPV/NPV
    y, proba, _ = random_case(300, 2, 4)
    prev = float((y == 0).mean())
    block = M.classification_block(y, proba.argmax(1), ["A", "B"], prevalence={"A": prev})
    a = block["per_class"]["A"]
    assert a["ppv_at_prevalence"]["value"] == pytest.approx(a["ppv"]["value"], abs=1e-5)
    assert a["npv_at_prevalence"]["value"] == pytest.approx(a["npv"]["value"], abs=1e-5)
    assert "ppv_at_prevalence" not in block["per_class"]["B"]


# ---------------------------------------------------------------- undefined metrics


def test_empty_class_is_undefined_with_reason() -> None:
    # class C: absent from the truth and never predicted; class B: present, never predicted
    y = np.array([0, 0, 1, 1, 0])
    pred = np.array([0, 0, 0, 0, 0])
    proba = np.array([[.8, .1, .1], [.7, .2, .1], [.6, .3, .1], [.5, .4, .1], [.9, .05, .05]])
    w = M.bootstrap_weights(y, 100, seed=0)
    block = M.classification_block(y, pred, ["A", "B", "C"], w)
    c = block["per_class"]["C"]
    assert c["sensitivity"] == {"value": None, "ci95": None,
                                "undefined_reason": "no C cases in the set (TP+FN=0)"}
    assert c["ppv"]["value"] is None and "never predicted" in c["ppv"]["undefined_reason"]
    assert c["f1"]["value"] is None and c["specificity"]["value"] == 1.0
    b = block["per_class"]["B"]
    assert b["ppv"]["value"] is None and "never predicted B" in b["ppv"]["undefined_reason"]
    assert b["sensitivity"]["value"] == 0.0  # a true zero, not an undefined one
    a = block["per_class"]["A"]
    assert a["npv"]["value"] is None and "every image" in a["npv"]["undefined_reason"]
    macro = block["overall"]["macro_f1"]
    assert macro["value"] == pytest.approx((2 * 3 / (2 * 3 + 2) + 0.0) / 2, abs=1e-6)
    assert "2 of 3" in macro["note"] and "C" in macro["note"]
    assert block["confusion_matrix"]["empty_rows"] == ["C"]
    assert block["confusion_matrix"]["row_normalised"][2] is None
    rank = M.ranking_block(y, proba, ["A", "B", "C"], w)
    assert rank["per_class"]["C"]["roc_auc"]["undefined_reason"] == "no C cases in the set"
    assert "2 of 3" in rank["macro_roc_auc"]["note"]
    json.dumps(block, allow_nan=False)
    json.dumps(rank, allow_nan=False)


def test_single_class_set_and_empty_set_do_not_crash() -> None:
    y = np.zeros(4, int)
    block = M.classification_block(y, y, ["A", "B"], M.bootstrap_weights(y, 20))
    assert block["per_class"]["A"]["specificity"]["value"] is None
    kappa = block["overall"]["cohen_kappa"]
    assert kappa["value"] is None and "expected agreement is 1" in kappa["undefined_reason"]
    assert value(block, "overall", "accuracy") == 1.0
    rank = M.ranking_block(y, np.tile([.9, .1], (4, 1)), ["A", "B"])
    assert "no negatives" in rank["per_class"]["A"]["roc_auc"]["undefined_reason"]
    empty = np.array([], int)
    e = M.classification_block(empty, empty, ["A", "B"], M.bootstrap_weights(empty, 5))
    assert e["overall"]["accuracy"]["undefined_reason"] == "the set is empty"
    cal = M.calibration_block(empty, np.zeros((0, 2)), ["A", "B"])
    assert cal["ece"]["value"] is None
    assert M.curves(empty, np.zeros((0, 2)), ["A", "B"]) == {"roc": {"A": None, "B": None},
                                                             "pr": {"A": None, "B": None}}


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_is_stratified_and_reproducible() -> None:
    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    w1 = M.bootstrap_weights(y, 50, seed=11)
    assert np.array_equal(w1, M.bootstrap_weights(y, 50, seed=11))
    assert not np.array_equal(w1, M.bootstrap_weights(y, 50, seed=12))
    for cls, n in ((0, 30), (1, 10), (2, 5)):
        assert (w1[:, y == cls].sum(1) == n).all()
    yy, proba, _ = random_case(300, 3, 3)
    a = M.classification_block(yy, proba.argmax(1), CLASSES, M.bootstrap_weights(yy, 200, 5))
    b = M.classification_block(yy, proba.argmax(1), CLASSES, M.bootstrap_weights(yy, 200, 5))
    assert a == b


def _all_metrics(block: dict):
    for section in ("overall", "per_class"):
        for v in block[section].values():
            items = v.values() if section == "per_class" else [v]
            for m in items:
                if isinstance(m, dict) and "value" in m:
                    yield m


def test_point_estimate_lies_inside_its_interval() -> None:
    y, proba, _ = random_case(600, 3, 9)
    w = M.bootstrap_weights(y, 1000, seed=0)
    blocks = [M.classification_block(y, proba.argmax(1), CLASSES, w, {"COVID": 0.05}),
              M.ranking_block(y, proba, CLASSES, w)]
    found = list(_all_metrics(blocks[0]))
    found += [m for c in blocks[1]["per_class"].values() for m in c.values()]
    found += [blocks[1]["macro_roc_auc"], M.calibration_block(y, proba, CLASSES, w)["ece"]]
    assert len(found) > 25
    for m in found:
        lo, hi = m["ci95"]
        assert lo <= m["value"] <= hi


def test_interval_narrows_as_n_grows() -> None:
    widths = []
    for n in (150, 1500):
        y, proba, _ = random_case(n, 3, 4)
        w = M.bootstrap_weights(y, 500, seed=0)
        acc = M.classification_block(y, proba.argmax(1), CLASSES, w)["overall"]["accuracy"]
        auc = M.ranking_block(y, proba, CLASSES, w)["macro_roc_auc"]
        widths.append((acc["ci95"][1] - acc["ci95"][0], auc["ci95"][1] - auc["ci95"][0]))
    (acc_small, auc_small), (acc_big, auc_big) = widths
    assert acc_big < acc_small / 2 and auc_big < auc_small / 2  # ~ 1/sqrt(10)


def test_interval_only_over_defined_resamples_is_noted() -> None:
    # B is predicted once: in some resamples that image is not drawn and PPV is undefined
    y = np.array([0] * 20 + [1] * 20)
    pred = np.zeros(40, int)
    pred[20] = 1
    block = M.classification_block(y, pred, ["A", "B"], M.bootstrap_weights(y, 300, 1))
    ppv = block["per_class"]["B"]["ppv"]
    assert ppv["value"] == 1.0 and ppv["ci95"] == [1.0, 1.0]
    assert "resamples where it is defined" in ppv["note"]


# ---------------------------------------------------------------- calibration


def test_ece_matches_a_plain_loop() -> None:
    y, proba, _ = random_case(500, 3, 6)
    conf, correct = proba.max(1), proba.argmax(1) == y
    edges = np.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    assert M.expected_calibration_error(y, proba)[0] == pytest.approx(ece)
    bins = M.reliability_diagram(y, proba)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 500


def test_temperature_scaling_lowers_ece_on_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = 6.0 * (1.2 * np.eye(3)[y] + rng.normal(size=(2000, 3)))  # right direction, too sharp
    t = M.fit_temperature(logits[:1000], y[:1000])
    assert t > 2.0
    before = M.expected_calibration_error(y[1000:], M.softmax_t(logits[1000:]))[0]
    after = M.expected_calibration_error(y[1000:], M.softmax_t(logits[1000:], t))[0]
    assert after < before / 3
    assert M.nll(logits[1000:], y[1000:], t) < M.nll(logits[1000:], y[1000:])
    assert np.array_equal(M.softmax_t(logits, t).argmax(1), logits.argmax(1))  # argmax unchanged


# ---------------------------------------------------------------- operating point


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99, 1.0])
def test_threshold_reaches_target_sensitivity(target: float) -> None:
    y, proba, _ = random_case(700, 3, 8, signal=1.0)
    positive = y == 0
    thr, achieved = M.threshold_for_sensitivity(proba[:, 0], positive, target)
    sens = (proba[positive, 0] >= thr).mean()
    assert sens >= target and sens == pytest.approx(achieved)
    # the highest such threshold: any higher one misses the target
    higher = proba[positive, 0][proba[positive, 0] > thr].min(initial=np.inf)
    assert (proba[positive, 0] >= higher).mean() < target


def test_threshold_with_ties_and_errors() -> None:
    score = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    thr, achieved = M.threshold_for_sensitivity(score, np.ones(5, bool), 0.5)
    assert thr == 0.5 and achieved == 0.8
    with pytest.raises(ValueError):
        M.threshold_for_sensitivity(score, np.zeros(5, bool), 0.9)
    with pytest.raises(ValueError):
        M.threshold_for_sensitivity(score, np.ones(5, bool), 0.0)


def test_decision_rule_at_operating_point() -> None:
    proba = np.array([[0.30, 0.60, 0.10],   # COVID reaches 0.25 -> COVID
                      [0.20, 0.30, 0.50],   # below -> best other: 2
                      [0.20, 0.70, 0.10]])  # below -> 1
    assert M.predict_at_threshold(proba, 0, 0.25).tolist() == [0, 2, 1]
    assert M.predict_at_threshold(proba, 0, 0.0).tolist() == [0, 0, 0]


def test_curves_are_json_ready() -> None:
    y, proba, _ = random_case(200, 3, 1)
    c = M.curves(y, proba, CLASSES)
    text = json.dumps(c, allow_nan=False)
    assert c["roc"]["COVID"]["thresholds"][0] is None  # scikit-learn's +inf start point
    assert c["roc"]["COVID"]["fpr"][0] == 0.0 and c["roc"]["COVID"]["tpr"][-1] == 1.0
    assert c["pr"]["Normal"]["recall"][-1] == 0.0
    assert text


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, core.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_bench_metrics_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from core import bench

    assert "metrics" in bench.SUBCOMMANDS
    assert bench.main(["metrics", "--n", "300", "--resamples", "50", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("metrics: n=300 classes=3 resamples=50") and "full report" in out


@pytest.mark.parametrize(("scale", "seed"), [(1.0, 5), (1.5, 0), (1.5, 5), (1.5, 15)])
def test_ece_interval_contains_its_bias_corrected_estimate(scale: float, seed: int) -> None:
    """A perfectly calibrated model (labels drawn from its own probabilities, true ECE 0) on
    200 images, seeds picked where the plug-in ECE lies *below* its bootstrap percentile
    interval (resampling only adds to each |gap|), as in the report's "0.046 [0.049, 0.129]".
    The reported ECE is bias-corrected, closer to the true 0, and inside its interval."""
    rng = np.random.default_rng(seed)
    proba = M.softmax_t(rng.normal(0, scale, (200, 3)))
    y = np.array([rng.choice(3, p=p) for p in proba])
    w = M.bootstrap_weights(y, 1000, seed=0)
    plug_in = float(M.expected_calibration_error(y, proba)[0])
    naive_lo, _ = M.percentile_ci(M.expected_calibration_error(y, proba, weights=w))
    assert plug_in < naive_lo  # the plug-in estimate lies outside its own percentile interval
    ece = M.calibration_block(y, proba, CLASSES, w)["ece"]
    lo, hi = ece["ci95"]
    assert lo <= ece["value"] <= hi
    assert 0 <= ece["value"] < plug_in
    assert f"plug-in ECE {plug_in:.4f}" in ece["note"]
    assert M.calibration_block(y, proba, CLASSES)["ece"]["value"] == pytest.approx(plug_in, abs=1e-6)
