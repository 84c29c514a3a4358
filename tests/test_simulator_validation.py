"""The plumbing of experiments/simulator_vs_ring.py: the ring engine hands its schedule to the
simulator, and per-action times measured on this machine turn into a prediction of the step.

No timing tolerance is asserted here (timings belong in the experiment script); these tests only
check that the schedule the simulator times is the one the engine runs, and that measured
per-stage times give a finite, positive prediction.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "simulator_vs_ring", Path(__file__).resolve().parent.parent / "experiments" / "simulator_vs_ring.py")
experiment = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = experiment  # its dataclass looks its module up
_spec.loader.exec_module(experiment)

N = 4


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    import ringjax

    return ringjax.load_model(str(tiny_bert_dir), head="classification", peft="houlsby")


def _pipe(model, depth, schedule, microbatches=4):
    from ringjax.parallel.mesh import make_stage_mesh
    from ringjax.parallel.placement import plan_stages
    from ringjax.parallel.ring import RingPipeline

    cfg = model.config
    return RingPipeline(cfg, model.peft_config, model.head_config, make_stage_mesh(N),
                        plan_stages(cfg.num_layers, N, "equal", depth=depth), microbatches, depth, schedule=schedule)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_engine_schedule_simulated_with_unit_costs_counts_its_actions(tiny, schedule, depth):
    from ringjax.parallel.schedules import BWD, FWD
    from ringjax.plan import simulate
    from ringjax.plan.simulator import first_on_every_device, then_on_every_device

    pipe = _pipe(tiny, depth, schedule)
    M = pipe.M
    engine = [(a.device, a.kind, a.microbatch, a.stage) for a in pipe.schedule.actions]
    handed = pipe.schedule.to_simulator(activation_bytes=1024)
    assert sorted((a.device, a.kind, a.microbatch, a.stage) for a in handed.actions) == sorted(engine)

    # the tables the engine scans hold exactly the schedule's forward and backward actions
    tables = pipe.tables
    from_tables = {(d, {FWD: "fwd", BWD: "bwd"}[int(k)], int(tables["mb"][t, d]))
                   for t in range(pipe.schedule.num_ticks) for d, k in enumerate(tables["kind"][t]) if k}
    assert from_tables == {(d, kind, m) for d, kind, m, _ in engine if kind != "head"}

    fwd_bwd = sum(1 for a in handed.actions if a.kind in ("fwd", "bwd"))
    trains = sum(p.trains for p in pipe.programs)
    assert fwd_bwd == N * M + trains * M  # every stage forwards every microbatch; only training stages go back

    unit = {(kind, s): 1.0 for kind in ("fwd", "bwd") for s in range(N)} | {("head", d): 0.0 for d in range(N)}
    profiles = experiment.emulated_profiles(N)
    result = simulate(handed, profiles, unit)
    assert result.total_work == fwd_bwd == sum(result.busy)
    assert result.makespan <= fwd_bwd and result.makespan >= 2 * M  # the last stage forwards and backs every microbatch

    # one buffer set-up per device first and one update per device after a barrier: 2N more units
    # of work, every set-up before the device's first action, every update after the last action
    step = then_on_every_device(first_on_every_device(handed, "alloc"), "update")
    extra = {(kind, d): 1.0 for kind in ("alloc", "update") for d in range(N)}
    closed = simulate(step, profiles, unit | extra)
    assert closed.total_work == fwd_bwd + 2 * N
    spans = {kind: [s for s in closed.spans if s.item.kind == kind] for kind in ("alloc", "update")}
    assert [s.start for s in spans["alloc"]] == [0.0] * N
    work_ends = max(s.end for s in closed.spans if s.item.kind not in ("alloc", "update"))
    assert len(spans["update"]) == N and all(s.start >= work_ends for s in spans["update"])
    assert all(s.start >= 1.0 for s in closed.spans if s.item.kind in ("fwd", "bwd"))


def test_per_device_actions_reject_a_clash():
    from ringjax.plan.simulator import Action, Schedule, first_on_every_device, then_on_every_device

    schedule = Schedule(ticks=((Action(0, "update", 0, 0),),))
    for add in (first_on_every_device, then_on_every_device):
        with pytest.raises(ValueError, match="already has"):
            add(schedule, "update")


@pytest.mark.parametrize("fresh_temp", [True, False])  # alloc: page faults of a fresh mapping, or the carry's zero-fill
def test_measured_stage_times_give_a_finite_positive_prediction(tiny, fresh_temp):
    host = experiment.random_batch(4, 8, tiny.config.vocab_size)
    case = experiment.build_case(tiny, 2, 2, 2, host, fresh_temp=fresh_temp)  # 2 stages of 2 blocks: the lower frozen, the upper training
    experiment.measure([case], repeats=1, inner=1)
    every = experiment.EVERY
    assert set(case.programs) == {("fwd", 0), ("fwd", 1), ("bwd", 1), ("head", every), ("update", every), ("alloc", every)}
    assert all(len(copies) == 2 for copies in case.programs.values())  # one copy per device
    assert (("alloc", every), 2) in case.times and (("fwd", 0), 1) in case.times
    assert all(len(t) == 1 and t[0][0] > 0 for t in case.times.values())
    assert case.temp_bytes > 0 and len(case.step_times) == 1

    costs = experiment.costs_per_action(case, clock=1)
    assert set(costs) == {(a.kind, a.stage) for a in experiment.step_schedule(case.pipe).actions}
    row = experiment.report(case, activation_bytes=2 * 8 * tiny.config.hidden_size * 4)
    assert row["depth"] == 2 and row["actions"] == {"fwd": 2 * 2, "bwd": 2, "head": 2}
    assert row["page_faults"]["temp_buffer_pages"] > 0
    for clock in ("wall", "cpu"):
        r = row[clock]
        for key in ("predicted_total_work_s", "predicted_makespan_s", "measured_step_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (clock, key, r)
        assert r["predicted_makespan_s"] <= r["predicted_total_work_s"]
        assert all(math.isfinite(r[key]) for key in r if key.startswith("relative_error"))
