"""GLUE metrics in plain numpy (no scikit-learn, and no 1 s scipy.stats import).

Undefined values (a constant prediction, no positive class) score 0.0 rather than NaN,
as scikit-learn does for the Matthews coefficient, so "best checkpoint" comparisons and
logs never see NaN.
"""

from __future__ import annotations

import numpy as np

from ringjax.data.tasks import get_task


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels)) if len(labels) else 0.0


def f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of class `positive`."""
    predictions, labels = _pair(predictions, labels)
    true_pos = np.sum((predictions == positive) & (labels == positive))
    predicted = np.sum(predictions == positive)
    actual = np.sum(labels == positive)
    return float(2 * true_pos / (predicted + actual)) if predicted + actual else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K)."""
    predictions, labels = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true_codes, pred_codes = codes[: len(labels)], codes[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true_codes, pred_codes), 1.0)
    n = confusion.sum()
    true_sums, pred_sums = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = np.trace(confusion) * n - true_sums @ pred_sums
    denominator = np.sqrt((n * n - pred_sums @ pred_sums) * (n * n - true_sums @ true_sums))
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    predictions, labels = _pair(predictions, labels, dtype=np.float64)
    if len(labels) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    x, y = predictions - predictions.mean(), labels - labels.mean()
    return float(np.clip(x @ y / np.sqrt((x @ x) * (y @ y)), -1.0, 1.0))


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation of the ranks (ties share their average rank)."""
    predictions, labels = _pair(predictions, labels, dtype=np.float64)
    return pearson(_ranks(predictions), _ranks(labels))


_METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}

# Reported beside the main metric, as in the GLUE leaderboard.
_SECONDARY = {"pearson": ("spearman",), "f1": ("accuracy",)}


def main_metric_name(task: str) -> str:
    """The metric a task is ranked by (e.g. "matthews_corrcoef" for CoLA)."""
    return get_task(task).metric


def task_metric(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's main metric first, then its GLUE companions (STS-B spearman, F1 tasks accuracy).

    `predictions` may be class ids, logits of shape (n, num_labels) (argmax is taken), or
    regression scores of shape (n,) or (n, 1).
    """
    spec = get_task(task)
    predictions = np.asarray(predictions)
    if spec.is_regression:
        predictions = predictions.reshape(len(predictions))
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    names = (spec.metric, *_SECONDARY.get(spec.metric, ()))
    return {name: _METRICS[name](predictions, labels) for name in names}


def _ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2
    return average_rank[inverse]


def _pair(predictions, labels, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    predictions = np.asarray(predictions, dtype=dtype).reshape(-1)
    labels = np.asarray(labels, dtype=dtype).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    return predictions, labels
