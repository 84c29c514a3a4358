"""Padded batches from `Encoded` data: few shapes (so few compilations), deterministic, resumable.

Each batch is padded to one of a few bucket lengths: examples are grouped by the smallest
bucket that holds them, and the leftovers of a bucket (fewer than a batch) move up to the
next one, so an epoch has exactly n // batch_size full batches whatever the shuffle. The
batches of epoch e depend only on (data, batch_size, buckets, seed, e), so a run resumes
from a global batch position with no saved iterator state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ringjax.data.tokenize import Encoded
from ringjax.errors import RingjaxError

Batch = dict[str, np.ndarray]


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 16 below `max_length`, then `max_length` itself."""
    lengths = []
    length = 16
    while length < max_length:
        lengths.append(length)
        length *= 2
    return (*lengths, max_length)


class BatchStream:
    """An endless stream of global batches; epoch e is shuffled by (seed, e).

    Every batch is a dict of numpy arrays with leading dimension `batch_size`:
    input_ids, attention_mask, token_type_ids (int32, (B, T) with T a bucket length),
    labels (int32 or float32), example_mask (float32: 0 marks a padding row, which only a
    last partial batch has) and index (int32 example index, -1 for padding rows).
    Examples longer than the largest bucket are cut to it.
    """

    def __init__(
        self,
        encoded: Encoded,
        batch_size: int,
        seed: int = 0,
        buckets: tuple[int, ...] | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        pad_to: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise RingjaxError(f"batch_size must be at least 1, got {batch_size}")
        if len(encoded) == 0:
            raise RingjaxError("no examples to batch; check that the data split is not empty")
        if seed < 0:
            raise RingjaxError(f"seed must be >= 0, got {seed}")
        if pad_to is not None and buckets is not None:
            raise RingjaxError("give buckets or pad_to, not both; pad_to=T means buckets=(T,)")
        if pad_to is not None:
            buckets = (pad_to,)
        buckets = tuple(buckets) if buckets is not None else default_buckets(encoded.max_length)
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise RingjaxError(
                f"buckets {buckets} must be positive, strictly increasing lengths, "
                "e.g. (16, 32, 64)"
            )
        if drop_last and len(encoded) < batch_size:
            raise RingjaxError(
                f"{len(encoded)} examples make no full batch of {batch_size}; "
                "lower batch_size or pass drop_last=False"
            )
        self.encoded = encoded
        self.batch_size = batch_size
        self.seed = seed
        self.buckets = buckets
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._lengths = np.minimum(encoded.lengths, buckets[-1])

    @property
    def steps_per_epoch(self) -> int:
        n, size = len(self.encoded), self.batch_size
        return n // size if self.drop_last else -(-n // size)

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global batch `position`."""
        return divmod(position, self.steps_per_epoch)

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Global batches `start, start + 1, ...` (up to `stop`, else forever)."""
        epoch, index = self.locate(start)
        position = start
        while True:
            for indices in self.epoch_plan(epoch)[index:]:
                if stop is not None and position >= stop:
                    return
                yield self._assemble(indices)
                position += 1
            epoch, index = epoch + 1, 0

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch."""
        first = epoch * self.steps_per_epoch
        return self.batches(first, first + self.steps_per_epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The example indices of each batch of `epoch`, in stream order."""
        rng = np.random.default_rng((self.seed, epoch))
        n, size = len(self.encoded), self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        bucket_of = np.searchsorted(self.buckets, self._lengths[order])
        plan: list[np.ndarray] = []
        carry = order[:0]
        for bucket in range(len(self.buckets)):
            members = np.concatenate([carry, order[bucket_of == bucket]])
            full = len(members) - len(members) % size
            plan.extend(members[i : i + size] for i in range(0, full, size))
            carry = members[full:]
        if len(carry) and not self.drop_last:
            plan.append(carry)
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def _assemble(self, indices: np.ndarray) -> Batch:
        """Pad the examples at `indices` to the smallest bucket that holds the longest."""
        encoded, size = self.encoded, self.batch_size
        real = len(indices)
        lengths = self._lengths[indices]
        width = self.buckets[int(np.searchsorted(self.buckets, lengths.max()))]
        rows = np.concatenate([indices, np.full(size - real, indices[0])])  # repeat a real row
        lengths = self._lengths[rows]
        columns = np.arange(width)
        attention = columns[None, :] < lengths[:, None]
        positions = np.where(attention, encoded.offsets[rows][:, None] + columns[None, :], 0)
        real_rows = np.arange(size) < real
        return {
            "input_ids": np.where(attention, encoded.input_ids[positions], encoded.pad_id).astype(
                np.int32
            ),
            "attention_mask": attention.astype(np.int32),
            "token_type_ids": np.where(attention, encoded.token_type_ids[positions], 0).astype(
                np.int32
            ),
            "labels": encoded.labels[rows],
            "example_mask": real_rows.astype(np.float32),
            "index": np.where(real_rows, rows, -1).astype(np.int32),
        }


def eval_batches(
    encoded: Encoded,
    batch_size: int,
    buckets: tuple[int, ...] | None = None,
    pad_to: int | None = None,
) -> Iterator[Batch]:
    """Every example exactly once, unshuffled; weight metrics by `example_mask`.

    Rows come grouped by bucket (file order within a bucket); `index` maps them back.
    """
    stream = BatchStream(
        encoded, batch_size, buckets=buckets, shuffle=False, drop_last=False, pad_to=pad_to
    )
    return stream.epoch(0)
