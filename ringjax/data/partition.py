"""Split a dataset among owners (ring devices, federated clients): IID or label-skewed.

Label skew follows the usual Dirichlet recipe (Hsu et al. 2019): for every class, draw
owner shares from Dirichlet(alpha) and deal that class's examples out in those shares.
Small alpha gives each owner few classes; large alpha approaches IID.
"""

from __future__ import annotations

import numpy as np

from ringjax.errors import RingjaxError


def partition(
    labels: np.ndarray,
    num_owners: int,
    alpha: float | None = None,
    seed: int = 0,
    min_size: int = 1,
    num_bins: int = 5,
    max_draws: int = 100,
) -> list[np.ndarray]:
    """Sorted example indices for each owner; every example goes to exactly one owner.

    `alpha=None` deals a random permutation out evenly. Otherwise the split is
    Dirichlet(alpha) per class, re-drawn (at most `max_draws` times) until every owner has
    `min_size` examples. Float labels (regression) are grouped into `num_bins` quantile bins.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_owners < 1:
        raise RingjaxError(f"num_owners must be at least 1, got {num_owners}")
    if num_owners * min_size > n:
        raise RingjaxError(
            f"{n} examples cannot give {num_owners} owners {min_size} each; "
            "lower the number of owners or use more data"
        )
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_owners)]
    if not alpha > 0:
        raise RingjaxError(f"Dirichlet alpha must be > 0, got {alpha}; or pass None for IID")
    classes = _classes(labels, num_bins)
    members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    for _ in range(max_draws):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_owners)]
        for indices in members:
            proportions = rng.dirichlet(np.full(num_owners, alpha))
            cuts = np.round(np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
            for owner, part in enumerate(np.split(rng.permutation(indices), cuts)):
                shares[owner].append(part)
        parts = [np.sort(np.concatenate(owner_parts)) for owner_parts in shares]
        if min(len(part) for part in parts) >= min_size:
            return parts
    raise RingjaxError(
        f"Dirichlet(alpha={alpha}) left an owner with fewer than {min_size} examples in "
        f"{max_draws} draws; raise alpha or lower the number of owners"
    )


def _classes(labels: np.ndarray, num_bins: int) -> np.ndarray:
    """Class ids as they are; float scores as their quantile bin."""
    if not np.issubdtype(labels.dtype, np.floating):
        return labels
    edges = np.unique(np.quantile(labels, np.linspace(0, 1, num_bins + 1)[1:-1]))
    return np.searchsorted(edges, labels, side="right")
