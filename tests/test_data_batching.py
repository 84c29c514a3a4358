"""Bucketed batch streams: shapes, determinism, resume, eval coverage, truncation."""

import numpy as np
import pytest

from ringjax.data import BatchStream, Encoded, default_buckets, eval_batches
from ringjax.errors import RingjaxError


def make_encoded(n=103, max_length=64, seed=0) -> Encoded:
    """Example i holds tokens 1000*i + 1, 1000*i + 2, ... so a batch shows which rows it took."""
    lengths = np.random.default_rng(seed).integers(3, max_length + 1, n)
    ids = np.concatenate([1000 * i + np.arange(1, k + 1) for i, k in enumerate(lengths)])
    types = np.concatenate([(np.arange(k) >= k // 2).astype(np.int32) for k in lengths])
    return Encoded(
        input_ids=ids.astype(np.int32),
        token_type_ids=types,
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        labels=(np.arange(n) % 3).astype(np.int32),
        max_length=max_length,
        pad_id=0,
    )


def same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def take(iterator, count):
    return [batch for _, batch in zip(range(count), iterator)]


def test_default_buckets():
    assert default_buckets(64) == (16, 32, 64)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(8) == (8,)


def test_batches_are_bucket_shaped_and_consistent():
    encoded = make_encoded()
    stream = BatchStream(encoded, batch_size=8, seed=0)
    assert stream.steps_per_epoch == 103 // 8
    seen = []
    for batch in stream.epoch(0):
        batch_size, width = batch["input_ids"].shape
        assert batch_size == 8 and width in (16, 32, 64)
        assert {k: v.dtype for k, v in batch.items()} == {
            "input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32,
            "labels": np.int32, "example_mask": np.float32, "index": np.int32,
        }
        assert batch["example_mask"].all()
        for row, i in enumerate(batch["index"]):
            ids, types = encoded.example(i)
            k = len(ids)
            assert np.array_equal(batch["input_ids"][row, :k], ids)
            assert np.array_equal(batch["token_type_ids"][row, :k], types)
            assert batch["attention_mask"][row].sum() == k
            assert not batch["input_ids"][row, k:].any()
            assert batch["labels"][row] == encoded.labels[i]
        assert width == 16 or batch["attention_mask"].sum(1).max() > width // 4
        seen.extend(batch["index"])
    assert len(seen) == len(set(seen)) == 8 * stream.steps_per_epoch


def test_stream_is_deterministic_resumable_and_reshuffles():
    encoded = make_encoded()
    stream = BatchStream(encoded, batch_size=8, seed=5)
    run = take(stream.batches(), 30)  # crosses two epoch boundaries (12 steps each)
    assert same(run, take(BatchStream(encoded, 8, seed=5).batches(), 30))
    for k in (0, 7, 12, 13, 25):
        assert same(run[k:], take(stream.batches(start=k), 30 - k))
    assert stream.locate(25) == (2, 1)
    epoch0 = [set(b["index"]) for b in run[:12]]
    epoch1 = [set(b["index"]) for b in run[12:24]]
    assert epoch0 != epoch1
    other = take(BatchStream(encoded, 8, seed=6).batches(), 12)
    assert not same(run[:12], other)


def test_pad_to_and_truncation():
    encoded = make_encoded()
    batches = list(BatchStream(encoded, 8, seed=0, pad_to=20).epoch(0))
    assert {b["input_ids"].shape for b in batches} == {(8, 20)}
    for batch in batches:
        for row, i in enumerate(batch["index"]):
            ids, _ = encoded.example(i)
            kept = min(len(ids), 20)
            assert np.array_equal(batch["input_ids"][row, :kept], ids[:kept])
    with pytest.raises(RingjaxError, match="buckets or pad_to"):
        BatchStream(encoded, 8, buckets=(16,), pad_to=16)
    with pytest.raises(RingjaxError, match="strictly increasing"):
        BatchStream(encoded, 8, buckets=(32, 16))


def test_eval_covers_every_example_once_with_padding_masked():
    encoded = make_encoded(n=45)
    batches = list(eval_batches(encoded, batch_size=8))
    assert len(batches) == 6
    indices = np.concatenate([b["index"][b["example_mask"] > 0] for b in batches])
    assert np.array_equal(np.sort(indices), np.arange(45))
    masks = np.concatenate([b["example_mask"] for b in batches])
    assert masks.sum() == 45 and (np.concatenate([b["index"] for b in batches]) == -1).sum() == 3
    padded = batches[-1]
    assert padded["attention_mask"].sum(1).min() > 0  # padding rows repeat a real row
    assert same(batches, list(eval_batches(encoded, batch_size=8)))


def test_tiny_dataset_errors():
    with pytest.raises(RingjaxError, match="no full batch of 64"):
        BatchStream(make_encoded(n=10), 64)
