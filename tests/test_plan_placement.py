import itertools

import numpy as np
import pytest

from ringjax.errors import RingjaxError
from ringjax.plan.placement import (
    at_depth,
    equal_split,
    evaluate_split,
    optimal_placement,
    split_from_sizes,
    stage_ranges,
)


def all_splits(num_blocks, num_stages):
    for cuts in itertools.combinations(range(1, num_blocks), num_stages - 1):
        bounds = (0, *cuts, num_blocks)
        yield tuple(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]))


def brute_force(cost, memory, speeds, memories):
    fitting = [evaluate_split(sizes, cost, memory, speeds) for sizes in all_splits(len(cost), len(speeds))]
    fitting = [p for p in fitting if p.fits(memories)]
    return min((p.bottleneck_seconds for p in fitting), default=None)


def test_dp_matches_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    checked = infeasible = 0
    for _ in range(300):
        N = int(rng.integers(1, 5))
        L = int(rng.integers(N, 9))
        trainable = rng.uniform(1, 10, L)
        cost = at_depth(trainable, trainable / 3, int(rng.integers(0, L + 1)))
        memory = rng.integers(1, 10, L).astype(float)
        speeds = rng.choice([1.0, 2.0, 3.0, 0.5], N) * rng.uniform(0.9, 1.1, N)
        memories = rng.uniform(memory.max() * 0.8, memory.sum(), N)
        expected = brute_force(cost, memory, speeds, memories)
        if expected is None:
            with pytest.raises(RingjaxError, match="no contiguous split"):
                optimal_placement(cost, memory, speeds, memories)
            infeasible += 1
            continue
        placement = optimal_placement(cost, memory, speeds, memories)
        assert placement.bottleneck_seconds == expected
        assert placement.fits(memories) and sum(placement.sizes) == L and min(placement.sizes) >= 1
        checked += 1
    assert checked > 150 and infeasible > 10, (checked, infeasible)


def test_faster_devices_get_more_blocks_and_memory_binds():
    cost, memory = [1.0] * 12, [1.0] * 12
    assert optimal_placement(cost, memory, [1, 1, 1, 1], [12] * 4).sizes == (3, 3, 3, 3)
    assert optimal_placement(cost, memory, [1, 3, 1, 1], [12] * 4).sizes[1] >= 5
    assert optimal_placement(cost, memory, [1, 3, 1, 1], [12, 4, 12, 12]).sizes[1] == 4


def test_frozen_blocks_cost_less_so_lower_stages_take_more():
    trainable = [3.0] * 8
    cost = at_depth(trainable, [1.0] * 8, depth=2)
    assert cost == (1.0,) * 6 + (3.0,) * 2
    sizes = optimal_placement(cost, [1.0] * 8, [1.0] * 2, [8.0] * 2).sizes
    assert sizes == (6, 2)


def test_memory_error_says_what_is_needed():
    with pytest.raises(RingjaxError, match="needs 6B on one device .the largest block alone needs 3B"):
        optimal_placement([1.0] * 4, [3.0] * 4, [1.0, 1.0], [5.0, 5.0])


def test_more_devices_than_blocks():
    with pytest.raises(RingjaxError, match="--devices 8 but the model has 6 blocks: use at most 6 devices"):
        optimal_placement([1.0] * 6, [1.0] * 6, [1.0] * 8, [1e9] * 8)
    with pytest.raises(RingjaxError, match="use at most 6 devices"):
        equal_split(6, 8)


def test_equal_and_user_splits():
    assert equal_split(12, 4) == (3, 3, 3, 3)
    assert equal_split(6, 4) == (2, 2, 1, 1)
    assert split_from_sizes("2,2,1,1", 6) == (2, 2, 1, 1)
    assert split_from_sizes([3, 3], 6) == (3, 3)
    assert stage_ranges((2, 1, 3)) == (range(0, 2), range(2, 3), range(3, 6))
    for bad in ("2,2,1", "3,0,3", "a,b"):
        with pytest.raises(RingjaxError, match="stage sizes"):
            split_from_sizes(bad, 6)


def test_evaluate_split_reports_stage_time_and_memory():
    placement = evaluate_split((1, 2), [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [1.0, 2.0])
    assert placement.stage_seconds == (1.0, 2.5)
    assert placement.stage_memory_bytes == (4.0, 11.0)
    assert placement.bottleneck_seconds == 2.5
    assert placement.fits([4.0, 11.0]) and not placement.fits([4.0, 10.0])
