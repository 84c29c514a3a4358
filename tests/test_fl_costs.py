"""The cost model against XLA, and each client's measured peak bytes against its memory budget."""

import numpy as np
import pytest
from test_fl_common import CFG, FAST, HEAD, B, T, costs, fleet, tiny_params

from ringjax.fl import FLModel, LocalJob, compile_local_step, local_optimizer, measured_peak_bytes, plan_clients, verify_memory
from ringjax.fl.rounds import ensure_lora

MODEL = FLModel(CFG, HEAD)
OPT = local_optimizer(1e-3)
JOBS = (LocalJob("top-t", 1), LocalJob("top-t", 2), LocalJob("top-t", 4), LocalJob("full", 4), LocalJob("lora", 4))


@pytest.fixture(scope="module")
def params():
    return ensure_lora(tiny_params(), MODEL, 0)


@pytest.fixture(scope="module")
def peaks(params):
    """Measured peak bytes of each job's compiled local step: one client, not vmapped, default XLA options."""
    return {job: measured_peak_bytes(MODEL, job, OPT, params, B, T) for job in JOBS}


def test_memory_model_bounds_the_measurement(peaks):
    model = costs()
    for job, peak in peaks.items():
        assert peak <= model.cost(job).memory_bytes <= 1.3 * peak, (job, peak, model.cost(job).memory_bytes)


def test_measured_peak_bytes_within_budgets(peaks, params):
    """Every participating client of every method: its compiled step's peak bytes <= its memory budget."""
    budgets = fleet().assign(10)
    for method in ("caff", "uniform-t", "fedavg-full", "fedlora"):
        plan = plan_clients(method, costs(), budgets)
        checked, measured = verify_memory(plan, budgets, lambda job: peaks[job] if job in peaks else measured_peak_bytes(MODEL, job, OPT, params, B, T))
        assert checked.jobs == plan.jobs  # the cost model was not optimistic: nobody had to move
        for i, job in enumerate(checked.jobs):
            if job is not None:
                assert measured[job] <= budgets[i].memory_bytes, (method, i, job, measured[job], budgets[i])


def test_layer_selection_per_tier():
    budgets = fleet().assign(10)
    caff = plan_clients("caff", costs(), budgets)
    assert {budgets.tier_name(i): caff.jobs[i].depth for i in range(10)} == {"weak": 1, "medium": 2, "strong": 4}
    lora = plan_clients("fedlora", costs(), budgets)
    # LoRA holds every block's activations: more than the weak (and, on this tiny model, medium) tier can
    assert all(lora.jobs[i] is None for i in range(10) if budgets.tier_name(i) == "weak")
    assert all(lora.jobs[i] is not None for i in range(10) if budgets.tier_name(i) == "strong")


@pytest.mark.parametrize("job", [LocalJob("top-t", 2), LocalJob("lora", 4)], ids=str)
def test_flops_match_xla_cost_analysis(job, params):
    """FLOPs per step against XLA's count of the unrolled step (a loop body is counted once otherwise)."""
    batch, seq = 8, 32  # at B=4, T=16 the tiny model is all elementwise overhead
    measured = compile_local_step(MODEL, job, OPT, params, batch, seq, unroll=True, compiler_options=FAST).cost_analysis()["flops"]
    modelled = costs(batch, seq, 1).step_flops(job)
    assert modelled == pytest.approx(measured, rel=0.06)


def test_upload_bytes_are_the_trained_parameters(params):
    from ringjax.fl import split_params, tree_bytes
    model = costs()
    for job in JOBS:
        assert model.upload_bytes(job) == tree_bytes(split_params(params, job, CFG.num_layers)[0])
    assert np.isclose(model.cost(LocalJob("top-t", 0)).upload_bytes, 4 * model.head_params)
