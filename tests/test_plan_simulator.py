import dataclasses

import pytest

from ringjax.errors import RingjaxError
from ringjax.plan.profiles import DeviceProfile
from ringjax.plan.simulator import (
    Action,
    Schedule,
    Transfer,
    gantt_png,
    gpipe_schedule,
    one_f_one_b_schedule,
    scale_costs,
    simulate,
)


def fleet(n, bandwidth=1e9, latency=0.0, flops=1e12):
    return [DeviceProfile(f"d{i}", {"fp32": flops}, 2**30, bandwidth, latency, 5.0) for i in range(n)]


def stage_costs(n, fwd=1.0, bwd=1.0):
    return {**{("fwd", s): fwd for s in range(n)}, **{("bwd", s): bwd for s in range(n)}}


@pytest.mark.parametrize("generator", [gpipe_schedule, one_f_one_b_schedule])
@pytest.mark.parametrize("N, M", [(1, 1), (2, 3), (4, 4), (4, 8), (3, 1), (5, 12)])
@pytest.mark.parametrize("fwd, bwd", [(1.0, 1.0), (1.0, 2.0)])
def test_bubble_fraction_is_the_textbook_value(generator, N, M, fwd, bwd):
    result = simulate(generator(N, M), fleet(N), stage_costs(N, fwd, bwd))
    assert result.makespan == pytest.approx((M + N - 1) * (fwd + bwd))
    assert result.bubble_fraction == pytest.approx((N - 1) / (M + N - 1))
    assert result.busy == pytest.approx([M * (fwd + bwd)] * N)
    assert [i + b for i, b in zip(result.idle, result.busy)] == pytest.approx([result.makespan] * N)


@pytest.mark.parametrize("N, M, B", [(4, 8, 2), (4, 3, 1), (6, 5, 3), (3, 4, 0)])
def test_early_stopped_backward_skips_lower_stages(N, M, B):
    schedule = gpipe_schedule(N, M, backward_stages=B)
    kinds = {(a.stage, a.kind) for a in schedule.actions}
    assert all(((s, "bwd") in kinds) == (s >= N - B) for s in range(N))
    result = simulate(schedule, fleet(N), stage_costs(N, 1.0, 2.0))
    assert result.makespan == pytest.approx((M + N - 1) * 1.0 + (M + B - 1) * 2.0 if B else M + N - 1)
    assert result.busy == pytest.approx([M * (1.0 + 2.0 * (s >= N - B)) for s in range(N)])


@pytest.mark.parametrize("N, M, B", [(4, 8, 4), (4, 2, 4), (5, 7, 3)])
def test_one_f_one_b_bounds_live_microbatches(N, M, B):
    schedule = one_f_one_b_schedule(N, M, backward_stages=B)
    for s in range(N - B, N):
        order = [a for a in schedule.actions if a.device == s]
        live = peak = 0
        for action in order:
            live += 1 if action.kind == "fwd" else -1
            peak = max(peak, live)
        assert peak == min(N - s, M)
        assert [a.microbatch for a in order if a.kind == "bwd"] == list(range(M))


def test_transfer_uses_slower_link_and_larger_latency():
    profiles = fleet(2)
    profiles[1] = dataclasses.replace(profiles[1], link_bandwidth_bytes_per_s=1e6, link_latency_s=0.01)
    schedule = gpipe_schedule(2, 1, backward_stages=0, activation_bytes=2e6)
    result = simulate(schedule, profiles, stage_costs(2, fwd=0.5))
    assert result.makespan == pytest.approx(0.5 + 2.0 + 0.01 + 0.5)
    assert result.bytes_per_link == {(0, 1): 2e6}
    assert len(result.sends) == 1 and result.sends[0].end - result.sends[0].start == pytest.approx(2.01)


def test_sends_on_one_link_queue_behind_each_other():
    M = 5
    schedule = gpipe_schedule(2, M, backward_stages=0, activation_bytes=1e9)  # 1 s per send
    result = simulate(schedule, fleet(2), stage_costs(2, fwd=0.01))
    assert result.makespan == pytest.approx(0.01 + M * 1.0 + 0.01)
    assert result.bytes_per_link == {(0, 1): M * 1e9}


def test_bidirectional_bytes_per_link():
    N, M, act = 3, 4, 1000.0
    result = simulate(one_f_one_b_schedule(N, M, activation_bytes=act), fleet(N), stage_costs(N))
    expected = {(s, s + 1): M * act for s in range(N - 1)} | {(s + 1, s): M * act for s in range(N - 1)}
    assert result.bytes_per_link == expected


def test_hand_written_schedule_and_event_timing():
    """Device 1 starts as soon as its input arrives, not at the next global tick."""
    a, b, c = Action(0, "fwd", 0, 0), Action(1, "fwd", 0, 1), Action(1, "head", 0, 1)
    schedule = Schedule(ticks=[[a], [b], [c]], transfers=[Transfer(a, b, 0.0)])
    result = simulate(schedule, fleet(2, latency=0.1), {("fwd", 0): 1.0, ("fwd", 1): 2.0, ("head", 1): 0.5})
    starts = {span.item: span.start for span in result.spans}
    assert starts == pytest.approx({a: 0.0, b: 1.1, c: 3.1})
    assert result.makespan == pytest.approx(3.6)


def test_errors():
    with pytest.raises(RingjaxError, match=r"no cost for bwd of stage 1: add the key \('bwd', 1\)"):
        simulate(gpipe_schedule(2, 2), fleet(2), {("fwd", 0): 1.0, ("fwd", 1): 1.0, ("bwd", 0): 1.0})
    a, b = Action(0, "fwd", 0, 0), Action(1, "fwd", 0, 1)
    with pytest.raises(ValueError, match="earlier tick"):
        simulate(Schedule(ticks=[[a, b]], transfers=[Transfer(a, b, 1.0)]), fleet(2), stage_costs(2))
    with pytest.raises(ValueError, match="two actions"):
        simulate(Schedule(ticks=[[a, Action(0, "bwd", 0, 0)]]), fleet(2), stage_costs(2))
    with pytest.raises(ValueError, match="profiles"):
        simulate(Schedule(ticks=[[b]]), fleet(1), stage_costs(2))
    with pytest.raises(RingjaxError, match="backward_stages"):
        gpipe_schedule(2, 2, backward_stages=3)


def test_scale_costs_by_peak_flops():
    schedule = gpipe_schedule(2, 2)
    measured = fleet(1, flops=1e11)[0]
    profiles = [dataclasses.replace(p, peak_flops={"fp32": f}) for p, f in zip(fleet(2), (1e11, 4e11))]
    scaled = scale_costs(stage_costs(2, 1.0, 2.0), schedule, measured, profiles)
    assert scaled == {("fwd", 0): 1.0, ("bwd", 0): 2.0, ("fwd", 1): 0.25, ("bwd", 1): 0.5}


def test_gantt_png(tmp_path):
    result = simulate(one_f_one_b_schedule(4, 6, backward_stages=2, activation_bytes=1e8), fleet(4),
                      stage_costs(4, 0.1, 0.2))
    path = tmp_path / "timeline.png"
    gantt_png(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
