"""Vectorised clients equal sequential ones, compile once per shape; the federated loop and its methods."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from test_fl_common import CFG, FAST, HEAD, B, E, T, fleet, synthetic, tiny_params

from ringjax.data.partition import partition
from ringjax.errors import RingjaxError
from ringjax.fl import (Budget, ClientBudgets, CostModel, FLConfig, FLModel, GroupRunner, LocalJob, chunk_sizes, local_optimizer,
                        make_local_round, plan_clients, run_federated, server_momentum, split_params, tree_bytes)
from ringjax.fl.clients import client_example_rows, client_logits, client_loss, gather, label_log_prior
from ringjax.fl.rounds import make_evaluator, run_round, sample_clients
from ringjax.methods.caff import slice_top_blocks, train_caff
from ringjax.models.backbone import forward
from ringjax.models.heads import HeadConfig, example_losses
from ringjax.peft import PeftConfig

MODEL = FLModel(CFG, HEAD)
FAST_CFG = (("xla_backend_optimization_level", 0),)


@pytest.fixture(scope="module")
def params():
    return tiny_params()


def test_chunk_sizes():
    assert chunk_sizes(10, 4) == [4, 4, 2]
    assert chunk_sizes(3, 4) == [4]
    assert chunk_sizes(5, 8) == [8]
    assert chunk_sizes(0, 4) == []
    assert chunk_sizes(1, 4, multiple=2) == [2]
    with pytest.raises(RingjaxError, match="multiple of the mesh size"):
        chunk_sizes(3, 3, multiple=2)


def test_vmapped_group_equals_sequential_clients(params):
    job = LocalJob("top-t", 2)
    opt = local_optimizer(1e-3)
    trainable, frozen = split_params(params, job, CFG.num_layers)
    data = synthetic(64)
    rows = np.random.default_rng(1).integers(0, 64, (4, E, B))
    batches = gather(data, rows, T)
    weights = np.array([3.0, 1.0, 2.0, 0.0])  # the last client is padding
    runner = GroupRunner(MODEL, {"top-t": opt}, compiler_options=FAST)
    stacked, losses = runner.run(job, trainable, frozen, batches, weights, reduce=False)
    single_batches = {k: v[0] for k, v in batches.items()}
    single = jax.jit(make_local_round(MODEL, job, opt)).lower(trainable, frozen, single_batches).compile(FAST)
    expected = []
    for g in range(4):
        trained, loss = single(trainable, frozen, {k: v[g] for k, v in batches.items()})
        expected.append(trained)
        assert np.isclose(float(losses[g]), float(loss), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(jax.tree.map(lambda x: x[g], stacked))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected[0]["blocks"]["query"]["kernel"], trainable["blocks"]["query"]["kernel"])  # it trained

    # same shapes, new data: no recompilation
    runner.run(job, trainable, frozen, gather(data, rows[::-1].copy(), T), weights, reduce=False)
    assert runner.compiles <= 1 and len(runner.shapes_used) == 1

    # weighted sums, the client axis sharded over a 2-device mesh: sum_i w_i theta_i, padding ignored
    mesh = Mesh(np.array(jax.devices()[:2]), ("clients",))
    sharded = GroupRunner(MODEL, {"top-t": opt}, mesh=mesh, compiler_options=FAST)
    sums, total, s_losses = sharded.run(job, trainable, frozen, batches, weights)
    assert float(total) == 6.0
    hand = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights[:3], xs)), *expected[:3])
    for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(sums)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s_losses), np.asarray(losses), rtol=1e-5)


def test_client_logits_match_backbone_forward(params):
    batch = gather(synthetic(8), np.arange(8), T)
    ref = forward(CFG, PeftConfig(kind="top-t"), HEAD, params, batch).logits
    for job in (LocalJob("top-t", 0), LocalJob("top-t", 3), LocalJob("full", 4)):
        trainable, frozen = split_params(params, job, 4)
        np.testing.assert_allclose(np.asarray(client_logits(MODEL, job, trainable, frozen, batch)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_round_vmapped_equals_one_client_per_call(params):
    """A whole round (sampling, batching, groups, aggregation) is the same grouped or client by client."""
    data = synthetic(240, seed=2)
    budgets = fleet(("weak", "medium")).assign(12, seed=0)
    base = dict(num_clients=12, per_round=6, rounds=1, local_steps=E, batch_size=B, max_length=T, buckets=(T,), alpha=0.5,
                lr=1e-3, verify_memory=False, compiler_options=FAST_CFG)
    grouped = run_federated("caff", CFG, HEAD, params, data, budgets, FLConfig(**base, client_chunk=4), log=None)
    single = run_federated("caff", CFG, HEAD, params, data, budgets, FLConfig(**base, client_chunk=1), log=None)
    for a, b in zip(jax.tree.leaves(grouped.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert grouped.rounds[0].participants == 6
    assert grouped.executables <= 2 and single.executables == 2  # one per (depth, group size), never per client
    changed = [not np.allclose(a, b) for a, b in zip(np.asarray(grouped.params["blocks"]["query"]["kernel"]), params["blocks"]["query"]["kernel"])]
    assert changed == [False, False, True, True]  # only the top two blocks were trained by anyone


def test_methods_on_the_same_machinery(params):
    train, dev = synthetic(240, seed=3), synthetic(40, seed=4)
    budgets = fleet().assign(10)
    cfg = FLConfig(num_clients=10, per_round=4, rounds=1, local_steps=E, batch_size=B, max_length=T, buckets=(T,), lr=1e-3,
                   lora_lr=1e-2, client_chunk=4, verify_memory=False, compiler_options=FAST_CFG)
    runs = {m: run_federated(m, CFG, HEAD, params, train, budgets, cfg, dev, log=None) for m in ("caff", "uniform-t", "fedavg-full", "fedlora")}
    strong = {i for i in range(10) if budgets.tier_name(i) == "strong"}
    assert set(runs["fedavg-full"].plan.eligible.tolist()) == strong
    assert runs["fedavg-full"].rounds[0].participants == len(strong) < 4  # fewer eligible than per_round: all of them
    lora_eligible = set(runs["fedlora"].plan.eligible.tolist())
    assert strong <= lora_eligible and not any(budgets.tier_name(i) == "weak" for i in lora_eligible)
    assert runs["uniform-t"].rounds[0].mean_depth == 1.0
    assert set(runs["caff"].plan.depths().tolist()) == {1, 2, 4} and runs["caff"].rounds[0].mean_depth >= 1.0
    for m, run in runs.items():
        r = run.rounds[0]
        assert r.dev_metric is not None and 0 <= r.dev_metric <= 1 and r.total_bytes_uploaded == r.bytes_uploaded > 0
        if m != "caff":  # one job for everyone: bytes = participants x that job's trained parameters
            (job,) = {j for j in run.plan.jobs if j is not None}
            assert r.bytes_uploaded == r.participants * tree_bytes(split_params(run.params, job, 4)[0])
    per_client = {m: run.rounds[0].bytes_uploaded / run.rounds[0].participants for m, run in runs.items()}
    assert per_client["fedlora"] < per_client["uniform-t"] < per_client["caff"] < per_client["fedavg-full"]
    # LoRA's B factors start at zero: the update moved them, and the backbone stayed put
    assert np.abs(np.asarray(runs["fedlora"].params["peft"]["blocks"]["lora"]["query"]["b"])).sum() > 0
    np.testing.assert_array_equal(runs["fedlora"].params["blocks"]["query"]["kernel"], params["blocks"]["query"]["kernel"])
    json = runs["caff"].to_json()
    assert json["excluded_clients"] == 0 and len(json["rounds"]) == 1


def test_train_caff_picks_candidate(params):
    small_cfg, small = slice_top_blocks(CFG, params, 2)
    assert small_cfg.num_layers == 2
    np.testing.assert_array_equal(small["blocks"]["query"]["kernel"], params["blocks"]["query"]["kernel"][2:])
    cfg = FLConfig(num_clients=10, per_round=3, rounds=0, local_steps=E, batch_size=B, max_length=T, buckets=(T,), verify_memory=False)
    name, scores, run = train_caff({"tiny": (CFG, params), "tiny-top2": (small_cfg, small)}, HEAD, synthetic(120), fleet().assign(10), cfg, log=None)
    # weak 1 of 4 vs 1 of 2 blocks, medium 2 of 4 vs 2 of 2, strong 4 of 4 vs 2 of 2
    assert scores == pytest.approx({"tiny": (4 * 1 + 4 * 2 + 2 * 4) / 4 / 10, "tiny-top2": (4 * 1 + 4 * 2 + 2 * 2) / 2 / 10})
    assert name == "tiny-top2" and run.params["blocks"]["query"]["kernel"].shape[0] == 2
    with pytest.raises(RingjaxError, match="cannot keep 5 of 4 blocks"):
        slice_top_blocks(CFG, params, 5)


def test_server_momentum_run_equals_rounds_composed_by_hand(params):
    """Two rounds with FedAvgM equal two one-round runs whose averages are combined by `server_momentum`."""
    train, budgets = synthetic(120, seed=5), fleet().assign(10)
    base = dict(num_clients=10, per_round=3, local_steps=E, batch_size=B, max_length=T, buckets=(T,), lr=1e-2,
                client_chunk=4, verify_memory=False, compiler_options=FAST_CFG)
    run = run_federated("uniform-t", CFG, HEAD, params, train, budgets, FLConfig(rounds=2, server_momentum=0.5, **base), log=None)
    plain = FLConfig(rounds=2, **base)
    chosen = [np.asarray(r.clients) for r in run.rounds]
    server, velocity = params, None
    model = FLModel(CFG, HEAD)
    plan = plan_clients("uniform-t", CostModel(CFG, HEAD, plain.workload, model.lora), budgets)
    runner = GroupRunner(model, {"top-t": local_optimizer(plain.lr, plain.weight_decay, plain.clip_norm)}, None,
                         compiler_options=dict(FAST_CFG))
    parts = partition(train.labels, 10, plain.alpha, plain.seed)
    for r, clients in enumerate(chosen, start=1):
        averaged, _ = run_round(server, clients, plan, runner, train, parts, plain, r)
        server, velocity = server_momentum(server, averaged, velocity, 0.5)
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(server)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(server["head"]), jax.tree.leaves(averaged["head"]))]
    assert any(moved)  # round 1's change, carried by momentum, moved the server past round 2's plain average


def test_server_ema_serves_the_average_of_the_rounds_models(params):
    """Training follows the latest model; what is evaluated and returned is decay x average + (1 - decay) x latest."""
    train, dev, budgets = synthetic(120, seed=7), synthetic(40, seed=8), fleet().assign(10)
    base = dict(num_clients=10, per_round=3, local_steps=E, batch_size=B, max_length=T, buckets=(T,), lr=1e-2,
                client_chunk=4, verify_memory=False, compiler_options=FAST_CFG)
    first, second = (run_federated("uniform-t", CFG, HEAD, params, train, budgets, FLConfig(rounds=r, **base), dev, log=None).params
                     for r in (1, 2))
    served = run_federated("uniform-t", CFG, HEAD, params, train, budgets, FLConfig(rounds=2, server_ema=0.75, **base), dev, log=None)
    for a, b, c in zip(jax.tree.leaves(served.params), jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_allclose(np.asarray(a), 0.75 * np.asarray(b) + 0.25 * np.asarray(c), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(first["head"]["classifier"]["kernel"]), np.asarray(second["head"]["classifier"]["kernel"]))
    evaluate = make_evaluator(MODEL, PeftConfig(kind="top-t"), "sst2", 128, (T,))
    assert served.rounds[-1].dev_metric == evaluate(served.params, dev)[0]["accuracy"]


def test_logit_adjustment_by_the_client_prior(params):
    """A label-skewed client trains on logits + tau log(prior): the loss is the shifted cross-entropy,
    and its one-label data pull the shared head's bias less than with the plain loss."""
    np.testing.assert_allclose(label_log_prior(np.array([0, 0, 0, 1]), 2), np.log([4 / 6, 2 / 6]), rtol=1e-6)
    np.testing.assert_allclose(label_log_prior(np.array([1, 1]), 3), np.log([1 / 5, 3 / 5, 1 / 5]), rtol=1e-6)

    job = LocalJob("top-t", 1)
    trainable, frozen = split_params(params, job, CFG.num_layers)
    batch = gather(synthetic(8), np.arange(8), T)
    offset = np.tile(np.array([[-2.0, 0.5]], np.float32), (8, 1))
    logits = client_logits(MODEL, job, trainable, frozen, batch)
    hand = example_losses(HEAD, logits + offset, batch["labels"]).mean()
    np.testing.assert_allclose(float(client_loss(MODEL, job, trainable, frozen, {**batch, "logit_offset": offset})), float(hand), rtol=1e-6)

    # a client whose labels are 80% label 1: the plain loss pushes the head's bias towards label 1;
    # with its prior added, the model that predicts the global (balanced) prior gets no push
    skewed = {**batch, "labels": np.array([1, 1, 1, 1, 0, 1, 1, 0], np.int32)}
    flat = {**trainable, "head": {**trainable["head"], "classifier": {**trainable["head"]["classifier"],
                                                                   "kernel": np.zeros_like(trainable["head"]["classifier"]["kernel"])}}}
    prior = np.log(np.array([0.25, 0.75], np.float32))
    grad = lambda b: jax.grad(client_loss, argnums=2)(MODEL, job, flat, frozen, b)["head"]["classifier"]["bias"]  # noqa: E731
    plain = np.asarray(grad(skewed))
    adjusted = np.asarray(grad({**skewed, "logit_offset": np.tile(prior, (8, 1))}))
    np.testing.assert_allclose(plain, [0.25, -0.25], atol=1e-6)  # mean(softmax - onehot) at equal logits
    np.testing.assert_allclose(adjusted, [0.0, 0.0], atol=1e-6)

    # the federated loop hands each client tau x its own prior: a round equals the client's local
    # round composed by hand with those offsets
    data = synthetic(120, seed=6)
    parts = [np.flatnonzero(data.labels == 1)[:30], np.arange(60, 120)]
    cfg = FLConfig(num_clients=2, per_round=1, rounds=1, local_steps=E, batch_size=B, max_length=T, buckets=(T,), lr=1e-2,
                   logit_adjust=0.5, verify_memory=False, compiler_options=FAST_CFG)
    run = run_federated("uniform-t", CFG, HEAD, params, data, fleet(("weak",)).assign(2), cfg, log=None, partitions=parts)
    (client,) = run.rounds[0].clients
    top1 = LocalJob("top-t", 1)
    trainable, frozen = split_params(params, top1, CFG.num_layers)
    rows = parts[client][client_example_rows(np.array([30, 60]), client, E, B, np.random.default_rng((0, 1, client)))]
    local = gather(data, rows, T)
    local["logit_offset"] = np.broadcast_to(0.5 * label_log_prior(data.labels[parts[client]], 2), (E, B, 2)).astype(np.float32)
    trained, _ = jax.jit(make_local_round(MODEL, top1, local_optimizer(1e-2))).lower(trainable, frozen, local).compile(FAST)(
        trainable, frozen, local)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(split_params(run.params, top1, CFG.num_layers)[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_all_sampling_draws_from_everyone_and_the_unaffordable_sit_out(params):
    """"all": every method sees the same draw of per_round clients, and those that cannot afford
    its job sit out; "eligible" fills the round from the clients that can."""
    eligible = np.array([1, 4, 7])
    for r in range(1, 20):
        drawn = sample_clients(np.arange(10), 4, 0, r)  # everyone eligible: the draw itself
        np.testing.assert_array_equal(sample_clients(np.arange(10), 4, 0, r, num_clients=10), drawn)
        np.testing.assert_array_equal(sample_clients(eligible, 4, 0, r, num_clients=10), np.intersect1d(drawn, eligible))
        assert len(sample_clients(eligible, 2, 0, r)) == 2
    train, dev = synthetic(240, seed=3), synthetic(40, seed=4)
    budgets = fleet().assign(10)
    strong = [i for i in range(10) if budgets.tier_name(i) == "strong"]
    cfg = FLConfig(num_clients=10, per_round=2, rounds=6, local_steps=E, batch_size=B, max_length=T, buckets=(T,), lr=1e-3,
                   client_chunk=4, verify_memory=False, compiler_options=FAST_CFG, sampling="all", eval_every=6)
    run = run_federated("fedavg-full", CFG, HEAD, params, train, budgets, cfg, dev, log=None)
    counts = [r.participants for r in run.rounds]
    assert counts == [len(sample_clients(np.array(strong), 2, 0, r, num_clients=10)) for r in range(1, 7)]
    assert 0 in counts and max(counts) > 0  # this seed draws rounds with and without a strong client
    for r in run.rounds:
        assert set(r.clients) <= set(strong) and (r.train_loss is None) == (r.participants == 0) and (r.bytes_uploaded == 0) == (r.participants == 0)
    idle = next(r.round for r in run.rounds if r.participants == 0)
    upto = lambda rounds: run_federated("fedavg-full", CFG, HEAD, params, train, budgets, dataclasses.replace(cfg, rounds=rounds), log=None).params  # noqa: E731
    # a round nobody took part in leaves the server model as it was
    jax.tree.map(np.testing.assert_array_equal, upto(idle), upto(idle - 1) if idle > 1 else params)
    with pytest.raises(RingjaxError, match="unknown sampling 'some'"):
        FLConfig(sampling="some")


def test_errors(params):
    with pytest.raises(RingjaxError, match="cannot sample 5 clients per round from 3"):
        FLConfig(num_clients=3, per_round=5)
    with pytest.raises(RingjaxError, match="server momentum must be in"):
        FLConfig(server_momentum=1.0)
    with pytest.raises(RingjaxError, match="server lr must be in"):
        FLConfig(server_lr=0.0)
    with pytest.raises(RingjaxError, match="server EMA decay must be in"):
        FLConfig(server_ema=1.0)
    with pytest.raises(RingjaxError, match="logit adjustment must be >= 0"):
        FLConfig(logit_adjust=-1.0)
    with pytest.raises(RingjaxError, match="calibrates a classifier's logits"):
        run_federated("caff", CFG, HeadConfig("regression"), params, synthetic(20), fleet().assign(2),
                      FLConfig(num_clients=2, per_round=1, rounds=1, logit_adjust=1.0, verify_memory=False), log=None)
    budgets = ClientBudgets.from_list([Budget(1, 1, 1)] * 2)
    with pytest.raises(RingjaxError, match="no client's budgets"):
        run_federated("caff", CFG, HEAD, params, synthetic(20), budgets, FLConfig(num_clients=2, per_round=1, rounds=1, verify_memory=False), log=None)
    with pytest.raises(RingjaxError, match="unknown federated method"):
        run_federated("fedsgd", CFG, HEAD, params, synthetic(20), budgets, FLConfig(num_clients=2, per_round=1), log=None)
