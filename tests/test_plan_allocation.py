import itertools
import json
import math
import time

import numpy as np
import pytest
from scipy.optimize import brentq

from ringjax.errors import RingjaxError
from ringjax.plan.allocation import (
    AllocationProblem,
    allocate,
    deft_problem,
    equal_bandwidth,
    equal_split_latency,
    greedy,
    optimal_bandwidth,
    random_assignment,
    round_schedule,
)
from ringjax.plan.profiles import preset
from ringjax.plan.simulator import simulate


def latency_with_best_bandwidth(c, s, r, W):
    """Independent reference: the T where the uploading devices' bandwidth needs sum to W."""
    compute_only = max(c[s == 0], default=0.0)
    up = s > 0
    if not up.any():
        return compute_only
    cu, ratio = c[up], s[up] / r[up]
    gap = ratio.sum() / W  # at T = max(cu) + gap the need is at most W
    root = brentq(lambda T: (ratio / (T - cu)).sum() - W, cu.max() + gap * 1e-12, cu.max() + gap * (1 + 1e-9),
                  xtol=1e-300, rtol=4 * np.finfo(float).eps)
    return max(root, compute_only)


def brute_force(problem):
    """Best latency over every injective assignment: (optimal bandwidth, equal bandwidth)."""
    c, s, r, W = problem.compute_seconds, problem.upload_bits, problem.rate_bits_per_hz, problem.bandwidth_hz
    K = problem.num_blocks
    best = best_equal = math.inf
    for devices in itertools.permutations(range(problem.num_devices), K):
        if not problem.allowed[list(devices), range(K)].all():
            continue
        cb, rb = c[list(devices), range(K)], r[list(devices)]
        best = min(best, latency_with_best_bandwidth(cb, s, rb, W))
        with np.errstate(divide="ignore", invalid="ignore"):
            best_equal = min(best_equal, max(cb + np.where(s > 0, s * K / (W * rb), 0.0)))
    return best, best_equal


def random_problem(rng, N, K):
    speed = rng.uniform(0.2, 5, (N, 1))
    compute = rng.uniform(0.5, 10, (N, K)) / speed
    compute[rng.random((N, K)) < 0.2] = np.inf  # block does not fit on that device
    upload = rng.uniform(1e6, 1e8, K)
    upload[rng.random(K) < 0.15] = 0.0
    rates = rng.uniform(0.5, 10, N)
    rates[rng.random(N) < 0.05] = 0.0
    return AllocationProblem(compute, upload, rates, rng.uniform(1e5, 1e7))


def check_valid(problem, allocation):
    assert len(set(allocation.assignment)) == problem.num_blocks
    assert problem.allowed[list(allocation.assignment), range(problem.num_blocks)].all()
    assert sum(allocation.bandwidth_split) == pytest.approx(problem.bandwidth_hz, rel=1e-12)
    assert allocation.round_latency == max(allocation.device_latency)


def test_solver_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    solved = infeasible = 0
    for _ in range(70):
        N = int(rng.integers(1, 7))
        K = int(rng.integers(1, N + 1))
        problem = random_problem(rng, N, K)
        best, best_equal = brute_force(problem)
        if math.isinf(best):
            for solver in (allocate, equal_bandwidth, greedy, random_assignment):
                with pytest.raises(RingjaxError, match="cannot"):
                    solver(problem)
            infeasible += 1
            continue
        allocation = allocate(problem)
        check_valid(problem, allocation)
        assert allocation.round_latency == pytest.approx(best, rel=1e-6)
        assert allocation.round_latency >= best * (1 - 1e-9)
        assert optimal_bandwidth(problem, allocation.assignment).round_latency == allocation.round_latency
        equal = equal_bandwidth(problem)
        assert equal.round_latency == pytest.approx(best_equal, rel=1e-12)
        assert equal_split_latency(problem, equal.assignment) == equal.round_latency
        for baseline in (random_assignment(problem, seed=3), equal):
            assert baseline.round_latency >= allocation.round_latency * (1 - 1e-9)
        solved += 1
    assert solved > 40 and infeasible > 3, (solved, infeasible)


def test_greedy_and_random_baselines():
    rng = np.random.default_rng(1)
    problem = AllocationProblem(rng.uniform(1, 10, (6, 4)), rng.uniform(1e6, 1e7, 4), rng.uniform(1, 5, 6), 1e6)
    optimum = allocate(problem).round_latency
    for allocation in (greedy(problem), random_assignment(problem, 0), random_assignment(problem, 1)):
        check_valid(problem, allocation)
        assert allocation.round_latency >= optimum * (1 - 1e-9)
    # greedy: costliest block (by its best compute) goes first to the device fastest for it
    costliest = int(np.argmax(problem.compute_seconds.min(axis=0)))
    assert greedy(problem).assignment[costliest] == int(np.argmin(problem.compute_seconds[:, costliest]))
    assert random_assignment(problem, 5) == random_assignment(problem, 5)


def test_zero_upload_blocks_need_no_bandwidth():
    compute = np.array([[1.0, 4.0], [2.0, 3.0], [5.0, 5.0]])
    problem = AllocationProblem(compute, [0.0, 0.0], [1.0, 1.0, 1.0], 10.0)
    allocation = allocate(problem)
    assert allocation.round_latency == pytest.approx(3.0, rel=1e-9)  # block 0 on device 0, block 1 on 1
    assert allocation.assignment == (0, 1)
    mixed = AllocationProblem(compute, [0.0, 10.0], [1.0, 1.0, 1.0], 10.0)
    allocation = allocate(mixed)
    check_valid(mixed, allocation)
    assert allocation.round_latency == pytest.approx(brute_force(mixed)[0], rel=1e-9)


def test_infeasible_allocations_say_which_block():
    compute = np.array([[1.0, np.inf, 2.0], [1.0, np.inf, 2.0], [1.0, np.inf, 2.0]])
    with pytest.raises(RingjaxError, match="block 1 cannot be placed"):
        allocate(AllocationProblem(compute, [1.0] * 3, [1.0] * 3, 1.0))
    compute = np.array([[1.0, 1.0, 1.0], [np.inf, np.inf, 1.0], [np.inf, np.inf, 1.0]])
    with pytest.raises(RingjaxError, match="blocks 0, 1 cannot all be placed: they fit only on devices 0"):
        allocate(AllocationProblem(compute, [1.0] * 3, [1.0] * 3, 1.0))
    with pytest.raises(RingjaxError, match="--blocks 4 but only 3 devices: use at most 3 blocks"):
        AllocationProblem(np.ones((3, 4)), [1.0] * 4, [1.0] * 3, 1.0)
    with pytest.raises(RingjaxError, match="positive, finite bandwidth"):
        AllocationProblem(np.ones((3, 2)), [1.0] * 2, [1.0] * 3, 0.0)


def test_json_round_trip_keeps_unfit_pairs():
    compute = np.array([[1.0, np.inf], [2.0, 3.0]])
    problem = AllocationProblem(compute, [8.0, 0.0], [2.0, 3.0], 5.0)
    data = json.loads(json.dumps(problem.to_dict()))
    assert data["compute_seconds"][0][1] is None
    again = AllocationProblem.from_dict(data)
    assert np.array_equal(again.compute_seconds, problem.compute_seconds)
    assert allocate(again) == allocate(problem)
    json.dumps(allocate(problem).to_dict())


def test_deft_problem_from_profiles():
    fleet = [preset("jetson-nano"), preset("jetson-agx-orin")]
    problem = deft_problem(fleet, block_flops=[1e12, 2e12], block_memory_bytes=[1 * 2**30, 6 * 2**30],
                           upload_bits=[8e6, 8e6], bandwidth_hz=1e6, efficiency=0.5)
    assert problem.compute_seconds[0, 0] == pytest.approx(1e12 / (236e9 * 0.5))
    assert math.isinf(problem.compute_seconds[0, 1])  # 6 GiB block on a 4 GiB Nano
    assert list(problem.rate_bits_per_hz) == [5.4, 7.5]
    assert allocate(problem).assignment == (0, 1)


def test_round_schedule_simulates_to_the_round_latency():
    rng = np.random.default_rng(2)
    problem = random_problem(rng, 5, 4)
    problem = AllocationProblem(np.where(np.isfinite(problem.compute_seconds), problem.compute_seconds, 1.0),
                                problem.upload_bits, np.maximum(problem.rate_bits_per_hz, 1.0), 1e6)
    allocation = allocate(problem)
    schedule, costs = round_schedule(problem, allocation)
    fleet = [preset("cpu-host")] * problem.num_devices
    assert simulate(schedule, fleet, costs).makespan == pytest.approx(allocation.round_latency, rel=1e-12)


def test_64_by_64_is_fast():
    rng = np.random.default_rng(3)
    problem = AllocationProblem(rng.uniform(0.5, 10, (64, 64)) / rng.uniform(0.2, 5, (64, 1)),
                                rng.uniform(1e6, 1e8, 64), rng.uniform(0.5, 10, 64), 2e7)
    start = time.perf_counter()
    allocation = allocate(problem)
    seconds = time.perf_counter() - start
    print(f"64x64 allocation: {seconds:.3f} s")
    assert seconds < 5.0
    check_valid(problem, allocation)
    assert allocation.round_latency < equal_bandwidth(problem).round_latency
