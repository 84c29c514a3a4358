"""Ring placement and pipeline schedules (pure Python: no compilation)."""

import pytest

from ringjax.errors import RingjaxError
from ringjax.parallel.placement import Placement, block_costs, plan_stages
from ringjax.parallel.schedules import BWD, FWD, build_schedule


def test_placement_forms():
    assert plan_stages(6, 4).sizes == (2, 2, 1, 1)
    assert plan_stages(6, 4, "1,1,2,2").sizes == (1, 1, 2, 2)
    assert plan_stages(6, 2, (5, 1)).sizes == (5, 1)
    # a frozen block costs a third: with only the top block training, 4 + 2 balances 4/3 against 1/3 + 1
    assert plan_stages(6, 2, "balanced", depth=1).sizes == (4, 2)
    assert plan_stages(6, 3, "balanced", depth=6).sizes == (2, 2, 2)
    assert block_costs(4, 1) == (1 / 3, 1 / 3, 1 / 3, 1.0)
    p = Placement((2, 1, 3))
    assert p.starts == (0, 2, 3) and p.max_size == 3
    assert p.padded_index() == [0, 1, 0, 2, 2, 2, 3, 4, 5]
    assert p.unpadded_index() == [0, 1, 3, 6, 7, 8]


@pytest.mark.parametrize("call", [
    lambda: plan_stages(3, 4),  # more stages than blocks
    lambda: plan_stages(6, 2, (4, 1)),  # sizes do not sum to L
    lambda: plan_stages(6, 3, (4, 2)),  # one size per device
    lambda: plan_stages(6, 2, "lopsided"),
    lambda: plan_stages(6, 2, memory_limit=100, block_bytes=30, fixed_bytes=20),  # 20 + 3 * 30 > 100
    lambda: plan_stages(6, 2, "balanced", memory_limit=100, block_bytes=60),
])
def test_placement_errors_are_one_line(call):
    with pytest.raises(RingjaxError) as e:
        call()
    assert "\n" not in str(e.value)


def test_placement_within_a_memory_limit():
    assert plan_stages(6, 2, memory_limit=100, block_bytes=30, fixed_bytes=10).sizes == (3, 3)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("N,M,train", [(4, 8, (False, False, True, True)), (2, 1, (True, True)), (4, 3, (False,) * 4),
                                       (3, 5, (False, True, True))])
def test_schedules_respect_data_flow(name, N, M, train):
    s = build_schedule(name, N, M, train)
    tick = s.tick_of()
    fwd = {(a.microbatch, a.stage): tick[a] for a in s.actions if a.kind == "fwd"}
    bwd = {(a.microbatch, a.stage): tick[a] for a in s.actions if a.kind == "bwd"}
    head = {a.microbatch: (tick[a], a.device) for a in s.actions if a.kind == "head"}
    assert set(fwd) == {(m, d) for m in range(M) for d in range(N)}
    assert set(bwd) == {(m, d) for m in range(M) for d in range(N) if train[d]}  # frozen stages: no backward
    for m in range(M):
        assert head[m] == (fwd[m, N - 1] + 1, m % N)  # the owner applies the head, next tick
        for d in range(1, N):
            assert fwd[m, d] > fwd[m, d - 1]
        for d in range(N):
            if train[d]:
                assert bwd[m, d] > (head[m][0] if d == N - 1 else bwd[m, d + 1])
    for t in s.ticks:  # one main action per device per tick
        main = [a.device for a in t if a.kind != "head"]
        assert len(main) == len(set(main))
    # the residual slots bound every device's in-flight microbatches, and slot m % S is free again
    for d in range(N):
        if train[d]:
            for m in range(M - s.slots):
                assert bwd[m, d] < fwd[m + s.slots, d]


def test_1f1b_keeps_fewer_microbatches_in_flight_than_gpipe():
    train = (True,) * 4
    assert build_schedule("gpipe", 4, 8, train).slots == 8
    assert build_schedule("1f1b", 4, 8, train).slots == 5
    assert build_schedule("1f1b", 4, 8, (False, False, False, True)).slots == 2


def test_engine_tables_route_every_transfer():
    s = build_schedule("gpipe", 3, 4, (False, True, True))
    t = s.engine_tables()
    assert t["kind"].shape == (s.num_ticks, 3)
    for tick, actions in enumerate(s.ticks):
        for a in actions:
            if a.kind == "fwd":
                assert t["kind"][tick, a.device] == FWD
                if a.stage < 2:
                    assert t["recv_act"][tick, a.device + 1] == a.microbatch
                else:  # last stage -> owner
                    assert (t["send_head"][tick] + 2) % 3 == a.microbatch % 3
            elif a.kind == "bwd":
                assert t["kind"][tick, a.device] == BWD
                if a.stage == 2:  # stage 1 trains: it receives stage 2's input gradient
                    assert t["recv_grad"][tick, 1] == a.microbatch
                if a.stage == 1:  # stage 0 is frozen: nothing to receive
                    assert t["recv_grad"][tick, 0] == 4
            else:
                assert t["head_owner"][tick] == a.device and t["recv_grad"][tick, 2] == a.microbatch


def test_bubble_fraction_and_simulator_schedule():
    s = build_schedule("gpipe", 4, 8, (True,) * 4)
    assert 0.2 < s.bubble_fraction() < 0.4
    sim = s.to_simulator(activation_bytes=1024)
    from ringjax.plan.simulator import gpipe_schedule

    assert {(a.device, a.kind, a.microbatch) for a in sim.actions if a.kind != "head"} == \
        {(a.device, a.kind, a.microbatch) for a in gpipe_schedule(4, 8).actions}
    assert len(sim.transfers) == 8 * (3 + 1 + 1 + 3)
