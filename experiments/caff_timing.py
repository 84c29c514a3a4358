"""Simulation overhead: one CAFF round (10 clients x 5 local steps, batch 16) vs 50 single-device steps.

    python experiments/caff_timing.py --data-dir ../shared/data/glue --repeats 3 --out /tmp/caff_timing.json

Everything is padded to T = 64 so the three programs do the same shapes. Measured side by side,
alternating (this machine is shared, its speed drifts), after a warm-up that compiles all:
- round: `run_round` on the first round's sampled clients of the SST-2 experiment (their own
  depths from the fleet), vmapped by depth group, aggregation included, host batching included;
- sequential: the same clients' 50 local steps, one client at a time with a jitted single-client
  step (batches prepared beforehand): the same arithmetic without vectorisation;
- core: 50 steps of the core single-device trainer (`ringjax.train.step.make_train_step`),
  batch 16, at full depth and at top-t depth 1 (the cheapest and the dearest ends).
Also prints the measured peak bytes of every client job against its tier's memory budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from caff_sst2 import FLEET  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--round", type=int, default=1, help="which round's sample to time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ringjax
    from ringjax.data import encode, load_task_data, partition
    from ringjax.fl import FLConfig, GroupRunner, parse_fleet, plan_clients
    from ringjax.fl.clients import FLModel, client_example_rows, gather, local_optimizer, make_local_step, measured_peak_bytes, split_params
    from ringjax.fl.costs import CostModel
    from ringjax.fl.rounds import run_round, sample_clients
    from ringjax.train.optim import OptimConfig, make_optimizer
    from ringjax.train.step import init_state, make_train_step
    from ringjax.peft import leaf_mask, split

    T = 64
    config = FLConfig(num_clients=100, per_round=10, rounds=1, local_steps=5, batch_size=16, max_length=T, buckets=(T,), alpha=0.5, lr=1e-4)
    model = ringjax.load_model("minilm", head="classification", peft="top-t")
    cfg, head = model.config, model.head_config
    tokenizer = ringjax.load_tokenizer(model.directory)
    train = encode(load_task_data("sst2", args.data_dir, "train"), tokenizer, T)
    params = model.tree()
    fl_model = FLModel(cfg, head)
    budgets = parse_fleet(FLEET).assign(config.num_clients, config.seed)
    plan = plan_clients("caff", CostModel(cfg, head, config.workload), budgets)
    parts = partition(train.labels, config.num_clients, config.alpha, config.seed)
    sizes = np.array([len(p) for p in parts])
    chosen = sample_clients(plan.eligible, config.per_round, config.seed, args.round)
    jobs = [plan.jobs[c] for c in chosen]
    print("clients", chosen.tolist(), "depths", [j.depth for j in jobs], flush=True)
    opt = local_optimizer(config.lr)
    runner = GroupRunner(fl_model, {"top-t": opt, "full": opt, "lora": opt})

    # sequential: per-client jitted single steps, batches prepared beforehand
    steps = {}
    seq_work = []
    for c, job in zip(chosen, jobs):
        if job not in steps:
            steps[job] = jax.jit(make_local_step(fl_model, job, opt))
        rows = parts[c][client_example_rows(sizes, c, config.local_steps, config.batch_size, np.random.default_rng((config.seed, args.round, c)))]
        trainable, frozen = split_params(params, job, cfg.num_layers)
        seq_work.append((job, trainable, frozen, [gather(train, rows[e], T) for e in range(config.local_steps)]))

    def sequential():
        out = None
        for job, trainable, frozen, batches in seq_work:
            state = (trainable, opt.init(trainable))
            for batch in batches:
                state, loss = steps[job](state, frozen, batch)
            out = state
        jax.block_until_ready(out)

    def round_():
        server, _ = run_round(params, chosen, plan, runner, train, parts, config, args.round)
        jax.block_until_ready(server)

    # core single-device trainer, batch 16, T 64
    core = {}
    batch = gather(train, parts[chosen[0]][:16], T)
    for name, spec, depth in (("core-full", ringjax.preset("full"), cfg.num_layers), ("core-top1", ringjax.preset("top-t", top_t=1), 1)):
        optim = make_optimizer(OptimConfig(lr=1e-4), 1000)
        trainable, frozen = split(params, leaf_mask(params, spec))
        step = make_train_step(cfg, spec, head, optim, params, depth)
        core[name] = (step, optim, trainable, frozen)

    def core_steps(name):
        step, optim, trainable, frozen = core[name]
        state = init_state(optim, jax.tree.map(lambda x: x.copy() if x is not None else None, trainable, is_leaf=lambda x: x is None))
        for _ in range(50):
            state, _ = step(state, frozen, batch)
        jax.block_until_ready(state)

    programs = {"round": round_, "sequential": sequential, "core-full": lambda: core_steps("core-full"), "core-top1": lambda: core_steps("core-top1")}
    for name, fn in programs.items():  # warm-up: compile everything
        t0 = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    times = {name: [] for name in programs}
    for rep in range(args.repeats):
        for name, fn in programs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    ratios = {f"round/{k}": [r / x for r, x in zip(times["round"], times[k])] for k in programs if k != "round"}
    summary = {
        "clients": chosen.tolist(),
        "depths": [j.depth for j in jobs],
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "all_seconds": times,
        "ratios_median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratios_per_repeat": ratios,
        "compiles": runner.compiles,
    }

    # measured peak bytes of each distinct job vs the smallest memory budget of the clients holding it
    peaks = {}
    for job in sorted({j for j in plan.jobs if j is not None}, key=lambda j: j.depth):
        peak = measured_peak_bytes(fl_model, job, opt, params, config.batch_size, T)
        budget = min(budgets[i].memory_bytes for i, j in enumerate(plan.jobs) if j == job)
        peaks[f"{job.kind}-{job.depth}"] = {"measured": peak, "budget": budget, "within": peak <= budget}
    summary["peaks"] = peaks
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
