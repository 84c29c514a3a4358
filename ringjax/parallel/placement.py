"""Which contiguous blocks each ring stage holds, and the padded layout the engine uses.

The splits come from the planner (`ringjax.plan.placement`): equal, user-given, or the
bottleneck-optimal split of per-block costs under a memory limit. `Placement` adds what the
SPMD engine needs: every device holds a slab of `max_size` blocks (shorter stages padded), so
the stacked (L, ...) weights are re-laid out as (N * max_size, ...) and sharded over `stage`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ringjax.errors import RingjaxError
from ringjax.plan.placement import at_depth, equal_split, evaluate_split, optimal_placement, split_from_sizes
from ringjax.plan.profiles import format_size

FROZEN_BLOCK_COST = 1.0 / 3.0  # forward only, against forward + backward of a trainable block


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
        return tuple(sum(self.sizes[:d]) for d in range(self.num_stages))

    def padded_index(self) -> list[int]:
        """The block in each slot of the (stage, slot) layout; padding slots repeat the stage's
        first block (they are never run, they only keep every device's slab the same shape)."""
        S = self.max_size
        return [a + j if j < s else a for a, s in zip(self.starts, self.sizes) for j in range(S)]

    def unpadded_index(self) -> list[int]:
        """Position of block l in the flattened (stage, slot) layout."""
        return [d * self.max_size + j for d, s in enumerate(self.sizes) for j in range(s)]


def block_costs(num_layers: int, depth: int, frozen_cost: float = FROZEN_BLOCK_COST) -> tuple[float, ...]:
    """Relative cost per block when the top `depth` blocks train (a frozen block: about a third)."""
    return at_depth([1.0] * num_layers, [frozen_cost] * num_layers, depth)


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

    sizes: "equal" (default, lower stages take the extra blocks), "balanced" (minimise the
    largest stage cost; costs default to `block_costs(num_layers, depth)`), or explicit sizes
    (a sequence or "2,2,1,1"). With `memory_limit`, a stage needs `fixed_bytes` (embedding,
    head, buffers) plus its blocks' `block_bytes`, and a split that does not fit is an error.
    """
    per_block = [float(block_bytes)] * num_layers if isinstance(block_bytes, (int, float)) else [float(b) for b in block_bytes]
    if len(per_block) != num_layers:
        raise RingjaxError(f"{len(per_block)} block sizes for {num_layers} blocks; give one per block")
    if sizes is None or sizes == "equal":
        out = equal_split(num_layers, num_stages)
    elif sizes == "balanced":
        costs = block_costs(num_layers, num_layers if depth is None else depth) if costs is None else tuple(costs)
        if len(costs) != num_layers:
            raise RingjaxError(f"{len(costs)} block costs for {num_layers} blocks; give one cost per block")
        limit = math.inf if memory_limit is None else memory_limit - fixed_bytes
        out = optimal_placement(costs, per_block, [1.0] * num_stages, [limit] * num_stages).sizes
    elif isinstance(sizes, str) and not any(c.isdigit() for c in sizes):
        raise RingjaxError(f"unknown stage split {sizes!r}; use 'equal', 'balanced' or sizes like 2,2,1,1")
    else:
        out = split_from_sizes(sizes, num_layers)
        if len(out) != num_stages:
            raise RingjaxError(f"{len(out)} stage sizes for {num_stages} devices; give one size per device")
    if memory_limit is not None:
        used = evaluate_split(out, [0.0] * num_layers, per_block, [1.0] * num_stages).stage_memory_bytes
        for d, blocks in enumerate(used):
            if fixed_bytes + blocks > memory_limit:
                raise RingjaxError(
                    f"stage {d} ({out[d]} blocks) needs {format_size(fixed_bytes + blocks)} but a device has "
                    f"{format_size(memory_limit)}; use more devices or smaller stages"
                )
    return Placement(out)


def auto_stages(cfg, spec, num_stages: int, microbatch: int, seq_len: int, microbatches: int = 1,
                profiles: Sequence | None = None, *, num_labels: int = 2, dtype: str = "fp32", first_only_top: bool = False):
    """`--placement auto`: a function depth -> stage sizes, the bottleneck-optimal contiguous split
    (`ringjax.plan.placement.optimal_placement`) of the analytic per-block costs
    (`ringjax.plan.costs.block_costs`, one step's `microbatches` microbatches) at that unfreeze depth.

    Devices are equal unless `profiles` (a fleet's device profiles, in ring order) are given; then
    a device's speed is its peak FLOP/s and its memory what it has beside the embedding and head
    every device holds (a block needs its weights, its adapters' gradients and Adam moments, and
    its residuals for the step's microbatches, as `ringjax plan --method ringada` counts them).
    `first_only_top`: the top block computes the first position only (a [CLS]-pooled head).
    """
    from ringjax.plan.costs import block_costs as analytic_costs, embedding_params, head_params, top_layers

    L = cfg.num_layers
    if profiles is None:
        speeds, memories = [1.0] * num_stages, [math.inf] * num_stages
    else:
        if len(profiles) != num_stages:
            raise RingjaxError(f"the fleet has {len(profiles)} devices but the ring has {num_stages}: "
                               f"give --devices {len(profiles)} or a fleet file with {num_stages} devices")
        replicated = 4.0 * (embedding_params(cfg) + head_params(cfg, num_labels))
        speeds = [p.flops(dtype) for p in profiles]
        memories = [p.memory_bytes - replicated for p in profiles]
    chosen: dict[int, tuple[int, ...]] = {}

    def sizes(depth: int) -> tuple[int, ...]:
        if depth not in chosen:
            costs = analytic_costs(cfg, spec, microbatch, seq_len, top_layers(L, depth), first_only_top=first_only_top)
            work = [c.train_flops * microbatches for c in costs]
            memory = [4.0 * (c.params + 3 * c.trainable_params) + microbatches * c.residual_bytes for c in costs]
            chosen[depth] = optimal_placement(work, memory, speeds, memories).sizes
        return chosen[depth]

    return sizes
