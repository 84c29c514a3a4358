"""Does the simulator predict the emulated ring step? Per-stage times measured here, fed to the
simulator with the ring engine's own schedule, against the ring step measured here.

For each unfreeze depth, on N emulated CPU devices (`--xla_force_host_platform_device_count`):
(a) every distinct action of the engine's schedule is compiled as a separate single-device jitted
    function doing what the engine's tick does for it, on one microbatch's shapes and the stage's
    real weights: "fwd" of stage d (attention bias, embedding on stage 0, the stage's frozen
    blocks, its trainable suffix under `jax.vjp`, the residuals packed and written into the next
    slot of the stash, a donated buffer shaped like the engine's), "bwd" of stage d (the oldest
    slot read back, written a stash's worth of forwards earlier as in the engine, so its residuals
    come from memory rather than cache; unpacked, the pullback: adapter gradients and, where the
    stage below trains, the input gradient) and "head" (final norm, head, loss and their gradients on the
    microbatch's owner). Two more programs are per-step work outside the schedule's actions:
    "update", the optimizer update (`masked_apply`) every ring device runs on its replica after
    the step, and "alloc", faulting in the step's temporary buffer. XLA's CPU runtime allocates
    each execution's temporaries as one buffer (`memory_analysis().temp_size_in_bytes`, 48 to
    157 MiB per device for MiniLM here), above glibc's mmap threshold, so it is mapped afresh at
    every step and every page faults (a few microseconds each in this VM; the JSON's
    `page_faults` shows the step's measured faults next to the temporary buffer's pages). The
    "alloc" program writes one byte per page of a fresh mapping of that size. That is the
    process as plain Python and the `ringjax` command line run it (`--malloc system`, the default);
    with `--malloc reuse` the script applies `ringjax.runtime.reuse_freed_memory` (the command
    line's RINGJAX_MALLOC=reuse), so the buffer is reused from the heap and the step faults few pages; what remains of "alloc" is the
    step's zero-filling of its scan carry (the residual stash, S slots of the largest training
    program's residuals, and the activation and gradient buffers), timed as a program that
    materialises zeros of those shapes.
    The emulated devices share the host's cores, and a program costs less per copy when k
    devices run it at once than alone (XLA's intra-op threads split one program over both
    cores, with their synchronisation overhead; k programs keep the cores busy). So each
    program is timed with k copies at once on k devices, for every k at which the engine runs
    it: the number of devices with a forward or backward in the same tick of the lock-step
    engine (N for "alloc" and "update"); the cost of an action is time(k) / k at its tick's k.
    Alone (k = 1) is also reported (`relative_error_programs_timed_alone`);
(b) those costs go to `ringjax.plan.simulate` with the schedule the engine runs
    (`PipelineSchedule.to_simulator()`), with one "alloc" per device before it and one "update"
    per device after a barrier; its predicted total work is the sum of busy time over devices,
    next to its makespan (what N real devices would take);
(c) the ring's whole training step (`make_ring_train_step`) is timed. The emulated devices share
    this machine's cores, so the step's CPU time is the work of all devices together; on an idle
    machine its wall time is that over the cores. Both are compared with the predicted total
    work; CPU time is the primary figure, because the other processes on a shared machine take
    cores away from (and stretch the wall time of) a 4-thread ring and a 1-device program unequally.
(a) and (c) are interleaved, round after round (the programs in a shuffled order, twice each),
so drift on a shared machine hits both alike. Medians throughout.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/simulator_vs_ring.py \
        [--model minilm] [--batch 32] [--seq 64] [--microbatches 8] [--depths 1,3,6] [--repeats 5]

Prints one JSON object: per depth and clock the predicted total work and makespan, the measured
step time and the relative error (predicted / measured - 1), with the per-program medians.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import resource
import statistics
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


EVERY = -1
"""Stage field of a program every device runs alike: ("head", EVERY) on the owner, ("update", EVERY) after the step."""


def _seconds(fn) -> tuple[float, float, int]:
    """(wall s, CPU s, minor page faults) of one call; CPU and faults are the whole process's, all
    threads (every emulated device)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return (time.perf_counter() - wall, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, min(20000, vocab), (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "token_type_ids": np.zeros((batch, seq), np.int32),
            "labels": rng.integers(0, 2, (batch,)).astype(np.int32)}


def action_programs(pipe, trainable: dict, frozen: dict, host_batch: dict, devices) -> dict:
    """{(kind, stage or EVERY): [zero-argument callable per device]}: each distinct action of
    `pipe`'s schedule as its own jitted single-device program on microbatch 0's shapes (see the
    docstring), one copy with its inputs on each of `devices`."""
    from ringjax.models.backbone import embed as embed_tokens
    from ringjax.models.heads import apply_head, example_losses
    from ringjax.models.layers import attention_bias

    cfg, S = pipe.cfg, pipe.placement.max_size
    B = host_batch["input_ids"].shape[0]
    mb = pipe.microbatch_size(B)
    seq = host_batch["input_ids"].shape[1]
    staged_blocks = jax.tree.map(np.asarray, pipe.stage_tree(frozen["blocks"]))
    staged_peft = jax.tree.map(np.asarray, pipe.stage_tree(trainable["peft"]["blocks"]))
    slab = lambda tree, d: jax.tree.map(lambda x: x[d * S:(d + 1) * S], tree)  # noqa: E731
    stash = stash_shapes(pipe, trainable, frozen, mb, seq)
    slots = pipe.schedule.slots

    def empty_stash(device):
        return jax.device_put({k: np.zeros(shape, k) for k, shape in stash.items()}, device)
    host = {
        "micro": {k: v[:mb] for k, v in host_batch.items()},
        "h": np.random.default_rng(1).normal(size=(mb, seq, cfg.hidden_size)).astype(np.float32),
        "embed": frozen["embed"], "final": frozen.get("final", {}), "head": trainable["head"],
    }
    inputs = [jax.device_put(host, device) for device in devices]

    def head_loss(hp, final_p, embed_p, x, mask, labels):
        x = pipe._arch.final(cfg, final_p, x)
        logits = apply_head(cfg, pipe.head, hp, x, mask, embed_p)
        return jnp.sum(example_losses(pipe.head, logits, labels)) / B

    head = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 3)))
    programs = {("head", EVERY): [lambda i=i: head(i["head"], i["final"], i["embed"], i["h"], i["micro"]["attention_mask"],
                                                   i["micro"]["labels"]) for i in inputs]}
    for d, prog in enumerate(pipe.programs):
        weights = [jax.device_put((slab(staged_blocks, d), slab(staged_peft, d)), device) for device in devices]

        def fwd(blocks, peft, embed_p, micro, h, stash, slot, prog=prog, first=d == 0):
            bias = attention_bias(micro["attention_mask"], cfg.causal)
            if first:
                h = embed_tokens(cfg, {"embed": embed_p}, micro)
            return pipe.stage_forward(prog, blocks, peft, h, bias, stash, slot)

        fwd = jax.jit(fwd, donate_argnums=5)
        copies, stashes = [], []
        for w, i, device in zip(weights, inputs, devices):
            # as in the engine, a forward writes the next slot and a backward reads the oldest one,
            # written `slots` forwards earlier (its residuals are no longer in the caches)
            held = {"stash": empty_stash(device) if prog.trains else {}, "slot": 0}

            def run(fwd=fwd, w=w, i=i, held=held):
                out, held["stash"] = fwd(*w, i["embed"], i["micro"], i["h"], held["stash"], np.int32(held["slot"]))
                held["slot"] = (held["slot"] + 1) % slots
                return out, held["stash"]

            for _ in range(slots):  # fills every slot (and records the residual plan)
                jax.block_until_ready(run())
            copies.append(run)
            stashes.append(held)
        programs[("fwd", d)] = copies
        if prog.trains:
            def bwd(blocks, peft, stash, slot, mask, g, prog=prog):
                bias = attention_bias(mask, cfg.causal)
                return pipe.stage_backward(prog, blocks, peft, stash, slot, bias, g)

            bwd = jax.jit(bwd)
            programs[("bwd", d)] = [
                lambda bwd=bwd, w=w, i=i, held=held: bwd(*w, held["stash"], np.int32(held["slot"]), i["micro"]["attention_mask"], i["h"])
                for w, i, held in zip(weights, inputs, stashes)]
    return programs


def update_programs(pipe, optimizer, params: dict, state, devices) -> list:
    """One `masked_apply` update of the whole trainable tree, a copy on each of `devices`."""
    from ringjax.peft.trainable import layer_mask, split
    from ringjax.train.optim import masked_apply

    factors = layer_mask(params, pipe.spec, pipe.depth, pipe.cfg.num_layers)
    present = jax.tree.map(lambda x: x is not None, state.trainable, is_leaf=lambda x: x is None)
    t_factors, _ = split(factors, present)
    apply = jax.jit(lambda g, s, t: masked_apply(optimizer, g, s, t, t_factors))
    host = jax.tree.map(np.asarray, state)
    grads = jax.tree.map(lambda x: x * 1e-3, host.trainable)
    copies = []
    for device in devices:
        local, g = jax.device_put((host, grads), device)
        copies.append(lambda local=local, g=g: apply(g, local.opt_state, local.trainable))
    return copies


def fresh_memory_program(nbytes: int):
    """Zero-argument callable writing `nbytes` of freshly mapped memory: what one device's step pays
    to fault in its temporary buffer, which the XLA CPU runtime maps anew at every call (too big to
    be reused from the heap), so every page faults and the kernel zeroes it."""
    def run():
        if nbytes <= 0:
            return None
        memory = mmap.mmap(-1, nbytes)
        view = np.frombuffer(memory, np.uint8)
        view[::mmap.PAGESIZE] = 1  # one write per page: the fault and the kernel's zeroing
        del view
        memory.close()
    return run


def stash_shapes(pipe, trainable: dict, frozen: dict, mb: int, seq: int) -> dict:
    """{dtype: (slots, n)}: the engine's per-device residual stash, `pipe.schedule.slots` rows of
    each dtype's residuals of the largest training program (`RingPipeline.residual_sizes`)."""
    S = pipe.placement.max_size
    first_stage = jax.tree.map(lambda x: x[:S], (pipe.stage_tree(frozen["blocks"]), pipe.stage_tree(trainable["peft"]["blocks"])))
    sizes = pipe.residual_sizes(*first_stage, (mb, seq))
    return {k: (pipe.schedule.slots, n) for k, n in sizes.items()}


def carry_zeros_program(pipe, stash: dict, mb: int, seq: int, device):
    """Zero-argument callable materialising zeros shaped like one device's scan carry (the
    `stash_shapes` stash and the (M + 1) activation and gradient buffers): the fill the ring
    step pays at its start when its buffers come from the heap."""
    shapes = [(shape, k) for k, shape in stash.items()]
    shapes += [((pipe.M + 1, mb, seq, pipe.cfg.hidden_size), "float32")] * 2
    return jax.jit(lambda: [jnp.zeros(shape, dtype) for shape, dtype in shapes],
                   out_shardings=jax.sharding.SingleDeviceSharding(device))


def emulated_profiles(n: int):
    """The emulated devices: the `cpu-host` preset (compute speed does not matter here: the costs are seconds)."""
    from ringjax.plan import preset

    host = preset("cpu-host")
    return [dataclasses.replace(host, name=f"emulated {d}") for d in range(n)]


def step_schedule(pipe, activation_bytes: float = 0.0):
    """The simulator's schedule of one ring training step: `pipe`'s schedule as the engine hands it
    over, with one "alloc" per device before it and one "update" per device after a barrier."""
    from ringjax.plan.simulator import first_on_every_device, then_on_every_device

    schedule = pipe.schedule.to_simulator(activation_bytes)
    return then_on_every_device(first_on_every_device(schedule, "alloc"), "update")


def program_key(kind: str, stage: int) -> tuple[str, int]:
    return (kind, stage) if kind in ("fwd", "bwd") else (kind, EVERY)


def concurrency(pipe) -> dict:
    """{(kind, stage): [devices working at once in the tick of each of its actions]}: in one tick of
    the lock-step engine, the devices with a forward or backward share the host's cores; the head
    runs beside them; "alloc" and "update" run on every device at once."""
    out: dict = {}
    for tick in pipe.schedule.ticks:
        busy = max(1, sum(a.kind in ("fwd", "bwd") for a in tick))
        for a in tick:
            out.setdefault((a.kind, a.stage), []).append(busy)
    for d in range(pipe.N):
        out[("alloc", d)] = out[("update", d)] = [pipe.N]
    return out


@dataclasses.dataclass
class Case:
    depth: int
    pipe: object
    step: object
    state: object
    frozen: object
    data: object
    temp_bytes: int  # XLA's temporary buffer of the compiled step, on each device
    programs: dict  # {(kind, stage or EVERY): [zero-argument callable per device]}
    times: dict  # {(program key, copies run at once): [(wall, cpu, faults), ...]}
    step_times: list  # [(wall, cpu, faults), ...]

    def run_step(self):
        self.state, out, _ = self.step(self.state, self.frozen, self.data)  # no stash: zero-filled each step, as "alloc" models
        return self.state, out  # wait for the updated state too, not only the loss

    def levels(self) -> dict:
        """{program key: the numbers of copies to time it at}: 1 (alone), and every concurrency its actions meet."""
        out = {key: {1} for key in self.programs}
        for (kind, stage), busy in concurrency(self.pipe).items():
            out[program_key(kind, stage)].update(busy)
        return {key: sorted(v) for key, v in out.items()}


def build_case(model, depth: int, devices: int, microbatches: int, host_batch: dict, *, schedule: str = "1f1b",
               stages: str = "equal", fresh_temp: bool = True) -> Case:
    from ringjax.methods.ringada import make_ring_train_step
    from ringjax.parallel.mesh import make_stage_mesh, put_tree
    from ringjax.parallel.placement import plan_stages
    from ringjax.parallel.ring import RingPipeline
    from ringjax.peft.trainable import leaf_mask, split
    from ringjax.train.optim import OptimConfig, make_optimizer
    from ringjax.train.step import init_state

    cfg, spec, head, params = model.config, model.peft_config, model.head_config, model.tree()
    optimizer = make_optimizer(OptimConfig(), 1000)
    trainable, frozen = split(params, leaf_mask(params, spec))
    mesh = make_stage_mesh(devices)
    placement = plan_stages(cfg.num_layers, devices, stages, depth=depth)
    pipe = RingPipeline(cfg, spec, head, mesh, placement, microbatches, depth, schedule=schedule)
    state0 = init_state(optimizer, trainable)
    step = make_ring_train_step(pipe, optimizer, params)
    state = put_tree(state0, mesh)
    placed, data = pipe.place_frozen(frozen), pipe.shard_batch(host_batch)
    compiled = step.lower(state, placed, data).compile()
    ring_devices = list(mesh.devices.flat)
    programs = action_programs(pipe, trainable, frozen, host_batch, ring_devices)
    programs[("update", EVERY)] = update_programs(pipe, optimizer, params, state0, ring_devices)
    temp = int(compiled.memory_analysis().temp_size_in_bytes)  # one SPMD program: the same on every device
    if fresh_temp:
        programs[("alloc", EVERY)] = [fresh_memory_program(temp)] * devices
    else:
        mb, seq = pipe.microbatch_size(host_batch["input_ids"].shape[0]), host_batch["input_ids"].shape[1]
        stash = stash_shapes(pipe, trainable, frozen, mb, seq)
        programs[("alloc", EVERY)] = [carry_zeros_program(pipe, stash, mb, seq, device) for device in ring_devices]
    return Case(depth, pipe, compiled, state, placed, data, temp, programs, {}, [])


def _together(copies, pool):
    """Run `copies` at once: jitted copies dispatch asynchronously to their own devices; plain Python
    ones ("alloc") on threads."""
    if len(copies) == 1:
        return copies[0]
    if copies[0] is copies[-1]:  # the same plain function for every device
        return lambda: list(pool.map(lambda f: f(), copies))
    return lambda: [f() for f in copies]


def measure(cases: list[Case], repeats: int, inner: int = 2, seed: int = 0) -> None:
    """Warm everything up, then `repeats` rounds; in each, for every case, every program at every
    level of concurrency it needs (k copies at once on k devices), `inner` times each in a shuffled
    order, then the ring step. The order is shuffled because the first program run after a ring
    step pays for the step's cold caches and freed memory."""
    from concurrent.futures import ThreadPoolExecutor

    order = random.Random(seed)
    pool = ThreadPoolExecutor(max(len(c.programs[("alloc", EVERY)]) for c in cases))
    runs = {}
    for case in cases:
        for key, levels in case.levels().items():
            for k in levels:
                runs[(case.depth, key, k)] = _together(case.programs[key][:k], pool)
                case.times.setdefault((key, k), [])
        for key, copies in case.programs.items():
            for fn in copies:
                jax.block_until_ready(fn())
        jax.block_until_ready(case.run_step())
    for _ in range(repeats):
        for case in cases:
            jobs = [(key, k) for key, k in case.times] * inner
            order.shuffle(jobs)
            for key, k in jobs:
                case.times[(key, k)].append(_seconds(runs[(case.depth, key, k)]))
            case.step_times.append(_seconds(case.run_step))
    pool.shutdown()


def costs_per_action(case: Case, clock: int, alone: bool = False) -> dict:
    """{(kind, stage): seconds} for the simulator: the median time of k copies run at once, over k,
    at the concurrency of each of the key's actions (averaged over them), or alone (k = 1).

    Pages a program faults in when timed outside the ring (its own buffers, which in the ring live
    inside the step's temporary buffer that "alloc" already pays for) are taken off its time at
    the per-page cost of the "alloc" samples at the same k."""
    def per_page(k):
        samples = [t[clock] / t[2] for t in case.times.get((("alloc", EVERY), k), []) if t[2] > 0]
        return statistics.median(samples) if samples else 0.0

    def seconds(key, k):
        page = per_page(k) if key[0] != "alloc" else 0.0
        return statistics.median(max(t[clock] - t[2] * page, 0.0) for t in case.times[(key, k)]) / k

    out = {}
    for (kind, stage), busy in concurrency(case.pipe).items():
        key = program_key(kind, stage)
        out[(kind, stage)] = seconds(key, 1) if alone else statistics.fmean(seconds(key, k) for k in busy)
    return out


def report(case: Case, activation_bytes: float = 0.0) -> dict:
    """Per depth: the simulator's prediction from the measured programs against the measured step,
    by CPU time (the primary comparison: the other processes on a shared machine cannot take it)
    and by wall time (what the step takes on this machine as it was during the run)."""
    from ringjax.plan import simulate

    pipe = case.pipe
    schedule = step_schedule(pipe, activation_bytes)
    profiles = emulated_profiles(pipe.N)
    out = {"depth": case.depth, "ticks": pipe.schedule.num_ticks, "actions": {}}
    for a in pipe.schedule.actions:
        out["actions"][a.kind] = out["actions"].get(a.kind, 0) + 1
    out["temp_bytes_per_device"] = case.temp_bytes
    out["page_faults"] = {
        "measured_step": statistics.median(t[2] for t in case.step_times),
        "temp_buffer_pages": pipe.N * case.temp_bytes // mmap.PAGESIZE,
    }
    for clock, i in (("cpu", 1), ("wall", 0)):
        costs = costs_per_action(case, i)
        result = simulate(schedule, profiles, costs)
        alone = simulate(schedule, profiles, costs_per_action(case, i, alone=True))
        measured = statistics.median(t[i] for t in case.step_times)
        by_kind = {}
        for span in result.spans:
            by_kind[span.item.kind] = by_kind.get(span.item.kind, 0.0) + span.end - span.start
        without_alloc = result.total_work - by_kind["alloc"]
        out[clock] = {
            "predicted_total_work_s": result.total_work,
            "predicted_makespan_s": result.makespan,
            "measured_step_s": measured,
            "relative_error": result.total_work / measured - 1.0,
            "relative_error_programs_timed_alone": alone.total_work / measured - 1.0,
            "relative_error_without_alloc": without_alloc / measured - 1.0,
            "measured_step_range_s": [min(t[i] for t in case.step_times), max(t[i] for t in case.step_times)],
            "predicted_work_by_kind_s": by_kind,
            "action_seconds": {f"{k}/{s}": v for (k, s), v in sorted(costs.items())
                               if k in ("fwd", "bwd") or s == 0},
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--depths", default="1,3,6")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--malloc", choices=["reuse", "system"], default="system",
                    help="system: glibc's defaults, as the ringjax CLI runs; reuse: keep freed heap memory (RINGJAX_MALLOC=reuse)")
    args = ap.parse_args(argv)

    from ringjax.runtime import reuse_freed_memory

    if args.malloc == "reuse":
        os.environ["RINGJAX_MALLOC"] = "reuse"
    reused = reuse_freed_memory()

    import ringjax
    from ringjax.plan.costs import hidden_state_bytes

    model = ringjax.load_model(args.model, head="classification", peft="houlsby")
    depths = [int(x) for x in args.depths.split(",") if x.strip()]
    host_batch = random_batch(args.batch, args.seq, model.config.vocab_size)
    cases = [build_case(model, depth, args.devices, args.microbatches, host_batch, schedule=args.schedule,
                        fresh_temp=not reused) for depth in depths]
    load_before = os.getloadavg()
    measure(cases, args.repeats)
    act_bytes = hidden_state_bytes(model.config, args.batch // args.microbatches, args.seq)
    rows = [report(case, act_bytes) for case in cases]
    result = {
        "model": args.model, "devices": args.devices, "batch": args.batch, "seq": args.seq,
        "microbatches": args.microbatches, "schedule": args.schedule, "repeats": args.repeats,
        "malloc": "reuse" if reused else "system",
        "cpu_cores": os.cpu_count(), "load_average_1m": [load_before[0], os.getloadavg()[0]],
        "depths": rows,
        "worst_abs_relative_error": {clock: max(abs(r[clock]["relative_error"]) for r in rows) for clock in ("cpu", "wall")},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
