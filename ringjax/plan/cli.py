"""`ringjax plan` and `ringjax calibrate`: the planner from the command line.

    ringjax plan --model minilm --fleet experiments/fleets/tiers16.yaml --method deft --blocks 6 [--json]
    ringjax plan --model minilm --fleet experiments/fleets/edge4.yaml --method ringada
    ringjax calibrate --out profile.yaml

Every prediction comes from the analytic cost model (`ringjax.plan.costs`) and the fleet's
device profiles, at `--efficiency` times each device's peak FLOP/s. `--json` prints one JSON
object holding the solver's inputs as well as its result, so anyone can re-check it.
"""

from __future__ import annotations

import json
import math
import sys

from ringjax.errors import RingjaxError

METHODS = ("ringada", "deft", "pac", "caff")
NAMED_SHAPES = {  # model shapes the planner knows without a checkpoint
    "bert-base": dict(arch="bert", vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                      intermediate_size=3072, max_position=512, norm_eps=1e-12, activation="gelu", type_vocab_size=2),
    "bert-large": dict(arch="bert", vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16,
                       intermediate_size=4096, max_position=512, norm_eps=1e-12, activation="gelu", type_vocab_size=2),
}


def add_plan_arguments(parser) -> None:
    parser.add_argument("--model", default="minilm",
                        help=f"model name, Hugging Face directory, or a shape: {', '.join(NAMED_SHAPES)}")
    parser.add_argument("--fleet", required=True, help="fleet YAML (devices; for caff: client tiers)")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--blocks", type=int, default=None, help="DEFT depth blocks (default: min(devices, layers))")
    parser.add_argument("--adapter", default="houlsby", help="PEFT module RingAda / DEFT train (houlsby, pfeiffer, lora)")
    parser.add_argument("--batch", type=int, default=32, help="examples per device step (DEFT) or per global step")
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--bandwidth", default=None,
                        help="DEFT total uplink band in Hz, e.g. 10e6 or 10MHz (default: the fleet's bandwidth_hz, else 10MHz)")
    parser.add_argument("--efficiency", type=float, default=1.0, help="fraction of peak FLOP/s reached (default 1)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--depth", type=int, default=None, help="RingAda: one unfreeze depth (default: every depth)")
    parser.add_argument("--microbatches", type=int, default=4, help="RingAda / PAC pipeline microbatches")
    parser.add_argument("--clients", type=int, default=100, help="CAFF: number of clients dealt to the tiers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_calibrate_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="write the profile (a one-device fleet file) here")
    parser.add_argument("--name", default=None, help="device name (default: host name and platform)")
    parser.add_argument("--size", type=int, default=2048, help="matmul size n (n x n x n)")
    parser.add_argument("--repeats", type=int, default=5)


# ---------------------------------------------------------------------------------------------

def model_config(name: str):
    if name.lower() in NAMED_SHAPES:
        from ringjax.models.config import ModelConfig

        return ModelConfig(**NAMED_SHAPES[name.lower()])
    from ringjax.models import hub

    return hub.load_config(hub.resolve(name))


def _peft(name: str):
    from ringjax.peft import preset

    return preset(name)


def _bandwidth(args) -> float:
    from ringjax.methods.deft import DEFAULT_BANDWIDTH_HZ, fleet_bandwidth
    from ringjax.plan.profiles import parse_number

    if args.bandwidth is not None:
        text = str(args.bandwidth)
        text = text[:-2].strip() if text.lower().endswith("hz") else text
        return parse_number(text, "--bandwidth")
    return fleet_bandwidth(args.fleet) or DEFAULT_BANDWIDTH_HZ


def _device(profile, dtype, efficiency) -> dict:
    return {"name": profile.name, "flops_per_second": profile.flops(dtype) * efficiency,
            "memory_bytes": profile.memory_bytes,
            "spectral_efficiency_bits_per_hz": profile.uplink_spectral_efficiency_bits_per_hz}


def plan_deft(args, cfg) -> dict:
    from ringjax.methods.deft import allocation_problem, block_ranges, block_sizes, check_method, solve
    from ringjax.models.heads import HeadConfig
    from ringjax.plan.costs import step_costs
    from ringjax.plan.profiles import load_fleet

    spec = _peft(args.adapter)
    check_method(spec)
    head = HeadConfig("classification", 2)
    profiles = load_fleet(args.fleet)
    N = len(profiles)
    K = args.blocks or min(N, cfg.num_layers)
    if K > N:
        raise RingjaxError(f"--blocks {K} but the fleet has {N} devices: DEFT gives every block its own device")
    sizes = block_sizes(cfg.num_layers, K)
    problem = allocation_problem(cfg, spec, head, profiles, sizes, args.batch, args.seq, _bandwidth(args),
                                 args.efficiency, args.dtype)
    result = solve(problem, args.seed)
    blocks = []
    for b, layers in enumerate(block_ranges(sizes)):
        cost = step_costs(cfg, spec, args.batch, args.seq, trained=layers, head_trains=b == K - 1, optimizer=False,
                          first_only_top=False)
        blocks.append({"block": b, "layers": [layers.start, layers.stop], "flops": cost.flops,
                       "memory_bytes": cost.peak_bytes, "upload_bits": 8.0 * cost.upload_bytes})
    per_device = []
    block_of = {d: b for b, d in enumerate(result["assignment"])}
    for i, p in enumerate(profiles):
        b = block_of.get(i)
        per_device.append({**_device(p, args.dtype, args.efficiency), "block": b,
                           "memory_used_bytes": None if b is None else blocks[b]["memory_bytes"],
                           "bandwidth_hz": result["bandwidth_split"][i], "latency_seconds": result["device_latency"][i]})
    return {"method": "deft", "model": args.model, "adapter": args.adapter, "batch": args.batch, "seq_len": args.seq,
            "efficiency": args.efficiency, "dtype": args.dtype, "blocks": blocks, "devices": per_device,
            **problem.to_dict(), **result}


def _ringada_block_costs(cfg, spec, batch, seq, depth):
    """Per-block (seconds at unit speed: FLOPs) forward / backward work and memory at `depth`."""
    from ringjax.plan.costs import block_costs, first_only_top_block, top_layers

    return block_costs(cfg, spec, batch, seq, top_layers(cfg.num_layers, depth), first_only_top=first_only_top_block(cfg, spec))


def plan_ringada(args, cfg) -> dict:
    from ringjax.plan.costs import embedding_params, head_params, hidden_state_bytes
    from ringjax.plan.placement import optimal_placement
    from ringjax.plan.profiles import load_fleet
    from ringjax.plan.simulator import gpipe_schedule, simulate

    spec = _peft(args.adapter)
    profiles = load_fleet(args.fleet)
    N, L, M = len(profiles), cfg.num_layers, args.microbatches
    if args.batch % M:
        raise RingjaxError(f"--batch {args.batch} does not split into {M} microbatches: use a multiple of {M}")
    mb = args.batch // M
    speeds = [p.flops(args.dtype) * args.efficiency for p in profiles]
    replicated = (embedding_params(cfg) + head_params(cfg, 2)) * 4  # every device holds embedding and head
    memories = [p.memory_bytes - replicated for p in profiles]
    depths = [args.depth] if args.depth is not None else list(range(1, L + 1))
    act_bytes = hidden_state_bytes(cfg, mb, args.seq)
    rows = []
    for depth in depths:
        costs = _ringada_block_costs(cfg, spec, mb, args.seq, depth)
        work = [c.train_flops * M for c in costs]
        # a block holds its weights, its adapters' gradients and Adam moments, and (GPipe) M microbatches' residuals
        memory = [4.0 * (c.params + 3 * c.trainable_params) + M * c.residual_bytes for c in costs]
        try:
            placement = optimal_placement(work, memory, speeds, memories)
        except RingjaxError as error:
            rows.append({"depth": depth, "error": str(error)})
            continue
        ranges = placement.ranges
        stage_cost = {}
        for s, r in enumerate(ranges):
            stage_cost[("fwd", s)] = math.fsum(costs[i].fwd_flops for i in r) / speeds[s]
            stage_cost[("bwd", s)] = math.fsum(costs[i].bwd_input_flops + costs[i].bwd_weight_flops for i in r) / speeds[s]
        trains = [any(costs[i].trainable_params for i in r) for r in ranges]
        backward_stages = N - trains.index(True) if True in trains else 0
        schedule = gpipe_schedule(N, M, backward_stages, act_bytes)
        sim = simulate(schedule, profiles, stage_cost)
        rows.append({"depth": depth, "sizes": list(placement.sizes),
                     "stage_layers": [[r.start, r.stop] for r in ranges],
                     "bottleneck_seconds": placement.bottleneck_seconds,
                     "step_seconds": sim.makespan, "bubble_fraction": sim.bubble_fraction,
                     "stage_memory_bytes": [m + replicated for m in placement.stage_memory_bytes],
                     "backward_stages": backward_stages})
    return {"method": "ringada", "model": args.model, "adapter": args.adapter, "batch": args.batch,
            "seq_len": args.seq, "microbatches": M, "efficiency": args.efficiency, "schedule": "gpipe",
            "devices": [_device(p, args.dtype, args.efficiency) for p in profiles], "depths": rows}


def plan_pac(args, cfg) -> dict:
    """Epoch 1: the frozen backbone forward pipelined over the ring (placement of forward-only
    blocks); later epochs: the side network trains data-parallel from the activation cache."""
    from ringjax.peft import preset
    from ringjax.plan.costs import block_costs, embedding_params, head_params, hidden_state_bytes, step_costs
    from ringjax.plan.placement import optimal_placement
    from ringjax.plan.profiles import load_fleet
    from ringjax.plan.simulator import gpipe_schedule, simulate

    spec = preset("parallel")
    profiles = load_fleet(args.fleet)
    N, L, M = len(profiles), cfg.num_layers, args.microbatches
    if args.batch % M:
        raise RingjaxError(f"--batch {args.batch} does not split into {M} microbatches: use a multiple of {M}")
    mb = args.batch // M
    speeds = [p.flops(args.dtype) * args.efficiency for p in profiles]
    replicated = (embedding_params(cfg) + head_params(cfg, 2)) * 4
    frozen = block_costs(cfg, preset("full"), mb, args.seq, trained=[])  # the backbone, forward only
    work = [c.fwd_flops * M for c in frozen]
    memory = [4.0 * c.params for c in frozen]
    placement = optimal_placement(work, memory, speeds, [p.memory_bytes - replicated for p in profiles])
    stage_cost = {("fwd", s): math.fsum(frozen[i].fwd_flops for i in r) / speeds[s]
                  for s, r in enumerate(placement.ranges)}
    sim = simulate(gpipe_schedule(N, M, 0, hidden_state_bytes(cfg, mb, args.seq)), profiles, stage_cost)
    # cached epochs: each device trains the side network on batch / N examples, then all-reduce
    rows = max(1, args.batch // N)
    side = step_costs(cfg, spec, rows, args.seq)
    backbone = block_costs(cfg, preset("full"), rows, args.seq, trained=[])
    side_flops = side.optimizer_flops + side.head_flops + math.fsum(
        c.train_flops - f.fwd_flops for c, f in zip(side.blocks, backbone))
    cached = [side_flops / s for s in speeds]
    return {"method": "pac", "model": args.model, "batch": args.batch, "seq_len": args.seq, "microbatches": M,
            "efficiency": args.efficiency, "devices": [_device(p, args.dtype, args.efficiency) for p in profiles],
            "epoch1": {"sizes": list(placement.sizes), "stage_layers": [[r.start, r.stop] for r in placement.ranges],
                       "step_seconds": sim.makespan, "bubble_fraction": sim.bubble_fraction,
                       "stage_memory_bytes": [m + replicated for m in placement.stage_memory_bytes]},
            "cached_epochs": {"step_seconds": max(cached), "device_seconds": cached,
                              "side_network_params": side.trainable_bytes / 4}}


def plan_caff(args, cfg) -> dict:
    try:
        from ringjax.fl.budgets import load_fleet
        from ringjax.fl.costs import CostModel, Workload
        from ringjax.fl.selection import plan_clients
    except ImportError as error:
        raise RingjaxError(f"CAFF planning needs ringjax.fl, which is not available here ({error})") from None
    from ringjax.models.heads import HeadConfig

    fleet = load_fleet(args.fleet)
    budgets = fleet.assign(args.clients, args.seed)
    costs = CostModel(cfg, HeadConfig("classification", 2), Workload(batch_size=args.batch, seq_len=args.seq))
    plans = {}
    for method in ("caff", "uniform-t", "fedavg-full", "fedlora"):
        plan = plan_clients(method, costs, budgets)
        depths = plan.depths()
        per_tier = {}
        for i in range(len(budgets)):
            per_tier.setdefault(budgets.tier_name(i), []).append(int(depths[i]))
        plans[method] = {"summary": plan.summary(), "participating": int(len(plan.eligible)),
                         "excluded": int(plan.excluded),
                         "mean_depth": float(depths[depths >= 0].mean()) if (depths >= 0).any() else 0.0,
                         "depth_by_tier": {t: sorted(set(d)) for t, d in per_tier.items()}}
    return {"method": "caff", "model": args.model, "clients": args.clients, "num_layers": cfg.num_layers,
            "plans": plans}


def plan_command(args) -> dict:
    cfg = model_config(args.model)
    return {"deft": plan_deft, "ringada": plan_ringada, "pac": plan_pac, "caff": plan_caff}[args.method](args, cfg)


# ---------------------------------------------------------------------------------------------

def _size(n) -> str:
    from ringjax.plan.profiles import format_size

    return "-" if n is None else format_size(n)


def format_plan(plan: dict) -> str:
    lines = []
    method = plan["method"]
    if method == "deft":
        lines.append(f"DEFT on {plan['model']} ({plan['adapter']}), {len(plan['blocks'])} blocks over "
                     f"{len(plan['devices'])} devices, batch {plan['batch']} x {plan['seq_len']}, "
                     f"band {plan['bandwidth_hz'] / 1e6:g} MHz, efficiency {plan['efficiency']:g}")
        lines.append(f"{'block':>5} {'layers':>7} {'device':>16} {'GFLOP':>8} {'memory':>9} {'upload':>9} "
                     f"{'band MHz':>9} {'seconds':>8}")
        for b, blk in enumerate(plan["blocks"]):
            d = plan["assignment"][b]
            dev = plan["devices"][d]
            lines.append(f"{b:>5} {blk['layers'][0]:>3}-{blk['layers'][1] - 1:<3} {dev['name']:>16} "
                         f"{blk['flops'] / 1e9:>8.2f} {_size(blk['memory_bytes']):>9} "
                         f"{_size(blk['upload_bits'] / 8):>9} {dev['bandwidth_hz'] / 1e6:>9.3f} "
                         f"{dev['latency_seconds']:>8.3f}")
        idle = [d["name"] for d in plan["devices"] if d["block"] is None]
        if idle:
            lines.append(f"idle: {', '.join(idle)}")
        base = plan["baselines"]
        lines.append(f"round latency {plan['round_latency']:.4g} s (optimal); baselines: " + ", ".join(
            f"{k} {base[k]:.4g} s" if base.get(k) is not None else f"{k} infeasible"
            for k in ("random", "greedy", "equal_bandwidth")))
    elif method == "ringada":
        lines.append(f"RingAda on {plan['model']} ({plan['adapter']}), {len(plan['devices'])} devices, GPipe with "
                     f"{plan['microbatches']} microbatches, batch {plan['batch']} x {plan['seq_len']}")
        names = [d["name"] for d in plan["devices"]]
        lines.append("devices (ring order): " + ", ".join(names))
        for row in plan["depths"]:
            if "error" in row:
                lines.append(f"depth {row['depth']:>2}: {row['error']}")
                continue
            stages = " ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in row["stage_layers"])
            memory = " ".join(_size(m) for m in row["stage_memory_bytes"])
            lines.append(f"depth {row['depth']:>2}: layers per stage [{stages}]  step {row['step_seconds']:.4g} s  "
                         f"bubble {row['bubble_fraction']:.0%}  memory [{memory}]")
    elif method == "pac":
        e1, c = plan["epoch1"], plan["cached_epochs"]
        stages = " ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in e1["stage_layers"])
        lines.append(f"PAC on {plan['model']}, {len(plan['devices'])} devices, batch {plan['batch']} x {plan['seq_len']}")
        lines.append(f"epoch 1 (backbone forward pipelined, side network on the cache's taps): layers per stage "
                     f"[{stages}], step {e1['step_seconds']:.4g} s, memory "
                     f"[{' '.join(_size(m) for m in e1['stage_memory_bytes'])}]")
        lines.append(f"later epochs (cache only, data parallel): step {c['step_seconds']:.4g} s "
                     f"(slowest device), side network {c['side_network_params']:.0f} parameters")
    else:
        lines.append(f"CAFF on {plan['model']} ({plan['num_layers']} layers), {plan['clients']} clients")
        for p in plan["plans"].values():
            lines.append(f"{p['summary']}; mean trained depth {p['mean_depth']:.2f}; depths by tier {p['depth_by_tier']}")
    return "\n".join(lines)


def calibrate_command(args) -> dict:
    from ringjax.plan.profiles import calibrate, profile_entry, write_profile

    profile = calibrate(args.name, args.size, args.repeats)
    if args.out:
        write_profile(profile, args.out)
    return profile_entry(profile)


def cmd_plan(args) -> int:
    plan = plan_command(args)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


def cmd_calibrate(args) -> int:
    import yaml

    entry = calibrate_command(args)
    sys.stdout.write(yaml.safe_dump({"devices": [entry]}, sort_keys=False))
    if args.out:
        print(f"# written to {args.out}")
    return 0
