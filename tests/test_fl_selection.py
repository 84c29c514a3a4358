"""Constraint-aware layer selection, exclusion, baselines' eligibility, model choice."""

import dataclasses

import numpy as np
import pytest

import ringjax
from ringjax.errors import RingjaxError
from ringjax.fl import Budget, ClientBudgets, CostModel, LocalJob, Workload, choose_model, depth_score, plan_clients, select_depth, verify_memory

CFG = ringjax.ModelConfig(arch="bert", vocab_size=100, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                          max_position=64, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
HEAD = ringjax.HeadConfig("classification", 2)
COSTS = CostModel(CFG, HEAD, Workload(batch_size=4, seq_len=16, local_steps=2))


def budget_of(job):
    c = COSTS.cost(job)
    return Budget(c.memory_bytes, c.flops_per_round, c.upload_bytes)


def top(t):
    return LocalJob("top-t", t)


def test_costs_grow_with_depth():
    rows = [COSTS.cost(top(t)) for t in range(CFG.num_layers + 1)]
    for a, b in zip(rows, rows[1:]):
        assert a.memory_bytes < b.memory_bytes and a.flops_per_round < b.flops_per_round and a.upload_bytes < b.upload_bytes
    # upload is exactly the trained parameters: t blocks + head, fp32
    assert rows[2].upload_bytes - rows[1].upload_bytes == 4 * COSTS.block_params


@pytest.mark.parametrize("t", range(5))
def test_largest_feasible_depth(t):
    assert select_depth(COSTS, budget_of(top(t))) == t  # exactly affordable: t, not t + 1
    # each dimension alone can bind: everything generous except one resource
    big = budget_of(top(4))
    for field in ("memory_bytes", "flops_per_round", "upload_bytes"):
        tight = dataclasses.replace(big, **{field: getattr(budget_of(top(t)), field) * 1.0001})
        assert select_depth(COSTS, tight) == t


def test_head_only_and_excluded():
    head_only = budget_of(top(0))
    assert select_depth(COSTS, head_only) == 0
    assert select_depth(COSTS, dataclasses.replace(head_only, upload_bytes=head_only.upload_bytes - 1)) is None
    budgets = ClientBudgets.from_list([budget_of(top(0)), budget_of(top(2)), budget_of(top(4)), Budget(1, 1, 1), Budget(1e12, 1e15, 1e12)])
    caff = plan_clients("caff", COSTS, budgets)
    assert caff.depths().tolist() == [0, 2, 4, -1, 4]
    assert caff.excluded == 1 and caff.eligible.tolist() == [0, 1, 2, 4]
    assert "1 excluded" in caff.summary()
    uniform = plan_clients("uniform-t", COSTS, budgets)
    assert uniform.depths().tolist() == [0, 0, 0, -1, 0]
    # full fine-tuning also trains the embeddings: only the generous client affords it
    full = plan_clients("fedavg-full", COSTS, budgets)
    assert full.depths().tolist() == [-1, -1, -1, -1, 4] and full.jobs[4] == LocalJob("full", 4)
    lora = plan_clients("fedlora", COSTS, budgets)
    lora_cost = COSTS.cost(LocalJob("lora", 4))
    expected = [4 if lora_cost.fits(budgets[i]) else -1 for i in range(5)]
    assert lora.depths().tolist() == expected and expected[4] == 4
    with pytest.raises(RingjaxError, match="unknown federated method"):
        plan_clients("fedprox", COSTS, budgets)


def test_lora_memory_holds_every_block_activations():
    # LoRA trains few parameters but backpropagates through all blocks: it needs more memory than top-1
    assert COSTS.cost(LocalJob("lora", 4)).memory_bytes > COSTS.cost(top(1)).memory_bytes
    assert COSTS.cost(LocalJob("lora", 4)).upload_bytes < COSTS.cost(top(1)).upload_bytes


def test_verify_memory_moves_clients_down():
    budgets = ClientBudgets.from_list([Budget(100, 1e30, 1e30), Budget(35, 1e30, 1e30), Budget(5, 1e30, 1e30)])
    plan = plan_clients("caff", COSTS, ClientBudgets.from_list([budget_of(top(3))] * 3))
    measured = {top(t): 10 * (t + 1) for t in range(5)}  # pretend XLA reports these
    fixed, seen = verify_memory(plan, budgets, lambda job: measured[job])
    assert fixed.depths().tolist() == [3, 2, -1]
    assert all(seen[job] <= budgets[i].memory_bytes for i, job in enumerate(fixed.jobs) if job is not None)
    assert "moved down or out" in fixed.summary()


def test_choose_model_by_mean_depth():
    small_cfg = CFG.replace(num_layers=2)
    small = CostModel(small_cfg, HEAD, COSTS.workload)
    # every client affords exactly two blocks' upload (blocks are the same size in both models)
    two = budget_of(top(2))
    budgets = ClientBudgets.from_list([dataclasses.replace(budget_of(top(4)), upload_bytes=two.upload_bytes)] * 3 + [Budget(1, 1, 1)])
    name, scores = choose_model({"big": COSTS, "small": small}, budgets, "fraction")
    assert scores == pytest.approx({"big": 3 * 2 / 4 / 4, "small": 3 * 2 / 2 / 4})  # excluded client counts 0
    assert name == "small"
    # counted in blocks the two tie, and a tie goes to the deeper model
    name, scores = choose_model({"big": COSTS, "small": small}, budgets, "blocks")
    assert scores["big"] == scores["small"] == pytest.approx(1.5) and name == "big"
    assert depth_score(plan_clients("caff", COSTS, budgets)) == pytest.approx(0.375)
    with pytest.raises(RingjaxError, match="normalisation"):
        choose_model({"big": COSTS}, budgets, "percent")
    assert np.isclose(scores["big"], 1.5)
