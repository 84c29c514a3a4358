"""PAC's training maths: cached taps = live backbone, data parallel = one device, ring = one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ringjax
from ringjax.data import Encoded
from ringjax.methods import activation_cache as ac
from ringjax.methods import pac
from ringjax.peft import leaf_mask, split
from ringjax.train.step import init_state, loss_fn

CFG = ringjax.ModelConfig(arch="bert", vocab_size=100, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                          max_position=64, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
HEAD = ringjax.HeadConfig("classification", 2)
SPEC = ringjax.preset("parallel")
WIDTH = 16


@pytest.fixture(scope="module")
def setup():
    key = jax.random.key(0)
    base = ringjax.models.random_backbone(CFG, key)
    params = ringjax.models.assemble(CFG, base, HEAD, SPEC, key)
    trainable, frozen = pac.split_params(params)
    # the side network's output projection starts at zero; move it so every side weight gets a gradient
    leaves, tdef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    trainable = jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, WIDTH + 1, 24)
    ids = rng.integers(5, CFG.vocab_size, int(lengths.sum())).astype(np.int32)
    types = (rng.random(int(lengths.sum())) < 0.3).astype(np.int32)
    data = Encoded(ids, types, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   rng.integers(0, 2, len(lengths)).astype(np.int32), WIDTH, 0)
    return trainable, frozen, data


def _cache(frozen, data, dtype="float32"):
    taps_fn = pac.make_taps_fn(CFG, SPEC, dtype)
    builder = ac.CacheBuilder(None, "t", {}, np.diff(data.offsets), len(pac.stored_taps(SPEC, CFG.num_layers)),
                              CFG.hidden_size, dtype)
    for start in range(0, len(data), 8):
        batch = pac.token_batch(data, np.arange(start, min(start + 8, len(data))), WIDTH, 8)
        builder.write(batch["index"], np.asarray(taps_fn(frozen, batch)))
    return builder.finish()


def _max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_side_gradients_from_cached_taps_equal_live_backbone(setup):
    trainable, frozen, data = setup
    cache = _cache(frozen, data)
    batch = pac.token_batch(data, np.array([3, 17, 5, 0, 9, 21, 12, 7]), WIDTH, 8)  # padded rows of mixed lengths
    batch["example_mask"][2] = 0.0
    live_loss, live = jax.value_and_grad(lambda t: pac.live_loss(CFG, SPEC, HEAD, t, frozen, batch))(trainable)
    side = pac.cached_batch(cache, batch)
    assert np.array_equal(side["attention_mask"], batch["attention_mask"])
    cached_loss, cached = jax.value_and_grad(lambda t: pac.cached_loss(CFG, SPEC, HEAD, t, frozen["final"], side))(trainable)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(live))
    assert scale > 1e-3 and all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(live["peft"]))
    assert abs(float(live_loss) - float(cached_loss)) < 1e-6
    assert _max_diff(live, cached) < 1e-6 * max(scale, 1.0)


def test_cached_loss_matches_the_core_forward_on_unpadded_batches(setup):
    """The core `forward` (spec.kind == 'parallel') and the cached path compute the same model."""
    trainable, frozen, data = setup
    cache = _cache(frozen, data)
    idx = np.flatnonzero(np.diff(data.offsets) == np.diff(data.offsets).max())[:2]
    width = int(np.diff(data.offsets).max())
    batch = pac.token_batch(data, idx, width, len(idx))
    assert batch["attention_mask"].all()
    params = pac.merge_params(trainable, frozen)
    t, f = split(params, leaf_mask(params, SPEC))
    core = loss_fn(t, f, batch, cfg=CFG, spec=SPEC, head=HEAD, depth=CFG.num_layers)
    cached = pac.cached_loss(CFG, SPEC, HEAD, trainable, frozen["final"], pac.cached_batch(cache, batch))
    assert abs(float(core) - float(cached)) < 1e-6


def test_bf16_cache_training_loss_close_to_fp32(setup):
    trainable, frozen, data = setup
    batch = pac.token_batch(data, np.arange(8), WIDTH, 8)
    losses = [float(pac.cached_loss(CFG, SPEC, HEAD, trainable, frozen["final"], pac.cached_batch(_cache(frozen, data, d), batch)))
              for d in ("float32", "bfloat16")]
    assert abs(losses[0] - losses[1]) < 1e-2 * max(1.0, abs(losses[0]))


def test_data_parallel_step_over_four_devices_equals_single_device(setup):
    trainable, frozen, data = setup
    cache = _cache(frozen, data)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    mesh = pac.data_mesh(jax.devices()[:4])
    single = pac.make_side_step(CFG, SPEC, HEAD, optimizer)
    parallel = pac.make_side_step(CFG, SPEC, HEAD, optimizer, mesh)
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(pac.DATA))
    s1 = init_state(optimizer, jax.device_get(trainable))
    s4 = jax.device_put(init_state(optimizer, jax.device_get(trainable)), rep)
    final4 = jax.device_put(frozen["final"], rep)
    for i, idx in enumerate([np.arange(8), np.arange(8, 16)]):
        batch = pac.cached_batch(cache, pac.token_batch(data, idx, WIDTH, 8))
        if i == 0:
            batch["example_mask"] = np.array([1, 1, 1, 1, 1, 0, 0, 1], np.float32)  # shards hold unequal real rows
        s1, l1 = single(s1, frozen["final"], batch)
        s4, l4 = parallel(s4, final4, jax.device_put(batch, rows))
        assert abs(float(l1) - float(l4)) < 1e-6
    assert _max_diff(s1.trainable, s4.trainable) < 1e-6
    assert _max_diff(s1.opt_state, s4.opt_state) < 1e-6


@pytest.mark.parametrize("sizes", [None, (2, 1, 1, 0)])
@pytest.mark.parametrize("every", [1, 2])
def test_ring_forward_taps_equal_single_device(setup, sizes, every):
    _, frozen, data = setup
    spec = SPEC.replace(side_every=every)
    batch = pac.token_batch(data, np.arange(8), WIDTH, 8)
    want = pac.make_taps_fn(CFG, spec, "float32")(frozen, batch)
    ring = pac.RingForward(CFG, spec, frozen, jax.devices()[:4], microbatches=2, sizes=sizes)
    got = ring(batch)
    stored = (0, 2, 4) if every == 2 else (0, 1, 2, 3, 4)  # the embedding output and the tapped blocks' outputs
    assert pac.stored_taps(spec, CFG.num_layers) == stored
    assert got.shape == (8, WIDTH, len(stored), CFG.hidden_size)
    assert float(jnp.abs(got - want).max()) < 1e-5


def test_train_pac_epochs_after_the_first_read_only_the_cache(tmp_path, tiny_bert_dir):
    from ringjax.data import encode, synthetic_split

    model = ringjax.load_model(str(tiny_bert_dir), head="classification", peft="parallel")
    tok = ringjax.load_tokenizer(tiny_bert_dir)
    train = encode(synthetic_split("train", 36), tok, 16)
    dev = encode(synthetic_split("dev", 12), tok, 16)
    optimizer = optax.adamw(1e-3)
    identity = {"tokenizer": ac.tokenizer_identity(tiny_bert_dir)}

    def run(data=train, **kw):
        return pac.train_pac(model.config, model.peft_config, model.head_config, model.tree(), data, dev, 4, 2, 8,
                             optimizer, tmp_path, "bfloat16", buckets=(16,), warmup=False, identity=identity, **kw)

    first = run()
    s = first.summary
    assert [e["source"] for e in s["epochs"]] == ["backbone", "cache"]
    assert len(s["epoch_seconds"]) == 2 and s["cache_bytes"] > 0 and not s["cache_hit"]
    assert s["epoch1_forward"].startswith("ring pipeline")
    # every train example (also the 36 % 8 left out of the epoch's batches) and every dev example is cached
    cfg = model.config
    stored = len(pac.stored_taps(model.peft_config, cfg.num_layers))
    assert s["cache_tap_bytes"] == (train.offsets[-1] + dev.offsets[-1]) * stored * cfg.hidden_size * 2
    # a rerun with the same key never touches the backbone, and trains identically
    again = run()
    assert again.summary["cache_hit"] and [e["source"] for e in again.summary["epochs"]] == ["cache", "cache"]
    np.testing.assert_allclose([e["train_loss"] for e in again.summary["epochs"]],
                               [e["train_loss"] for e in s["epochs"]], rtol=1e-5)
    # a changed maximum length is a different key: rebuilt from the backbone, not read
    shorter = encode(synthetic_split("train", 36), tok, 12)
    assert not run(data=shorter).summary["cache_hit"]
