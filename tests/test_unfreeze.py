"""Top-down unfreezing schedules: parsing, depth per step, plateau, checkpoint state."""

import pytest

from ringjax.errors import RingjaxError
from ringjax.parallel.unfreeze import UnfreezeSchedule


def depths(spec, steps, history=()):
    s = UnfreezeSchedule.parse(spec, 6)
    return [s.depth(t, history) for t in steps]


def test_fixed_and_stepped_forms():
    assert depths("all", [0, 100]) == [6, 6]
    assert depths("top:2", [0, 1000]) == [2, 2]
    assert depths("0:1,100:3,250:6", [0, 99, 100, 249, 250, 10**6]) == [1, 1, 3, 3, 6, 6]
    assert depths("50:2,60:4", [0, 49, 50, 60]) == [2, 2, 2, 4]  # before the first step: its depth
    assert depths("every:10", [0, 9, 10, 25, 49, 50, 1000]) == [1, 1, 2, 3, 5, 6, 6]


def test_plateau_unfreezes_one_block_after_patience_evaluations_without_improvement():
    s = UnfreezeSchedule.parse("plateau:2", 6)
    assert s.depth(0) == 1
    assert s.depth(5, [1.0, 0.9, 0.8]) == 1  # improving
    assert s.depth(5, [1.0, 0.9, 0.95]) == 1  # one bad evaluation
    assert s.depth(5, [1.0, 0.9, 0.95, 0.91]) == 2  # two in a row
    assert s.depth(5, [1.0, 0.9, 0.95, 0.91, 0.92, 0.93]) == 3
    assert s.depth(5, [1.0] + [2.0] * 40) == 6  # never past the model's depth
    assert UnfreezeSchedule.parse("plateau", 6).patience == 2


def test_depths_lists_every_phase_and_spec_round_trips():
    for text, phases in [("all", (6,)), ("top:3", (3,)), ("0:1,5:2,9:4", (1, 2, 4)), ("every:5", (1, 2, 3, 4, 5, 6))]:
        s = UnfreezeSchedule.parse(text, 6)
        assert s.depths == phases
        assert UnfreezeSchedule.parse(s.spec(), 6) == s


def test_state_dict_resumes_the_phase():
    s = UnfreezeSchedule.parse("plateau:1", 6)
    history = [1.0, 1.1, 1.2]
    state = s.state_dict(history, step=30)
    assert state["depth"] == 3
    again, h = UnfreezeSchedule.from_state_dict(state)
    assert again == s and again.depth(30, h) == 3


@pytest.mark.parametrize("text", ["sometimes", "top:9", "top:x", "every:0", "plateau:0", "5:1,2:3", "0:3,5:2", "0:7", "1:2:3"])
def test_bad_schedules_are_one_line_errors(text):
    with pytest.raises(RingjaxError) as e:
        UnfreezeSchedule.parse(text, 6)
    assert "\n" not in str(e.value) and "--unfreeze" in str(e.value)


def test_next_depth_is_the_phase_after_a_step_within_the_run():
    points = UnfreezeSchedule.parse("0:1,300:3,600:6", 6)
    assert [points.next_depth(s, 1000) for s in (0, 299, 300, 599, 600)] == [3, 3, 6, 6, None]
    assert points.next_depth(0, end=300) is None and points.next_depth(0, end=301) == 3
    every = UnfreezeSchedule.parse("every:100", 6)  # depth 1 + step // 100, up to 6
    assert [every.next_depth(s, 1000) for s in (0, 99, 100, 450, 500)] == [2, 2, 3, 6, None]
    assert every.next_depth(0, end=100) is None
    plateau = UnfreezeSchedule.parse("plateau:1", 6)
    assert plateau.next_depth(0) == 2 and plateau.next_depth(30, history=[1.0, 1.1]) == 3
    assert UnfreezeSchedule.parse("all", 6).next_depth(0) is None and UnfreezeSchedule.parse("top:2", 6).next_depth(0) is None
