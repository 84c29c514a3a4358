"""PAC's activation cache: round trips, keys, and interrupted builds (no model compiles here)."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from ringjax.errors import RingjaxError
from ringjax.methods import activation_cache as ac


def _build(cache_dir, key, lengths, taps_of, dtype, order_seed=0, batch=3):
    """Write examples in shuffled padded batches, as epoch 1 does, and publish."""
    builder = ac.CacheBuilder(cache_dir, key, {"test": key}, lengths, taps_of(0).shape[1], taps_of(0).shape[2], dtype)
    order = np.random.default_rng(order_seed).permutation(len(lengths))
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = int(lengths[idx].max()) + 2  # padded wider than needed
        padded = np.full((len(idx), width, *taps_of(0).shape[1:]), 7.0, np.float32)  # padding garbage
        for row, i in enumerate(idx):
            padded[row, : lengths[i]] = taps_of(i)
        builder.write(np.concatenate([idx, [-1]]), np.concatenate([padded, padded[:1]]))  # a padding row, skipped
    return builder.finish()


def _data(n=11, k=3, h=8, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n)
    taps = [rng.normal(size=(int(length), k, h)).astype(np.float32) for length in lengths]
    return lengths, taps


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("on_disk", [True, False])
def test_round_trip_drops_padding_and_keeps_values(tmp_path, dtype, on_disk):
    lengths, taps = _data()
    cache = _build(tmp_path if on_disk else None, "k1", lengths, lambda i: taps[i], dtype)
    assert cache.taps.shape == (int(lengths.sum()), 3, 8)  # real tokens only
    assert cache.nbytes == lengths.sum() * 3 * 8 * np.dtype(ac.DTYPES[dtype]).itemsize
    if on_disk:
        reopened = ac.ActivationCache.open(tmp_path, "k1")
        assert reopened is not None and cache.disk_bytes >= cache.nbytes
        cache = reopened
    tol = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    for i, want in enumerate(taps):
        got = np.asarray(cache.example(i), np.float32)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 1e-3)
    # batches come back re-padded with zeros, mask rebuilt from the lengths
    idx = np.array([4, 0, 9])
    padded, got_lengths = cache.gather(idx, width=10)
    assert padded.shape == (3, 10, 3, 8) and list(got_lengths) == list(lengths[idx])
    for row, i in enumerate(idx):
        np.testing.assert_allclose(np.asarray(padded[row, : lengths[i]], np.float32), taps[i], rtol=tol, atol=tol * 1e-3)
        assert not np.asarray(padded[row, lengths[i] :], np.float32).any()


def test_bf16_cache_stores_bfloat16_bytes(tmp_path):
    lengths, taps = _data()
    cache = _build(tmp_path, "kb", lengths, lambda i: taps[i], "bf16")
    assert cache.taps.dtype == np.dtype(ml_dtypes.bfloat16)
    assert (tmp_path / "pac-kb" / "taps.bin").stat().st_size == lengths.sum() * 3 * 8 * 2


def test_interrupted_build_is_not_read_and_is_rebuilt(tmp_path):
    lengths, taps = _data()
    cache = _build(tmp_path, "key", lengths, lambda i: taps[i], "float32")
    entry = cache.path
    # simulate a build that died before its marker: complete-looking files, no COMPLETE
    (entry / ac.MARKER).unlink()
    assert ac.ActivationCache.open(tmp_path, "key") is None
    assert not entry.exists()  # removed, so the next run rebuilds
    # a partial taps file with a (forged) marker is caught by the size check
    cache = _build(tmp_path, "key", lengths, lambda i: taps[i], "float32")
    with open(cache.path / "taps.bin", "r+b") as f:
        f.truncate(100)
    assert ac.ActivationCache.open(tmp_path, "key") is None
    # a marker for another key is not accepted either
    cache = _build(tmp_path, "key", lengths, lambda i: taps[i], "float32")
    (cache.path / ac.MARKER).write_text("other")
    assert ac.ActivationCache.open(tmp_path, "key") is None
    # and a rebuild after all that publishes a readable entry
    cache = _build(tmp_path, "key", lengths, lambda i: taps[i], "float32")
    assert ac.ActivationCache.open(tmp_path, "key") is not None


def test_partial_files_under_the_final_name_are_not_read(tmp_path):
    """Hand-made partial entry: taps and index written, meta and marker missing."""
    entry = ac.entry_path(tmp_path, "abc")
    entry.mkdir(parents=True)
    np.zeros((5, 2, 4), np.float32).tofile(entry / "taps.bin")
    np.savez(entry / "index.npz", offsets=np.array([0, 2, 5]), lengths=np.array([2, 3]))
    assert ac.ActivationCache.open(tmp_path, "abc") is None
    assert not entry.exists()


def test_dead_temporary_builds_are_cleaned_and_unfinished_builders_refuse(tmp_path):
    dead = tmp_path / ".pac-zzz.tmp-999999999-deadbeef"  # no such pid
    dead.mkdir()
    (dead / "taps.bin").write_bytes(b"\0" * 64)
    lengths, taps = _data()
    builder = ac.CacheBuilder(tmp_path, "zzz", {}, lengths, 3, 8, "float32")
    assert not dead.exists()
    builder.write(np.array([0]), taps[0][None])
    with pytest.raises(RingjaxError, match="never written"):
        builder.finish()
    builder.abort()
    assert list(tmp_path.iterdir()) == [] and ac.ActivationCache.open(tmp_path, "zzz") is None


def test_key_covers_max_length_tokenizer_data_weights_and_dtype(tmp_path, tiny_bert_dir):
    import jax

    import ringjax
    from ringjax.data import Examples, encode
    from ringjax.methods import pac

    model = ringjax.load_model(str(tiny_bert_dir), head="classification", peft="parallel")
    cfg, spec = model.config, model.peft_config
    tok = ringjax.load_tokenizer(tiny_bert_dir)
    ex = Examples([("a rather long sentence about a film that goes on and on",), ("short one",)], np.array([1, 0]))
    _, frozen = pac.split_params(model.tree())

    def key(max_length=64, tokenizer_dir=tiny_bert_dir, dtype="float32", frozen=frozen, tokenizer=tok):
        enc = encode(ex, tokenizer, max_length)
        identity = {"model": ac.model_identity(tiny_bert_dir), "tokenizer": ac.tokenizer_identity(tokenizer_dir)}
        return pac.cache_material(cfg, spec, frozen, enc, dtype, "train", max_length, identity)[0]

    base = key()
    assert key() == base  # deterministic
    assert key(max_length=8) != base  # truncation changes the ids
    assert key(max_length=63) != base  # nothing truncated, still a different key
    assert key(dtype="bfloat16") != base
    other = jax.tree.map(lambda x: x, frozen)
    other["final"] = {"dummy": np.ones(1)}
    assert key(frozen=other) != base
    # a changed tokenizer (one vocabulary entry renamed): different identity, hence key
    changed = tmp_path / "tok"
    shutil.copytree(tiny_bert_dir, changed)
    vocab = (changed / "vocab.txt").read_text().split("\n")
    vocab[2000] = vocab[2000] + "x"
    (changed / "vocab.txt").write_text("\n".join(vocab))
    tj = json.loads((changed / "tokenizer.json").read_text())
    tj["model"]["vocab"] = {(k + "x" if v == 2000 else k): v for k, v in tj["model"]["vocab"].items()}
    (changed / "tokenizer.json").write_text(json.dumps(tj))
    assert ac.tokenizer_identity(changed) != ac.tokenizer_identity(tiny_bert_dir)
    assert key(tokenizer_dir=changed, tokenizer=ringjax.load_tokenizer(changed)) != base
    # an in-memory tokenizer hashes by vocabulary too
    assert ac.tokenizer_identity(tok) != ac.tokenizer_identity(ringjax.load_tokenizer(changed))
    # a stale key is never looked up: a complete entry for `base` does not answer for another key
    lengths, taps = _data()
    _build(tmp_path / "c", base, lengths, lambda i: taps[i], "float32")
    assert ac.ActivationCache.open(tmp_path / "c", key(max_length=8)) is None
    assert ac.ActivationCache.open(tmp_path / "c", base) is not None


def test_cached_epoch_rebuilds_the_stream_batches(tmp_path):
    """Cached epochs replay the token stream's plan: same rows, order, widths, masks, labels."""
    from ringjax.data import BatchStream, Encoded
    from ringjax.methods import pac

    lengths, taps = _data(n=23)
    ids = np.arange(int(lengths.sum()), dtype=np.int32) % 50 + 1
    encoded = Encoded(ids, np.zeros_like(ids), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                      np.arange(23, dtype=np.int32) % 2, 8, 0)
    cache = _build(tmp_path, "e", lengths, lambda i: taps[i], "float32")
    for drop_last in (True, False):
        stream = BatchStream(encoded, 4, seed=3, buckets=(4, 8), drop_last=drop_last)
        got = list(pac.cached_epoch(cache, encoded, stream, 1))
        want = [pac.cached_batch(cache, b) for b in stream.epoch(1)]
        assert len(got) == len(want) == stream.steps_per_epoch
        for g, w in zip(got, want):
            for key in ("attention_mask", "labels", "example_mask"):
                np.testing.assert_array_equal(g[key], w[key])
            real = w["example_mask"] > 0
            np.testing.assert_array_equal(g["taps"][real], w["taps"][real])

