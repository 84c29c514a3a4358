"""Owner partitions: exact cover, determinism, label skew."""

import numpy as np
import pytest

from ringjax.data import partition
from ringjax.errors import RingjaxError

LABELS = np.repeat(np.arange(4), 250)  # 4 classes x 250


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_iid_is_even_and_deterministic():
    parts = partition(LABELS, 7, seed=1)
    assert_exact_cover(parts, len(LABELS))
    assert {len(p) for p in parts} <= {142, 143}
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(LABELS, 7, seed=1)))


def test_dirichlet_covers_once_and_small_alpha_skews():
    skewed = partition(LABELS, 10, alpha=0.05, seed=0)
    mild = partition(LABELS, 10, alpha=100.0, seed=0)
    for parts in (skewed, mild):
        assert_exact_cover(parts, len(LABELS))
        assert min(len(p) for p in parts) >= 1

    def top_class_share(parts):
        return np.mean([np.bincount(LABELS[p], minlength=4).max() / len(p) for p in parts])

    assert top_class_share(skewed) > 0.85
    assert top_class_share(mild) < 0.4


def test_regression_labels_are_binned():
    scores = np.random.default_rng(0).uniform(0, 5, 400).astype(np.float32)
    parts = partition(scores, 5, alpha=0.1, seed=2)
    assert_exact_cover(parts, 400)
    means = [scores[p].mean() for p in parts]
    assert max(means) - min(means) > 1.0  # owners see different score ranges


def test_impossible_requests_raise():
    with pytest.raises(RingjaxError, match="cannot give 20 owners"):
        partition(np.zeros(10, np.int32), 20)
    with pytest.raises(RingjaxError, match="raise alpha"):
        partition(np.repeat([0, 1], 5), 10, alpha=0.01, seed=0, max_draws=3)
    with pytest.raises(RingjaxError, match="alpha must be > 0"):
        partition(LABELS, 2, alpha=0.0)
