"""Multi-device schemes over a `stage` mesh: meshes, placement, the ring pipeline, unfreezing."""

from ringjax.parallel.launch import launch, main_launch
from ringjax.parallel.mesh import make_stage_mesh, maybe_initialize_distributed
from ringjax.parallel.placement import Placement, block_costs, plan_stages
from ringjax.parallel.ring import RingPipeline
from ringjax.parallel.schedules import Action, PipelineSchedule, build_schedule
from ringjax.parallel.unfreeze import UnfreezeSchedule

__all__ = [
    "Action", "PipelineSchedule", "Placement", "RingPipeline", "UnfreezeSchedule", "block_costs", "build_schedule",
    "launch", "main_launch", "make_stage_mesh", "maybe_initialize_distributed", "plan_stages",
]
