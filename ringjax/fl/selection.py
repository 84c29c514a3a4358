"""Constraint-aware layer selection: who trains what, and which model the server picks.

- `select_depth`: a client's largest t in [0, L] whose top-t job (t blocks + head; t = 0 is
  the head alone) fits all three budgets by the cost model, or None (the client is excluded).
- `plan_clients`: the local job of every client for a method: caff (own t), uniform-t (the
  weakest participating client's t for everyone), fedavg-full (full fine-tuning, only the
  clients that afford it), fedlora (LoRA in every block, only the clients that afford it).
- `verify_memory`: compiles each distinct job once (one client, not vmapped) and checks XLA's
  measured peak bytes against each client's memory budget; a client over budget is moved to
  the next smaller depth that measures within it (or excluded), so the model's word is never
  the last one.
- `choose_model`: among candidate models, the one that maximises the mean trained depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ringjax.errors import RingjaxError
from ringjax.fl.budgets import Budget, ClientBudgets
from ringjax.fl.clients import LocalJob
from ringjax.fl.costs import CostModel

METHODS = ("caff", "fedavg-full", "fedlora", "uniform-t")


def select_depth(costs: CostModel, budget: Budget) -> int | None:
    """The largest t in [0, L] whose top-t job fits every budget; None when not even the head fits.

    Every t is checked (no monotonicity is assumed of the cost model).
    """
    feasible = [t for t in range(costs.L + 1) if costs.cost(LocalJob("top-t", t)).fits(budget)]
    return max(feasible) if feasible else None


@dataclass
class ClientPlan:
    """The local job of every client for one method (None: the client takes no part)."""

    method: str
    num_layers: int
    jobs: list[LocalJob | None]
    notes: list[str] = field(default_factory=list)

    @property
    def eligible(self) -> np.ndarray:
        return np.array([i for i, j in enumerate(self.jobs) if j is not None], dtype=int)

    @property
    def excluded(self) -> int:
        return sum(j is None for j in self.jobs)

    def depths(self) -> np.ndarray:
        """Trained depth per client (-1 where excluded); full and LoRA count as L."""
        return np.array([-1 if j is None else j.depth for j in self.jobs])

    def summary(self) -> str:
        d = self.depths()
        hist = {int(t): int((d == t).sum()) for t in np.unique(d) if t >= 0}
        text = f"{self.method}: {len(self.jobs) - self.excluded}/{len(self.jobs)} clients take part ({self.excluded} excluded); depth histogram {hist}"
        return "; ".join([text, *self.notes])


def plan_clients(method: str, costs: CostModel, budgets: ClientBudgets) -> ClientPlan:
    if method not in METHODS:
        raise RingjaxError(f"unknown federated method {method!r}; choose one of {METHODS}")
    L = costs.L
    n = len(budgets)
    if method in ("caff", "uniform-t"):
        depths = [select_depth(costs, budgets[i]) for i in range(n)]
        if method == "caff":
            return ClientPlan(method, L, [None if t is None else LocalJob("top-t", t) for t in depths])
        feasible = [t for t in depths if t is not None]
        t_min = min(feasible) if feasible else 0
        return ClientPlan(method, L, [None if t is None else LocalJob("top-t", t_min) for t in depths], [f"uniform t = {t_min}"])
    job = LocalJob("full", L) if method == "fedavg-full" else LocalJob("lora", L)
    cost = costs.cost(job)
    return ClientPlan(method, L, [job if cost.fits(budgets[i]) else None for i in range(n)])


def verify_memory(plan: ClientPlan, budgets: ClientBudgets, measure: Callable[[LocalJob], int]) -> tuple[ClientPlan, dict[LocalJob, int]]:
    """Measure each distinct job's peak bytes (`measure(job)`, cached) and enforce memory budgets.

    Returns the corrected plan and the measured bytes per job. A top-t client over budget drops
    to the largest smaller depth that measures within it; other jobs are excluded.
    """
    measured: dict[LocalJob, int] = {}

    def peak(job: LocalJob) -> int:
        if job not in measured:
            measured[job] = int(measure(job))
        return measured[job]

    jobs = list(plan.jobs)
    moved = 0
    for i, job in enumerate(jobs):
        if job is None:
            continue
        limit = budgets[i].memory_bytes
        if peak(job) <= limit:
            continue
        moved += 1
        new = None
        if job.kind == "top-t":
            for t in range(job.depth - 1, -1, -1):
                if peak(LocalJob("top-t", t)) <= limit:
                    new = LocalJob("top-t", t)
                    break
        jobs[i] = new
    notes = list(plan.notes)
    if moved:
        notes.append(f"{moved} client(s) moved down or out after measuring compiled peak memory")
    if plan.method == "uniform-t":
        live = [j.depth for j in jobs if j is not None]
        if live and min(live) < max(live):
            t_min = min(live)
            jobs = [None if j is None else LocalJob("top-t", t_min) for j in jobs]
            notes.append(f"uniform t lowered to {t_min}")
    return ClientPlan(plan.method, plan.num_layers, jobs, notes), measured


def depth_score(plan: ClientPlan, normalise: str = "fraction") -> float:
    """Mean trained depth over all clients, excluded clients counting 0.

    normalise="fraction": t / L (share of the model's blocks trained, comparable across models of
    different depth); "blocks": t itself (absolute number of trained blocks).
    """
    d = np.maximum(plan.depths(), 0).astype(float)
    if normalise == "fraction":
        return float(d.mean() / plan.num_layers)
    if normalise == "blocks":
        return float(d.mean())
    raise RingjaxError(f"unknown depth normalisation {normalise!r}; use 'fraction' or 'blocks'")


def choose_model(candidates: dict[str, CostModel], budgets: ClientBudgets, normalise: str = "fraction") -> tuple[str, dict[str, float]]:
    """The candidate maximising the mean trained depth under CAFF's selection; ties go to the deeper model.

    Returns (name, score per candidate).
    """
    if not candidates:
        raise RingjaxError("no candidate models to choose from")
    scores = {name: depth_score(plan_clients("caff", costs, budgets), normalise) for name, costs in candidates.items()}
    best = max(candidates, key=lambda name: (round(scores[name], 12), candidates[name].L))
    return best, scores
