"""The operating table against hand-computed cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix

from core.errors import ConfigError
from core.operating import at_threshold, operating_table, records_arrays

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]


def test_figures_at_a_threshold_by_hand():
    # 2 COVID, 2 Normal, 1 Viral; COVID probabilities 0.9, 0.4 | 0.6, 0.1 | 0.2
    proba = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.6, 0.3, 0.1],
                      [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])
    y = np.array([0, 0, 1, 1, 2])
    r = at_threshold(y, proba, CLASSES, "COVID", 0.5)
    # COVID called for rows 0 and 2: tp 1, fp 1, fn 1, tn 2
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 2)
    assert r["sensitivity"] == pytest.approx(0.5)
    assert r["specificity"] == pytest.approx(2 / 3)
    assert r["ppv"] == pytest.approx(0.5) and r["npv"] == pytest.approx(2 / 3)
    # row 1 (COVID 0.4 < 0.35? no: 0.4 >= 0.35) -> at 0.35 both COVID are caught
    assert at_threshold(y, proba, CLASSES, "COVID", 0.35)["sensitivity"] == 1.0
    # prevalence 0.1: PPV = .5*.1 / (.5*.1 + (1/3)*.9)
    p = at_threshold(y, proba, CLASSES, "COVID", 0.5, prevalence=0.1)
    assert p["ppv"] == pytest.approx(0.05 / (0.05 + 0.3))
    assert p["npv"] == pytest.approx((2 / 3 * 0.9) / (2 / 3 * 0.9 + 0.5 * 0.1))


def test_confusion_matrix_equals_scikit_learn_under_the_decision_rule():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=200)
    y = rng.integers(0, 3, 200)
    t = 0.3
    others = proba.copy()
    others[:, 0] = -1
    pred = np.where(proba[:, 0] >= t, 0, others.argmax(1))
    r = at_threshold(y, proba, CLASSES, "COVID", t)
    assert r["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()


def test_table_is_monotone_in_the_threshold():
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(3), size=300)
    y = rng.integers(0, 3, 300)
    t = operating_table(y, proba, CLASSES, "COVID")
    assert len(t) == 101 and t["threshold"].is_monotonic_increasing
    assert t["sensitivity"].is_monotonic_decreasing
    assert t["specificity"].is_monotonic_increasing
    assert t["sensitivity"].iloc[0] == 1.0 and t["specificity"].iloc[0] == 0.0


def test_records_arrays_reads_the_csv_columns_and_refuses_bad_ones():
    df = pd.DataFrame({"true_class": ["Normal", "COVID"], "prob_COVID": [0.2, 0.7],
                       "prob_Normal": [0.7, 0.2], "prob_Viral Pneumonia": [0.1, 0.1]})
    y, p = records_arrays(df, CLASSES)
    assert y.tolist() == [1, 0] and p[1, 0] == 0.7
    with pytest.raises(ConfigError, match="lack columns"):
        records_arrays(df.drop(columns="prob_COVID"), CLASSES)
    with pytest.raises(ConfigError, match="not one of"):
        operating_table(y, p, CLASSES, "Lung_Opacity")
