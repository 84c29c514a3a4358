"""Metrics against hand-computed values and scipy."""

import numpy as np
import pytest
from scipy import stats

from ringjax.data import (
    accuracy,
    f1,
    main_metric_name,
    matthews_corrcoef,
    pearson,
    spearman,
    task_metric,
)

PRED = np.array([1, 1, 0, 1, 0, 0, 1, 1])
GOLD = np.array([1, 0, 0, 1, 1, 0, 1, 1])  # tp=4, fp=1, fn=1, tn=2


def test_classification_metrics_by_hand():
    assert accuracy(PRED, GOLD) == pytest.approx(6 / 8)
    assert f1(PRED, GOLD) == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    expected_mcc = (4 * 2 - 1 * 1) / np.sqrt((4 + 1) * (4 + 1) * (2 + 1) * (2 + 1))
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx(expected_mcc)


def test_multiclass_mcc_matches_confusion_formula():
    gold = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    pred = np.array([0, 2, 2, 0, 1, 1, 1, 1, 2, 0])
    confusion = np.zeros((3, 3))
    np.add.at(confusion, (gold, pred), 1)
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    expected = (c * s - t @ p) / np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    assert matthews_corrcoef(pred, gold) == pytest.approx(expected)


def test_correlations_match_scipy_including_ties():
    rng = np.random.default_rng(0)
    gold = np.round(rng.uniform(0, 5, 200), 1)  # many ties
    pred = gold + rng.normal(0, 1, 200)
    assert pearson(pred, gold) == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert spearman(pred, gold) == pytest.approx(stats.spearmanr(pred, gold)[0])


def test_undefined_values_are_zero_not_nan():
    assert matthews_corrcoef(np.ones(4), np.array([0, 1, 0, 1])) == 0.0
    assert pearson(np.full(4, 0.1), np.arange(4.0)) == 0.0
    assert f1(np.zeros(3), np.zeros(3)) == 0.0


def test_task_metric_main_metric_first():
    assert main_metric_name("CoLA") == "matthews_corrcoef"
    assert list(task_metric("mrpc", PRED, GOLD)) == ["f1", "accuracy"]
    logits = np.stack([1 - PRED, PRED], axis=1).astype(np.float32)
    assert task_metric("sst2", logits, GOLD) == {"accuracy": pytest.approx(0.75)}
    scores = np.array([[0.5], [1.0], [3.0], [4.5]])
    result = task_metric("STS-B", scores, np.array([0.0, 2.0, 2.5, 5.0]))
    assert list(result) == ["pearson", "spearman"] and result["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy(np.zeros(3), np.zeros(2))
