"""Timeline pictures of a DEFT round and a RingAda step, from the planner's predictions.

- docs/timeline_deft_round.png: one DEFT round of MiniLM's Houlsby adapters in 6 depth blocks on
  the 16-device, 4-tier fleet (experiments/fleets/tiers16.yaml): the optimal allocation's
  compute then upload per device (idle devices stay empty).
- docs/timeline_ringada_step.png: one RingAda GPipe step of MiniLM on the 4-device edge fleet
  (experiments/fleets/edge4.yaml), M = 8 microbatches, at unfreeze depth 4: the planner's
  optimal placement, forwards on every stage, backwards only over the stages holding unfrozen
  layers, activations and gradients sent between neighbours.

    python experiments/deft_timelines.py [--out docs]

Prints the simulated makespans as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def deft_round(out: Path, batch: int = 32, seq: int = 64, blocks: int = 6) -> dict:
    from ringjax.methods.deft import DEFAULT_BANDWIDTH_HZ, allocation_problem, block_sizes, fleet_bandwidth
    from ringjax.models import hub
    from ringjax.models.heads import HeadConfig
    from ringjax.peft import preset
    from ringjax.plan import allocate, gantt_png, load_fleet, round_schedule, simulate

    fleet = ROOT / "experiments" / "fleets" / "tiers16.yaml"
    cfg = hub.load_config(hub.resolve("minilm"))
    profiles = load_fleet(fleet)
    problem = allocation_problem(cfg, preset("houlsby"), HeadConfig("classification", 2), profiles,
                                 block_sizes(cfg.num_layers, blocks), batch, seq,
                                 fleet_bandwidth(fleet) or DEFAULT_BANDWIDTH_HZ)
    allocation = allocate(problem)
    schedule, costs = round_schedule(problem, allocation)
    result = simulate(schedule, profiles, costs)
    gantt_png(result, out / "timeline_deft_round.png", label="stage",
              title=f"DEFT round: MiniLM Houlsby, {blocks} blocks on 16 devices (4 tiers), "
                    f"{problem.bandwidth_hz / 1e6:g} MHz: {result.makespan:.3f} s (bar label = block)")
    return {"deft_round_seconds": result.makespan, "allocation_round_latency": allocation.round_latency,
            "assignment": list(allocation.assignment)}


def ringada_step(out: Path, batch: int = 32, seq: int = 64, microbatches: int = 8, depth: int = 4) -> dict:
    import argparse as _argparse

    from ringjax.plan import gantt_png, gpipe_schedule, load_fleet, simulate
    from ringjax.plan.cli import model_config, plan_ringada
    from ringjax.plan.costs import block_costs, hidden_state_bytes, top_layers

    fleet = ROOT / "experiments" / "fleets" / "edge4.yaml"
    args = _argparse.Namespace(model="minilm", fleet=str(fleet), adapter="houlsby", batch=batch, seq=seq,
                               efficiency=1.0, dtype="fp32", depth=depth, microbatches=microbatches)
    cfg = model_config("minilm")
    row = plan_ringada(args, cfg)["depths"][0]
    profiles = load_fleet(fleet)
    from ringjax.peft import preset

    costs = block_costs(cfg, preset("houlsby"), batch // microbatches, seq, top_layers(cfg.num_layers, depth))
    speeds = [p.flops("fp32") for p in profiles]
    stage_cost = {}
    for s, (lo, hi) in enumerate(row["stage_layers"]):
        stage_cost[("fwd", s)] = sum(costs[i].fwd_flops for i in range(lo, hi)) / speeds[s]
        stage_cost[("bwd", s)] = sum(costs[i].bwd_input_flops + costs[i].bwd_weight_flops for i in range(lo, hi)) / speeds[s]
    schedule = gpipe_schedule(len(profiles), microbatches, row["backward_stages"],
                              hidden_state_bytes(cfg, batch // microbatches, seq))
    result = simulate(schedule, profiles, stage_cost)
    layers = " ".join(f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in row["stage_layers"])
    gantt_png(result, out / "timeline_ringada_step.png",
              title=f"RingAda GPipe step: MiniLM on 4 edge devices, M={microbatches}, depth {depth}, layers [{layers}]: "
                    f"{result.makespan:.3f} s, bubble {result.bubble_fraction:.0%}")
    return {"ringada_step_seconds": result.makespan, "bubble_fraction": result.bubble_fraction,
            "stage_layers": row["stage_layers"], "backward_stages": row["backward_stages"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**deft_round(out), **ringada_step(out)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
