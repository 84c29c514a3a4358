"""Contiguous placement of L blocks on a ring of N heterogeneous devices.

Stage i (blocks bottom-up) runs on device i. A pipeline's steady-state step time is set by its
slowest stage, so the planner minimises the bottleneck max_i cost(stage i) / speed_i under every
device's memory limit. Costs depend on the unfreeze depth (a frozen block costs about a third of
a trainable one and keeps no residuals), so callers pick per-block arrays with `at_depth`.
Stage sums use `math.fsum`, so a split's time is the same number however it is computed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ringjax.errors import RingjaxError
from ringjax.plan.profiles import format_size


@dataclasses.dataclass(frozen=True)
class Placement:
    """Blocks per stage (bottom-up; stage i on device i) with each stage's time and memory."""

    sizes: tuple[int, ...]
    stage_seconds: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]

    @property
    def bottleneck_seconds(self) -> float:
        return max(self.stage_seconds)

    @property
    def ranges(self) -> tuple[range, ...]:
        return stage_ranges(self.sizes)

    def fits(self, memories: Sequence[float]) -> bool:
        return all(used <= limit for used, limit in zip(self.stage_memory_bytes, memories, strict=True))


def stage_ranges(sizes: Sequence[int]) -> tuple[range, ...]:
    """Block indices of each stage."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return tuple(range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]))


def _check_count(num_blocks: int, num_stages: int) -> None:
    if num_stages < 1:
        raise RingjaxError(f"--devices {num_stages}: use at least 1 device")
    if num_stages > num_blocks:
        raise RingjaxError(f"--devices {num_stages} but the model has {num_blocks} blocks: "
                           f"use at most {num_blocks} devices")


def equal_split(num_blocks: int, num_stages: int) -> tuple[int, ...]:
    """As even as possible; the lower stages take the extra blocks, since top stages train first."""
    _check_count(num_blocks, num_stages)
    base, extra = divmod(num_blocks, num_stages)
    return tuple(base + (stage < extra) for stage in range(num_stages))


def split_from_sizes(sizes: Sequence[int] | str, num_blocks: int) -> tuple[int, ...]:
    """Validate user-given stage sizes (a sequence or text like "2,2,1,1") against the model."""
    if isinstance(sizes, str):
        try:
            sizes = [int(part) for part in sizes.split(",")]
        except ValueError:
            raise RingjaxError(f"cannot read stage sizes {sizes!r}: write integers like 2,2,1,1") from None
    sizes = tuple(int(size) for size in sizes)
    _check_count(num_blocks, len(sizes))
    if min(sizes) < 1 or sum(sizes) != num_blocks:
        raise RingjaxError(f"stage sizes {','.join(map(str, sizes))} must be positive and sum to the "
                           f"model's {num_blocks} blocks")
    return sizes


def at_depth(trainable: Sequence[float], frozen: Sequence[float], depth: int) -> tuple[float, ...]:
    """Per-block values when the top `depth` blocks are unfrozen and the rest are frozen."""
    if len(trainable) != len(frozen) or not 0 <= depth <= len(trainable):
        raise ValueError(f"need equal-length arrays and 0 <= depth <= {len(trainable)}, got depth {depth}")
    boundary = len(trainable) - depth
    return tuple(float(v) for v in (*frozen[:boundary], *trainable[boundary:]))


def evaluate_split(sizes: Sequence[int], block_cost: Sequence[float], block_memory: Sequence[float],
                   speeds: Sequence[float]) -> Placement:
    """Stage times (cost / speed) and memories of a given split."""
    ranges = stage_ranges(sizes)
    if len(ranges) != len(speeds) or ranges[-1].stop != len(block_cost):
        raise ValueError(f"split {tuple(sizes)} does not match {len(block_cost)} blocks on {len(speeds)} devices")
    return Placement(
        sizes=tuple(sizes),
        stage_seconds=tuple(math.fsum(block_cost[r.start:r.stop]) / speed for r, speed in zip(ranges, speeds)),
        stage_memory_bytes=tuple(math.fsum(block_memory[r.start:r.stop]) for r in ranges),
    )


def _segment_sums(values: Sequence[float]) -> np.ndarray:
    """table[k, j] = fsum(values[k:j]) for k < j, inf elsewhere."""
    n = len(values)
    table = np.full((n + 1, n + 1), np.inf)
    for k in range(n):
        for j in range(k + 1, n + 1):
            table[k, j] = math.fsum(values[k:j])
    return table


def _bottleneck_dp(cost: np.ndarray, memory: np.ndarray, speeds: Sequence[float],
                   memories: Sequence[float]) -> tuple[float, tuple[int, ...]]:
    """Exact min-max contiguous split by dynamic programming over (stages used, blocks placed)."""
    num_blocks, num_stages = cost.shape[0] - 1, len(speeds)
    best = np.full(num_blocks + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((num_stages, num_blocks + 1), dtype=int)
    for stage, (speed, limit) in enumerate(zip(speeds, memories)):
        # candidate[k, j]: first k blocks on earlier stages, blocks k..j-1 on this one
        candidate = np.maximum(best[:, None], cost / speed)
        candidate[memory > limit] = np.inf
        choice[stage] = np.argmin(candidate, axis=0)
        best = candidate[choice[stage], np.arange(num_blocks + 1)]
    sizes, end = [], num_blocks
    for stage in reversed(range(num_stages)):
        start = int(choice[stage, end])
        sizes.append(end - start)
        end = start
    return float(best[num_blocks]), tuple(reversed(sizes))


def optimal_placement(block_cost: Sequence[float], block_memory: Sequence[float],
                      speeds: Sequence[float], memories: Sequence[float]) -> Placement:
    """The contiguous split minimising the bottleneck stage time within every device's memory.

    `block_cost` is work per block (FLOPs, or seconds at unit speed) and `speeds` the matching
    rate per device in ring order; `memories` is what each device has for its blocks. O(N L^2).
    """
    num_blocks, num_stages = len(block_cost), len(speeds)
    if len(block_memory) != num_blocks or len(memories) != num_stages:
        raise ValueError("block_cost/block_memory and speeds/memories must have matching lengths")
    if min(speeds, default=1) <= 0:
        raise RingjaxError("every device needs a positive speed: check peak_flops in the fleet file")
    _check_count(num_blocks, num_stages)
    cost, memory = _segment_sums(block_cost), _segment_sums(block_memory)
    bottleneck, sizes = _bottleneck_dp(cost, memory, speeds, memories)
    if math.isinf(bottleneck):
        needed, _ = _bottleneck_dp(memory, np.zeros_like(memory), [1.0] * num_stages, [0.0] * num_stages)
        raise RingjaxError(
            f"no contiguous split of {num_blocks} blocks over {num_stages} devices fits their memory: "
            f"even the split with the smallest largest stage needs {format_size(needed)} on one "
            f"device (the largest block alone needs {format_size(max(block_memory))}); "
            f"use devices with more memory, or more devices")
    return evaluate_split(sizes, block_cost, block_memory, speeds)
