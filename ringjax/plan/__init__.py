"""Planning: device profiles, schedule simulation, pipeline placement and DEFT allocation."""

from ringjax.plan.allocation import (
    Allocation,
    AllocationProblem,
    allocate,
    deft_problem,
    equal_bandwidth,
    equal_split_latency,
    greedy,
    optimal_bandwidth,
    random_assignment,
    round_schedule,
)
from ringjax.plan.costs import BlockCost, block_costs, hidden_state_bytes, top_layers
from ringjax.plan.placement import (
    Placement,
    at_depth,
    equal_split,
    evaluate_split,
    optimal_placement,
    split_from_sizes,
    stage_ranges,
)
from ringjax.plan.profiles import (
    DeviceProfile,
    calibrate,
    format_size,
    load_fleet,
    parse_fleet,
    parse_number,
    parse_rate,
    parse_seconds,
    parse_size,
    preset,
    preset_names,
    profile_entry,
    write_profile,
)
from ringjax.plan.simulator import (
    Action,
    Costs,
    Schedule,
    SimResult,
    Span,
    Transfer,
    gantt_png,
    gpipe_schedule,
    one_f_one_b_schedule,
    scale_costs,
    simulate,
)

__all__ = [
    "Action", "Allocation", "AllocationProblem", "BlockCost", "Costs", "DeviceProfile", "Placement", "Schedule",
    "SimResult", "Span", "Transfer", "allocate", "at_depth", "block_costs", "calibrate", "deft_problem",
    "equal_bandwidth", "equal_split", "equal_split_latency", "evaluate_split", "format_size",
    "gantt_png", "hidden_state_bytes", "gpipe_schedule", "greedy", "load_fleet", "one_f_one_b_schedule",
    "optimal_bandwidth", "optimal_placement", "parse_fleet", "parse_number", "parse_rate",
    "parse_seconds", "parse_size", "preset", "preset_names", "profile_entry", "random_assignment",
    "round_schedule", "scale_costs", "simulate", "split_from_sizes", "stage_ranges", "top_layers",
    "write_profile",
]
