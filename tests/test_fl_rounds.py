"""Vectorised clients equal sequential ones; compiled once per shape; measured memory within budgets; the loop."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import ringjax
from ringjax.data.tokenize import Encoded
from ringjax.fl import (
    Budget,
    ClientBudgets,
    CostModel,
    FLConfig,
    FLModel,
    GroupRunner,
    LocalJob,
    Workload,
    chunk_sizes,
    local_optimizer,
    make_local_round,
    measured_peak_bytes,
    plan_clients,
    run_federated,
    split_params,
    tree_bytes,
    verify_memory,
)
from ringjax.fl.clients import gather
from ringjax.methods.caff import slice_top_blocks, train_caff

CFG = ringjax.ModelConfig(arch="bert", vocab_size=100, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                          max_position=64, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
HEAD = ringjax.HeadConfig("classification", 2)
MODEL = FLModel(CFG, HEAD)
B, T, E = 4, 16, 2


@pytest.fixture(scope="module")
def params():
    key = jax.random.key(0)
    return ringjax.models.assemble(CFG, ringjax.models.random_backbone(CFG, key), HEAD, ringjax.preset("top-t"), key)


def synthetic(n, seed=0, max_len=T):
    """Token 2 or 5 at position 1 gives the label; random filler elsewhere."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int32)
    lengths = rng.integers(4, max_len + 1, n)
    rows = []
    for length, y in zip(lengths, labels):
        toks = rng.integers(10, CFG.vocab_size, length)
        toks[0], toks[1] = 1, 2 + 3 * y
        rows.append(toks)
    flat = np.concatenate(rows).astype(np.int32)
    return Encoded(flat, np.zeros_like(flat), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), labels, max_len, 0)


def tiered_budgets(num_clients, seed=0):
    """weak: top block only; medium: two blocks; strong: everything (full fine-tuning)."""
    costs = CostModel(CFG, HEAD, Workload(B, T, E))
    def fit(job):
        c = costs.cost(job)
        return Budget(c.memory_bytes * 1.01, c.flops_per_round * 1.01, c.upload_bytes * 1.01)
    full = costs.cost(LocalJob("full", 4))
    top4 = costs.cost(LocalJob("top-t", 4))
    strong = Budget(max(full.memory_bytes, top4.memory_bytes) * 1.01, max(full.flops_per_round, top4.flops_per_round) * 1.01, full.upload_bytes * 1.01)
    from ringjax.fl.budgets import Fleet, Tier
    fleet = Fleet((Tier("weak", fit(LocalJob("top-t", 1)), 0.4), Tier("medium", fit(LocalJob("top-t", 2)), 0.4), Tier("strong", strong, 0.2)))
    return fleet.assign(num_clients, seed)


def test_chunk_sizes():
    assert chunk_sizes(10, 4) == [4, 4, 2]
    assert chunk_sizes(3, 4) == [4]
    assert chunk_sizes(5, 8) == [8]
    assert chunk_sizes(0, 4) == []
    assert chunk_sizes(3, 4, multiple=2) == [4]
    assert chunk_sizes(1, 4, multiple=2) == [2]


def test_vmapped_group_equals_sequential_clients(params):
    job = LocalJob("top-t", 2)
    opt = local_optimizer(1e-3)
    trainable, frozen = split_params(params, job, CFG.num_layers)
    data = synthetic(64)
    rows = np.random.default_rng(1).integers(0, 64, (4, E, B))
    batches = gather(data, rows, T)
    weights = np.array([3.0, 1.0, 2.0, 0.0])  # the last client is padding
    runner = GroupRunner(MODEL, {"top-t": opt})
    stacked, losses = runner.run(job, trainable, frozen, batches, weights, reduce=False)
    single = jax.jit(make_local_round(MODEL, job, opt))
    expected = []
    for g in range(4):
        trained, loss = single(trainable, frozen, {k: v[g] for k, v in batches.items()})
        expected.append(trained)
        assert np.isclose(float(losses[g]), float(loss), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(jax.tree.map(lambda x: x[g], stacked))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # it trained: the top blocks moved
    assert not np.allclose(expected[0]["blocks"]["query"]["kernel"], trainable["blocks"]["query"]["kernel"])

    sums, total, _ = runner.run(job, trainable, frozen, batches, weights)
    assert float(total) == 6.0
    hand = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights[:3], xs)), *expected[:3])
    for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(sums)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    # same shapes, new data: no recompilation
    runner.run(job, trainable, frozen, gather(data, rows[::-1].copy(), T), weights)
    assert runner.compiles == 2  # reduce=False and reduce=True

    # sharded over a 2-device mesh axis: the same sums
    mesh = Mesh(np.array(jax.devices()[:2]), ("clients",))
    sharded = GroupRunner(MODEL, {"top-t": opt}, mesh=mesh)
    s_sums, s_total, s_losses = sharded.run(job, trainable, frozen, batches, weights)
    assert float(s_total) == 6.0
    for a, b in zip(jax.tree.leaves(sums), jax.tree.leaves(s_sums)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s_losses), np.asarray(losses), rtol=1e-5)


def test_client_logits_match_backbone_forward(params):
    from ringjax.fl.clients import client_logits
    from ringjax.models.backbone import forward
    data = synthetic(8)
    batch = gather(data, np.arange(8), T)
    ref = forward(CFG, ringjax.PeftConfig(kind="top-t"), HEAD, params, batch).logits
    for job in (LocalJob("top-t", 0), LocalJob("top-t", 3), LocalJob("full", 4)):
        trainable, frozen = split_params(params, job, 4)
        np.testing.assert_allclose(np.asarray(client_logits(MODEL, job, trainable, frozen, batch)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_measured_peak_bytes_within_budgets(params):
    """Each client's compiled local step (one client, not vmapped) fits its memory budget."""
    budgets = tiered_budgets(10)
    opts = {"top-t": local_optimizer(1e-3), "full": local_optimizer(1e-3), "lora": local_optimizer(1e-3)}
    costs = CostModel(CFG, HEAD, Workload(B, T, E))
    from ringjax.fl.rounds import ensure_lora
    p = ensure_lora(params, MODEL, 0)
    measure = lambda job: measured_peak_bytes(MODEL, job, opts[job.kind], p, B, T)
    seen = {}
    for method in ("caff", "fedavg-full", "fedlora"):
        plan = plan_clients(method, costs, budgets)
        checked, measured = verify_memory(plan, budgets, measure)
        assert checked.jobs == plan.jobs  # the cost model was not optimistic: nobody had to move
        seen.update(measured)
        for i, job in enumerate(checked.jobs):
            if job is not None:
                assert measured[job] <= budgets[i].memory_bytes, (method, i, job, measured[job], budgets[i])
    caff = plan_clients("caff", costs, budgets)
    by_tier = {budgets.tier_name(i): caff.jobs[i].depth for i in range(10)}
    assert by_tier == {"weak": 1, "medium": 2, "strong": 4}
    # and the model stays close above the measurement
    for job, peak in seen.items():
        assert peak <= costs.cost(job).memory_bytes <= 1.3 * peak, job


def test_round_vmapped_equals_one_client_per_call(params):
    data = synthetic(240, seed=2)
    budgets = tiered_budgets(12)
    base = dict(num_clients=12, per_round=6, rounds=2, local_steps=E, batch_size=B, max_length=T, buckets=(T,), alpha=0.5,
                lr=1e-2, verify_memory=False)
    grouped = run_federated("caff", CFG, HEAD, params, data, budgets, FLConfig(**base, client_chunk=4), log=None)
    single = run_federated("caff", CFG, HEAD, params, data, budgets, FLConfig(**base, client_chunk=1), log=None)
    for a, b in zip(jax.tree.leaves(grouped.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert grouped.compiles < single.compiles or grouped.compiles <= 6
    assert [r.participants for r in grouped.rounds] == [6, 6]


def test_methods_on_the_same_machinery(params):
    train, dev = synthetic(240, seed=3), synthetic(40, seed=4)
    budgets = tiered_budgets(10)
    cfg = FLConfig(num_clients=10, per_round=4, rounds=2, local_steps=E, batch_size=B, max_length=T, buckets=(T,), lr=1e-2,
                   lora_lr=1e-2, client_chunk=4, verify_memory=False)
    runs = {m: run_federated(m, CFG, HEAD, params, train, budgets, cfg, dev, log=None) for m in ("caff", "uniform-t", "fedavg-full", "fedlora")}
    strong = {i for i in range(10) if budgets.tier_name(i) == "strong"}
    assert set(runs["fedavg-full"].plan.eligible.tolist()) == strong
    assert all(r.participants == len(strong) for r in runs["fedavg-full"].rounds)  # fewer eligible than per_round
    assert runs["uniform-t"].rounds[0].mean_depth == 1.0
    assert runs["caff"].rounds[0].mean_depth >= runs["uniform-t"].rounds[0].mean_depth
    for m, run in runs.items():
        assert len(run.rounds) == 2 and run.rounds[-1].dev_metric is not None
        assert run.rounds[-1].total_bytes_uploaded == sum(r.bytes_uploaded for r in run.rounds)
        if m != "caff":  # one job for everyone: bytes = participants x that job's trained parameters
            (job,) = {j for j in run.plan.jobs if j is not None}
            size = tree_bytes(split_params(run.params, job, 4)[0])
            assert all(r.bytes_uploaded == r.participants * size for r in run.rounds)
    # LoRA uploads far less than full fine-tuning
    assert runs["fedlora"].rounds[0].bytes_uploaded / runs["fedlora"].rounds[0].participants < runs["fedavg-full"].rounds[0].bytes_uploaded / runs["fedavg-full"].rounds[0].participants / 5


def test_train_caff_picks_candidate(params):
    small_cfg, small = slice_top_blocks(CFG, params, 2)
    assert small_cfg.num_layers == 2 and small["blocks"]["query"]["kernel"].shape[0] == 2
    np.testing.assert_array_equal(small["blocks"]["query"]["kernel"], params["blocks"]["query"]["kernel"][2:])
    budgets = tiered_budgets(10)
    cfg = FLConfig(num_clients=10, per_round=3, rounds=1, local_steps=E, batch_size=B, max_length=T, buckets=(T,), verify_memory=False)
    name, scores, run = train_caff({"tiny": (CFG, params), "tiny-top2": (small_cfg, small)}, HEAD, synthetic(120), budgets, cfg, log=None)
    # weak: 1 of 4 vs 1 of 2; medium: 2 of 4 vs 2 of 2; strong: 4 of 4 vs 2 of 2 -> the 2-block model
    assert scores["tiny-top2"] > scores["tiny"] and name == "tiny-top2"
    assert run.params["blocks"]["query"]["kernel"].shape[0] == 2


def test_errors(params):
    from ringjax.errors import RingjaxError
    with pytest.raises(RingjaxError, match="cannot sample 5 clients per round from 3"):
        FLConfig(num_clients=3, per_round=5)
    budgets = ClientBudgets.from_list([Budget(1, 1, 1)] * 2)
    with pytest.raises(RingjaxError, match="no client's budgets"):
        run_federated("caff", CFG, HEAD, params, synthetic(20), budgets, FLConfig(num_clients=2, per_round=1, rounds=1, verify_memory=False), log=None)
