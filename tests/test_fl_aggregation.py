"""Layer-wise aggregation against a hand computation."""

import jax.numpy as jnp
import numpy as np

from ringjax.fl import Aggregator, LocalJob, layerwise_average, server_momentum


def server():
    return {
        "embed": {"e": jnp.full((2,), 7.0)},
        "blocks": {"w": jnp.full((3, 2), 100.0), "b": jnp.full((3,), -1.0)},
        "final": {},
        "head": {"k": jnp.zeros((2,))},
        "peft": {},
    }


def client(depth, value, embed=None):
    out = {"blocks": {"w": jnp.full((depth, 2), value) + jnp.arange(depth)[:, None], "b": jnp.full((depth,), value)},
           "final": {}, "head": {"k": jnp.full((2,), value)}}
    if embed is not None:
        out["embed"] = {"e": jnp.full((2,), embed)}
    return out


def test_layerwise_weighted_average_by_hand():
    a, b, c = client(1, 1.0), client(2, 10.0), client(0, 5.0)
    new = layerwise_average(server(), 3, [(LocalJob("top-t", 1), a, 1.0), (LocalJob("top-t", 2), b, 3.0), (LocalJob("top-t", 0), c, 2.0)])
    w = np.asarray(new["blocks"]["w"])
    # layer 0: nobody trained it -> server value
    assert np.allclose(w[0], 100.0) and np.asarray(new["blocks"]["b"])[0] == -1.0
    # layer 1: only b (its lower block, b's row 0 = 10)
    assert np.allclose(w[1], 10.0)
    # layer 2 (top): a's only block (1) and b's row 1 (11), weights 1 and 3
    assert np.allclose(w[2], (1 * 1.0 + 3 * 11.0) / 4)
    assert np.isclose(np.asarray(new["blocks"]["b"])[2], (1 * 1.0 + 3 * 10.0) / 4)
    # head: everyone, by sample count
    assert np.allclose(new["head"]["k"], (1 * 1.0 + 3 * 10.0 + 2 * 5.0) / 6)
    # embeddings: nobody trained them
    assert np.allclose(new["embed"]["e"], 7.0)


def test_full_jobs_average_embeddings_and_group_sums_match_clients():
    full = client(3, 2.0, embed=1.0)
    top = client(1, 4.0)
    new = layerwise_average(server(), 3, [(LocalJob("full", 3), full, 2.0), (LocalJob("top-t", 1), top, 2.0)])
    assert np.allclose(new["embed"]["e"], 1.0)  # only the full client trained them
    assert np.allclose(np.asarray(new["blocks"]["w"])[2], (2.0 + 2 + 4.0) / 2)
    assert np.allclose(np.asarray(new["blocks"]["w"])[0], 2.0)

    # a group's weighted sum (what GroupRunner returns) equals adding its clients one by one
    x, y = client(2, 3.0), client(2, 6.0)
    one = Aggregator(server(), 3)
    one.add_client(LocalJob("top-t", 2), x, 1.0)
    one.add_client(LocalJob("top-t", 2), y, 2.0)
    group = Aggregator(server(), 3)
    sums = {k: (None if k == "final" else {n: 1.0 * x[k][n] + 2.0 * y[k][n] for n in x[k]}) for k in x}
    sums["final"] = {}
    group.add(LocalJob("top-t", 2), sums, 3.0)
    for u, v in zip(jnp.asarray(one.result()["blocks"]["w"]), jnp.asarray(group.result()["blocks"]["w"])):
        assert np.allclose(u, v)


def test_server_momentum_accumulates_round_changes_by_hand():
    old = {"w": jnp.array([1.0, 2.0]), "frozen": jnp.array([5.0])}
    first, v = server_momentum(old, {"w": jnp.array([2.0, 2.0]), "frozen": jnp.array([5.0])}, None, 0.9)
    np.testing.assert_allclose(first["w"], [2.0, 2.0])  # round 1: plain averaging
    second, v = server_momentum(first, {"w": jnp.array([2.5, 1.0]), "frozen": jnp.array([5.0])}, v, 0.9)
    # v = 0.9 * [1, 0] + [0.5, -1] = [1.4, -1]; server = [2, 2] + v
    np.testing.assert_allclose(v["w"], [1.4, -1.0])
    np.testing.assert_allclose(second["w"], [3.4, 1.0])
    np.testing.assert_array_equal(second["frozen"], [5.0])  # nobody moved it: no change, no momentum


def test_server_lr_moves_the_server_part_of_the_way_by_hand():
    old = {"w": jnp.array([1.0, 2.0])}
    first, v = server_momentum(old, {"w": jnp.array([3.0, 0.0])}, None, 0.0, lr=0.5)
    np.testing.assert_allclose(first["w"], [2.0, 1.0])  # half of the averaged change [2, -2]
    second, _ = server_momentum(first, {"w": jnp.array([2.0, 3.0])}, v, 0.5, lr=0.5)
    # v = 0.5 * [2, -2] + [0, 2] = [1, 1]; server = [2, 1] + 0.5 v
    np.testing.assert_allclose(second["w"], [2.5, 1.5])
