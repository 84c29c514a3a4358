"""Placement: which contiguous blocks each pipeline stage holds.

A `Placement` splits L blocks into N contiguous, non-empty stages: stage d holds blocks
`starts[d] .. stops[d] - 1` and runs on device d of the `stage` mesh axis. Sizes come from the
user, an equal split, or a balance of per-block costs (a frozen block costs about a third of a
trainable one: forward only, versus forward, backward to the input and the adapter gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ringjax.errors import RingjaxError

FROZEN_BLOCK_COST = 1.0 / 3.0  # forward only, relative to forward + backward of a trainable block


@dataclass(frozen=True)
class Placement:
    sizes: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if not self.sizes or min(self.sizes) < 1:
            raise RingjaxError(f"every stage needs at least one block; got stage sizes {list(self.sizes)}")

    @property
    def num_stages(self) -> int:
        return len(self.sizes)

    @property
    def num_layers(self) -> int:
        return sum(self.sizes)

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def starts(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(a + s for a, s in zip(self.starts, self.sizes))

    def stage_of(self, layer: int) -> int:
        for d, (a, b) in enumerate(zip(self.starts, self.stops)):
            if a <= layer < b:
                return d
        raise IndexError(layer)

    def padded_index(self) -> list[int]:
        """For the (stage, slot) layout with `max_size` slots per stage: the block in each slot.

        Padding slots repeat the stage's first block (never run; they only keep shapes equal).
        """
        out = []
        for a, s in zip(self.starts, self.sizes):
            out += [a + j for j in range(s)] + [a] * (self.max_size - s)
        return out

    def unpadded_index(self) -> list[int]:
        """Position of block l in the flattened (stage, slot) layout."""
        return [d * self.max_size + j for d, s in enumerate(self.sizes) for j in range(s)]


def block_costs(num_layers: int, depth: int, frozen_cost: float = FROZEN_BLOCK_COST) -> list[float]:
    """Relative cost per block when the top `depth` blocks train."""
    return [1.0 if l >= num_layers - depth else frozen_cost for l in range(num_layers)]


def equal_sizes(num_layers: int, num_stages: int) -> tuple[int, ...]:
    _check_counts(num_layers, num_stages)
    q, r = divmod(num_layers, num_stages)
    return tuple(q + (1 if d < r else 0) for d in range(num_stages))


def balanced_sizes(costs: Sequence[float], num_stages: int) -> tuple[int, ...]:
    """Contiguous split minimising the largest stage cost (exact dynamic programme).

    Ties prefer putting more blocks in lower stages (they are the ones that stay frozen longest).
    """
    L = len(costs)
    _check_counts(L, num_stages)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: min over splits of the first i blocks into k stages of the max stage cost
    best = [[inf] * (L + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, L - (num_stages - k) + 1):
            for j in range(i - 1, k - 2, -1):  # last stage is blocks j..i-1, smallest first
                if best[k - 1][j] == inf:
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], L
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return tuple(reversed(sizes))


def _check_counts(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise RingjaxError(f"a ring needs at least one stage; got {num_stages}")
    if num_stages > num_layers:
        raise RingjaxError(
            f"{num_stages} stages for {num_layers} blocks: every stage needs a block; use at most {num_layers} devices"
        )


def plan_stages(
    num_layers: int,
    num_stages: int,
    sizes: Sequence[int] | str | None = None,
    *,
    depth: int | None = None,
    costs: Sequence[float] | None = None,
    memory_limit: float | None = None,
    block_bytes: float | Sequence[float] = 0.0,
    fixed_bytes: float = 0.0,
) -> Placement:
    """Split `num_layers` blocks into `num_stages` contiguous stages.

    sizes: explicit sizes, "equal" (default), or "balanced" (from `costs`, or from
    `block_costs(num_layers, depth)` when only a depth is given). With `memory_limit`, each stage
    needs `fixed_bytes` (embedding, head, buffers) plus its blocks' `block_bytes`.
    """
    _check_counts(num_layers, num_stages)
    if sizes is None or sizes == "equal":
        out = equal_sizes(num_layers, num_stages)
    elif sizes == "balanced":
        if costs is None:
            costs = block_costs(num_layers, num_layers if depth is None else depth)
        if len(costs) != num_layers:
            raise RingjaxError(f"{len(costs)} block costs for {num_layers} blocks; give one cost per block")
        out = balanced_sizes(costs, num_stages)
    elif isinstance(sizes, str):
        raise RingjaxError(f"unknown stage split {sizes!r}; use 'equal', 'balanced' or sizes like 2,2,1,1")
    else:
        out = tuple(int(s) for s in sizes)
        if len(out) != num_stages:
            raise RingjaxError(f"{len(out)} stage sizes {list(out)} for {num_stages} devices; give one size per device")
        if sum(out) != num_layers:
            raise RingjaxError(f"stage sizes {list(out)} sum to {sum(out)}, but the model has {num_layers} blocks")
    placement = Placement(out)
    if memory_limit is not None:
        per_block = [float(block_bytes)] * num_layers if isinstance(block_bytes, (int, float)) else list(block_bytes)
        for d, (a, b) in enumerate(zip(placement.starts, placement.stops)):
            need = fixed_bytes + sum(per_block[a:b])
            if need > memory_limit:
                raise RingjaxError(
                    f"stage {d} (blocks {a}-{b - 1}) needs {need / 2**20:.1f} MiB but the device limit is "
                    f"{memory_limit / 2**20:.1f} MiB; use more devices or smaller stages"
                )
    return placement


def parse_sizes(text: str | None):
    """CLI form: None/'equal'/'balanced' or '2,2,1,1'."""
    if text is None or text in ("equal", "balanced"):
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise RingjaxError(f"cannot read stage sizes {text!r}; write 'equal', 'balanced' or sizes like 2,2,1,1") from None
