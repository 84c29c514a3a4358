"""`ringjax bench ring`: the ring step against the single-device step, measured in one run.

Method (what the numbers mean):
- seconds_per_step: median wall time of whole optimizer steps (ring and single-device steps
  alternate, round after round, so drift on a shared machine hits both alike). The
  single-device step runs in a child process that sees one device (`ringjax.bench_alone`):
  beside emulated devices it runs 20-27% slower, which would flatter the ring.
- flops: XLA's `cost_analysis()`. XLA counts a while-loop body once and a conditional as its
  most expensive branch, so neither whole program can be analysed as is. The single-device
  step is analysed with its layer scan unrolled (the same computation). A ring device's FLOPs
  are the sum over the actions the schedule gives it of each action's compiled program
  (stage forward, stage backward, embedding on stage 0, head and loss on the owner), plus the
  optimizer update every device runs; the stage programs are compiled with their layer
  loops unrolled. Frozen stages have no backward actions, so their count has no backward work.
- peak_bytes: `memory_analysis()` of the compiled step, arguments + outputs + temporaries -
  aliased. The ring step is one SPMD program and XLA reserves the same buffers on every
  device, so each device's figure is that program's.
- bubble_fraction: idle share of device time when each tick lasts as long as its busiest
  device, with every action costed by its FLOPs.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ringjax.bench import compiled_flops, peak_bytes, random_batch, single_device_step
from ringjax.bench_alone import AloneStep
from ringjax.errors import RingjaxError
from ringjax.models.backbone import embed
from ringjax.models.heads import apply_head, example_losses
from ringjax.models.layers import attention_bias
from ringjax.parallel.mesh import make_stage_mesh, put_tree
from ringjax.parallel.placement import plan_stages
from ringjax.parallel.ring import RingPipeline
from ringjax.peft.trainable import layer_mask, leaf_mask, split
from ringjax.train.optim import OptimConfig, make_optimizer, masked_apply
from ringjax.train.step import init_state


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def _cost(fn, *args) -> float:
    return compiled_flops(jax.jit(fn).lower(*args).compile())


def action_flops(pipe: RingPipeline, params: dict, batch_size: int, seq: int) -> dict:
    """FLOPs of each action kind of `pipe`'s schedule: {("fwd"|"bwd"|"head"|"embed", stage): flops}."""
    units = RingPipeline(pipe.cfg, pipe.spec, pipe.head, pipe.mesh, pipe.placement, pipe.M, pipe.depth,
                         schedule=pipe.schedule.name, residuals=pipe.residuals, unroll=True)
    mb = batch_size // pipe.M
    S, cfg = pipe.placement.max_size, pipe.cfg
    local = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct((S, *x.shape[1:]), x.dtype), tree)  # noqa: E731
    blocks, peft = local(params["blocks"]), local(params["peft"]["blocks"])
    h = jax.ShapeDtypeStruct((mb, seq, cfg.hidden_size), jnp.float32)
    ids = jax.ShapeDtypeStruct((mb, seq), jnp.int32)
    bias = units.bias_shape((mb, seq))
    costs = {}
    embed_flops = _cost(lambda e, i, m: embed(cfg, {"embed": e}, {"input_ids": i, "attention_mask": m}),
                        _abstract(params["embed"]), ids, ids)
    bias_flops = _cost(lambda m: attention_bias(m, cfg.causal), ids)
    stash = {k: jax.ShapeDtypeStruct((1, n), k) for k, n in units.residual_sizes(blocks, peft, (mb, seq)).items()}
    for d, prog in enumerate(pipe.programs):
        fwd = _cost(lambda b, p, h, bias, s, prog=prog: units.stage_forward(prog, b, p, h, bias, s, 0), blocks, peft, h, bias, stash)
        costs[("fwd", d)] = fwd + bias_flops + (embed_flops if d == 0 else 0.0)
        if prog.trains:  # (the forward above recorded the residual layout the backward reads)
            costs[("bwd", d)] = bias_flops + _cost(
                lambda b, p, s, bias, g, prog=prog: units.stage_backward(prog, b, p, s, 0, bias, g), blocks, peft, stash, bias, h)

    def head_loss(hp, x, mask, labels, final, emb):
        x = pipe._arch.final(cfg, final, x)
        logits = apply_head(cfg, pipe.head, hp, x, mask, emb)
        return jnp.sum(example_losses(pipe.head, logits, labels)) / batch_size

    labels = jax.ShapeDtypeStruct((mb,), jnp.int32) if pipe.head.kind != "regression" else jax.ShapeDtypeStruct((mb,), jnp.float32)
    if pipe.head.kind == "lm":
        labels = ids
    head_flops = _cost(jax.value_and_grad(head_loss, argnums=(0, 1)), _abstract(params["head"]), h, ids, labels,
                       _abstract(params.get("final", {})), _abstract(params["embed"]))
    for d in range(pipe.N):
        costs[("head", d)] = head_flops
    return costs


def device_flops(pipe: RingPipeline, costs: dict, update_flops: float) -> list[float]:
    per = [update_flops] * pipe.N
    for a in pipe.schedule.actions:
        per[a.device] += costs.get((a.kind, a.stage), 0.0)
    return per


def bench_ring(model: str = "minilm", devices: int = 4, microbatches: int = 8, batch: int = 32, seq: int = 64,
               depths=None, *, peft: str = "houlsby", schedule: str = "1f1b", residuals: str = "keep",
               stages="equal", repeats: int = 5) -> dict:
    """Seconds, FLOPs and peak bytes of the ring step per unfreeze depth (default: 1, the middle
    and all blocks) and of the single-device step."""
    import ringjax

    m = ringjax.load_model(model, head="classification", peft=peft)
    cfg, spec, head, params = m.config, m.peft_config, m.head_config, m.tree()
    L = cfg.num_layers
    depths = sorted({1, (L + 1) // 2, L}) if depths is None else [int(d) for d in depths]
    if not depths or not all(1 <= d <= L for d in depths):
        raise RingjaxError(f"unfreeze depths {depths} must lie in 1..{L} (the model has {L} blocks)")
    if batch % microbatches:
        raise RingjaxError(f"--batch {batch} does not split into {microbatches} microbatches: use a multiple of {microbatches}")
    optimizer = make_optimizer(OptimConfig(), 1000)
    trainable, frozen = split(params, leaf_mask(params, spec))

    # the single-device step with every block trainable: the reference, timed (and its peak bytes
    # analysed) in a child process; its unrolled twin here for FLOPs
    s_flops = compiled_flops(single_device_step(model, peft, batch, seq, unroll=True)[0])
    host_batch = {k: np.asarray(v) for k, v in random_batch(batch, seq, cfg.vocab_size).items()}  # the child's batch

    # the optimizer update every ring device runs (replicated)
    factors = layer_mask(params, spec, L, L)
    present = jax.tree.map(lambda x: x is not None, trainable, is_leaf=lambda x: x is None)
    t_factors, _ = split(factors, present)
    state0 = init_state(optimizer, trainable)
    update_flops = _cost(lambda g, s, t: masked_apply(optimizer, g, s, t, t_factors), _abstract(trainable),
                         _abstract(state0.opt_state), _abstract(trainable))

    from ringjax.methods.ringada import make_ring_train_step

    mesh = make_stage_mesh(devices)
    runs = []
    for depth in depths:
        placement = plan_stages(L, devices, stages, depth=depth)
        pipe = RingPipeline(cfg, spec, head, mesh, placement, microbatches, depth, schedule=schedule, residuals=residuals)
        step = make_ring_train_step(pipe, optimizer, params)
        state = put_tree(state0, mesh)
        placed, data = pipe.place_frozen(frozen), pipe.shard_batch(host_batch)
        stash = pipe.new_stash(trainable, frozen, data)
        compiled = step.lower(state, placed, data, stash).compile()
        costs = action_flops(pipe, params, batch, seq)
        runs.append(dict(depth=depth, pipe=pipe, compiled=compiled, state=state, frozen=placed, data=data, stash=stash,
                         costs=costs, flops=device_flops(pipe, costs, update_flops), peak=peak_bytes(compiled), times=[]))

    s_times = []
    for r in runs:  # warm up
        r["state"], _, r["stash"] = jax.block_until_ready(r["compiled"](r["state"], r["frozen"], r["data"], r["stash"]))
    with AloneStep(model, peft, batch, seq) as alone:
        s_peak = alone.peak_bytes
        for _ in range(repeats):
            s_times.append(alone.seconds())
            for r in runs:
                t = time.perf_counter()
                r["state"], out, r["stash"] = r["compiled"](r["state"], r["frozen"], r["data"], r["stash"])
                jax.block_until_ready(out)
                r["times"].append(time.perf_counter() - t)

    return {
        "single_device": {"seconds_per_step": statistics.median(s_times), "flops": s_flops, "peak_bytes": s_peak},
        "depths": [
            {
                "depth": r["depth"],
                "seconds_per_step": statistics.median(r["times"]),
                "flops": r["flops"],
                "peak_bytes": [r["peak"]] * devices,
                "bubble_fraction": r["pipe"].schedule.bubble_fraction(r["costs"]),
            }
            for r in runs
        ],
    }


def parse_depths(text) -> tuple[int, ...] | None:
    """`--depths 1,3,6` -> (1, 3, 6); None stays None (the default depths)."""
    if text is None or isinstance(text, (tuple, list)):
        return text
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise RingjaxError(f"cannot read --depths {text!r}: write unfreeze depths like 1,3,6") from None


def bench_ring_cli(options: dict) -> dict:
    """`ringjax bench ring`: `bench_ring` with the command line's options (--method is the adapter)."""
    devices = options.get("devices") or 4
    make_stage_mesh(devices)  # too few visible devices: one line naming XLA_FLAGS
    return bench_ring(options["model"], devices, options.get("microbatches") or 8, options["batch"], options["seq"],
                      parse_depths(options.get("depths")), peft=options.get("method") or "houlsby",
                      schedule=options.get("schedule") or "1f1b", residuals=options.get("residuals") or "keep",
                      stages=options.get("stages") or "equal", repeats=options.get("repeats") or 1)
