"""DEFT allocation: which device trains which depth block, and how the uplink band is shared.

Device i training block b takes c[i][b] seconds of compute and then uploads s_b bits at
w_i * r_i bit/s (bandwidth share times spectral efficiency). A round ends when the last device
has uploaded, so the objective is T = max_i c[i][b_i] + s_b / (w_i r_i), with every block on a
distinct device and the shares summing to the total band W.

For a fixed T the cheapest bandwidth that lets pair (i, b) finish by T is s_b / (r_i (T - c_ib)),
so T is achievable exactly when a min-cost assignment under those costs needs at most W. That
need falls as T grows, so bisection on T with one rectangular assignment per step is optimal
(to the bisection tolerance); the final assignment then gets its exact bandwidth split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from ringjax.errors import RingjaxError
from ringjax.plan.profiles import DeviceProfile
from ringjax.plan.simulator import Action, Schedule


def _frozen(values: Any, ndim: int, what: str) -> np.ndarray:
    array = np.array(values, dtype=float)
    if array.ndim != ndim or np.isnan(array).any() or (array < 0).any():
        raise ValueError(f"{what} must be a {ndim}-d array of non-negative numbers, got shape {array.shape}")
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True)
class AllocationProblem:
    """Solver inputs; compute_seconds[i][b] is inf where block b does not fit in device i's memory."""

    compute_seconds: np.ndarray  # (devices, blocks)
    upload_bits: np.ndarray  # (blocks,)
    rate_bits_per_hz: np.ndarray  # (devices,) uplink spectral efficiency
    bandwidth_hz: float

    def __post_init__(self):
        compute = _frozen(self.compute_seconds, 2, "compute_seconds")
        upload = _frozen(self.upload_bits, 1, "upload_bits")
        rate = _frozen(self.rate_bits_per_hz, 1, "rate_bits_per_hz")
        devices, blocks = compute.shape
        if upload.shape != (blocks,) or rate.shape != (devices,) or np.isinf(upload).any() or np.isinf(rate).any():
            raise ValueError(f"compute_seconds is {devices}x{blocks}: need {blocks} finite upload_bits "
                             f"and {devices} finite rates")
        if blocks == 0:
            raise RingjaxError("no blocks to allocate: use --blocks 1 or more")
        if blocks > devices:
            raise RingjaxError(f"--blocks {blocks} but only {devices} devices: use at most {devices} blocks")
        if not self.bandwidth_hz > 0 or math.isinf(self.bandwidth_hz):
            raise RingjaxError(f"total bandwidth {self.bandwidth_hz} Hz: give a positive, finite bandwidth")
        object.__setattr__(self, "compute_seconds", compute)
        object.__setattr__(self, "upload_bits", upload)
        object.__setattr__(self, "rate_bits_per_hz", rate)
        object.__setattr__(self, "bandwidth_hz", float(self.bandwidth_hz))

    @property
    def num_devices(self) -> int:
        return self.compute_seconds.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.compute_seconds.shape[1]

    @property
    def allowed(self) -> np.ndarray:
        """(devices, blocks): the block fits and, if it uploads anything, the device can send."""
        can_send = (self.rate_bits_per_hz[:, None] > 0) | (self.upload_bits[None, :] == 0)
        return np.isfinite(self.compute_seconds) & can_send

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready inputs, with null where a block does not fit, so anyone can re-solve."""
        return {
            "compute_seconds": [[None if math.isinf(v) else v for v in row] for row in self.compute_seconds.tolist()],
            "upload_bits": self.upload_bits.tolist(),
            "rate_bits_per_hz": self.rate_bits_per_hz.tolist(),
            "bandwidth_hz": self.bandwidth_hz,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AllocationProblem:
        compute = [[math.inf if v is None else v for v in row] for row in data["compute_seconds"]]
        return cls(compute, data["upload_bits"], data["rate_bits_per_hz"], data["bandwidth_hz"])


@dataclasses.dataclass(frozen=True)
class Allocation:
    """assignment[b] is block b's device; per-device tuples hold 0 for idle devices."""

    assignment: tuple[int, ...]
    bandwidth_split: tuple[float, ...]  # Hz
    device_latency: tuple[float, ...]  # compute + upload seconds
    round_latency: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def deft_problem(profiles: Sequence[DeviceProfile], block_flops: Sequence[float],
                 block_memory_bytes: Sequence[float], upload_bits: Sequence[float], bandwidth_hz: float,
                 dtype: str = "fp32", efficiency: float = 1.0) -> AllocationProblem:
    """Solver inputs from a fleet and per-block costs.

    block_flops[b] is the work of training block b (the forward through the whole model plus the
    backward from the top down to b); it runs at `efficiency` times the device's peak.
    """
    compute = np.array([[flops / (p.flops(dtype) * efficiency) if memory <= p.memory_bytes else math.inf
                         for flops, memory in zip(block_flops, block_memory_bytes, strict=True)]
                        for p in profiles])
    rates = [p.uplink_spectral_efficiency_bits_per_hz for p in profiles]
    return AllocationProblem(compute, upload_bits, rates, bandwidth_hz)


def _raise_unplaceable(problem: AllocationProblem) -> None:
    """Explain, via a set of blocks with too few usable devices (Hall's condition), why none fits."""
    allowed = problem.allowed
    matching = maximum_bipartite_matching(csr_matrix(allowed.T.astype(np.int8)), perm_type="column")
    unmatched = np.flatnonzero(matching < 0)
    if unmatched.size == 0:
        return
    block_of_device = {int(d): b for b, d in enumerate(matching) if d >= 0}
    blocks, devices, queue = {int(unmatched[0])}, set(), [int(unmatched[0])]
    while queue:  # alternating paths from the unmatched block
        for device in np.flatnonzero(allowed[:, queue.pop()]).tolist():
            if device not in devices:
                devices.add(device)
                blocks.add(block_of_device[device])
                queue.append(block_of_device[device])
    if not devices:
        raise RingjaxError(f"block {min(blocks)} cannot be placed: it fits on no device (memory, or no "
                           f"uplink to send it); use devices with more memory or more, smaller blocks")
    raise RingjaxError(
        f"blocks {', '.join(map(str, sorted(blocks)))} cannot all be placed: they fit only on devices "
        f"{', '.join(map(str, sorted(devices)))}; use devices with more memory or fewer blocks (--blocks)")


def _need(problem: AllocationProblem, latency: float) -> np.ndarray:
    """Least bandwidth for each (device, block) to finish by `latency`; inf where impossible or > W."""
    c, s, r = problem.compute_seconds, problem.upload_bits[None, :], problem.rate_bits_per_hz[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(s > 0, s / (r * (latency - c)), 0.0)
    ok = problem.allowed & np.where(s > 0, c < latency, c <= latency) & (need <= problem.bandwidth_hz)
    return np.where(ok, need, np.inf)


def _cheapest_assignment(need: np.ndarray) -> tuple[float, tuple[int, ...]]:
    try:
        blocks, devices = linear_sum_assignment(need.T)
    except ValueError:  # no assignment avoids the forbidden (inf) pairs
        return math.inf, ()
    total = math.fsum(need[devices, blocks])
    return total, tuple(int(d) for d in devices[np.argsort(blocks)])


def optimal_bandwidth(problem: AllocationProblem, assignment: Sequence[int]) -> Allocation:
    """The bandwidth split minimising the round latency of a fixed assignment.

    All uploading devices finish together at T where sum_b s_b / (r_i (T - c_ib)) = W, found by
    bisection to float precision; a block that uploads nothing only needs T >= its compute.
    """
    if len(assignment) != problem.num_blocks or len(set(assignment)) != len(assignment):
        raise ValueError(f"assignment must give each of the {problem.num_blocks} blocks its own device")
    blocks = np.arange(problem.num_blocks)
    devices = np.asarray(assignment, dtype=int)
    if not problem.allowed[devices, blocks].all():
        bad = int(blocks[~problem.allowed[devices, blocks]][0])
        raise RingjaxError(f"block {bad} cannot run on device {assignment[bad]}: it does not fit there")
    c = problem.compute_seconds[devices, blocks]
    s, r, W = problem.upload_bits, problem.rate_bits_per_hz[devices], problem.bandwidth_hz
    uploads = s > 0
    share = np.zeros(problem.num_blocks)
    if uploads.any():
        cu, ratio = c[uploads], s[uploads] / r[uploads]
        lo, hi = cu.max(), cu.max() + math.fsum(ratio) / W  # need(lo) = inf > W >= need(hi)
        while True:
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if math.fsum(ratio / (mid - cu)) > W:
                lo = mid
            else:
                hi = mid
        share[uploads] = ratio / (hi - cu)
        share *= W / share.sum()  # the spare band (when compute-only blocks dominate) speeds uploads
    else:
        share[:] = W / problem.num_blocks
    with np.errstate(divide="ignore", invalid="ignore"):
        latency = c + np.where(uploads, s / (share * r), 0.0)
    bandwidth_split, device_latency = [0.0] * problem.num_devices, [0.0] * problem.num_devices
    for block, device in enumerate(assignment):
        bandwidth_split[device] = float(share[block])
        device_latency[device] = float(latency[block])
    return Allocation(tuple(int(d) for d in assignment), tuple(bandwidth_split), tuple(device_latency),
                      float(latency.max()))


def allocate(problem: AllocationProblem, rtol: float = 1e-9) -> Allocation:
    """The assignment and bandwidth split with the least round latency (within `rtol`)."""
    allowed = problem.allowed
    _raise_unplaceable(problem)
    # Any perfect matching with an equal band split is feasible: an upper bound on T.
    _, start = _cheapest_assignment(np.where(allowed, 1.0, np.inf))
    hi = equal_split_latency(problem, start)
    lo = float(np.where(allowed, problem.compute_seconds, np.inf).min(axis=0).max())
    best = start
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        total, assignment = _cheapest_assignment(_need(problem, mid))
        if total <= problem.bandwidth_hz:
            hi, best = mid, assignment
        else:
            lo = mid
    return optimal_bandwidth(problem, best)


def equal_split_latency(problem: AllocationProblem, assignment: Sequence[int]) -> float:
    """Round latency of `assignment` when every assigned device gets W / K."""
    blocks = np.arange(problem.num_blocks)
    return float(_equal_split_latencies(problem)[np.asarray(assignment), blocks].max())


def _equal_split_latencies(problem: AllocationProblem) -> np.ndarray:
    share = problem.bandwidth_hz / problem.num_blocks
    c, s, r = problem.compute_seconds, problem.upload_bits[None, :], problem.rate_bits_per_hz[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        latency = c + np.where(s > 0, s / (share * r), 0.0)
    return np.where(problem.allowed, latency, np.inf)


def equal_bandwidth(problem: AllocationProblem) -> Allocation:
    """Baseline: every assigned device gets W / K; the assignment minimises the largest latency
    (a bottleneck matching: the least threshold under which every block still has its own device)."""
    _raise_unplaceable(problem)
    latency = _equal_split_latencies(problem)
    thresholds = np.unique(latency[np.isfinite(latency)])
    lo, hi = 0, len(thresholds) - 1  # the largest threshold admits every allowed pair
    while lo < hi:
        mid = (lo + hi) // 2
        matching = maximum_bipartite_matching(csr_matrix((latency <= thresholds[mid]).T.astype(np.int8)),
                                              perm_type="column")
        if (matching >= 0).all():
            hi = mid
        else:
            lo = mid + 1
    usable = (latency <= thresholds[lo]).T.astype(np.int8)
    assignment = tuple(int(d) for d in maximum_bipartite_matching(csr_matrix(usable), perm_type="column"))
    share = problem.bandwidth_hz / problem.num_blocks
    bandwidth_split, device_latency = [0.0] * problem.num_devices, [0.0] * problem.num_devices
    for block, device in enumerate(assignment):
        bandwidth_split[device] = share
        device_latency[device] = float(latency[device, block])
    return Allocation(assignment, tuple(bandwidth_split), tuple(device_latency), float(max(device_latency)))


def random_assignment(problem: AllocationProblem, seed: int = 0) -> Allocation:
    """Baseline: a random assignment among the pairs that fit, with its optimal bandwidth split."""
    _raise_unplaceable(problem)
    costs = np.random.default_rng(seed).random(problem.compute_seconds.shape)
    _, assignment = _cheapest_assignment(np.where(problem.allowed, costs, np.inf))
    return optimal_bandwidth(problem, assignment)


def greedy(problem: AllocationProblem) -> Allocation:
    """Baseline: costliest block first, each to the free device that computes it fastest, then
    the optimal bandwidth split. Ignores uplinks, and may strand a block that only fits on a
    device already taken."""
    _raise_unplaceable(problem)
    compute = np.where(problem.allowed, problem.compute_seconds, np.inf)
    assignment = [-1] * problem.num_blocks
    free = np.ones(problem.num_devices, dtype=bool)
    for block in np.argsort(-compute.min(axis=0), kind="stable").tolist():
        options = np.where(free, compute[:, block], np.inf)
        if not np.isfinite(options).any():
            raise RingjaxError(f"greedy allocation stranded block {block}: every device it fits on is "
                               f"taken; use the optimal allocation")
        device = int(np.argmin(options))
        assignment[block], free[device] = device, False
    return optimal_bandwidth(problem, assignment)


def round_schedule(problem: AllocationProblem,
                   allocation: Allocation) -> tuple[Schedule, dict[tuple[str, int], float]]:
    """One DEFT round as a simulator schedule (compute, then upload, per device; stage = block)
    and its costs, so a round can be drawn with `gantt_png(..., label="stage")`."""
    ticks, costs = ([], []), {}
    for block, device in enumerate(allocation.assignment):
        compute = float(problem.compute_seconds[device, block])
        ticks[0].append(Action(device, "grad", 0, block))
        ticks[1].append(Action(device, "upload", 0, block))
        costs[("grad", block)] = compute
        costs[("upload", block)] = allocation.device_latency[device] - compute
    return Schedule(ticks=ticks), costs
