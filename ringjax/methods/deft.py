"""DEFT: cooperative block fine-tuning with per-device truncated backpropagation.

The trainable PEFT parameters (adapters or LoRA of the L layers) are cut into K depth blocks of
contiguous layers (block 0 at the bottom; the task head belongs to the top block, K - 1). Each
round every block is assigned to one device of the `device` mesh axis (K <= N; spare devices
idle). One SPMD step (`shard_map`) then runs on every device:

- the forward through the whole model on the device's own local batch (layers below its block
  under `stop_gradient`, so they keep no residuals);
- the backward from the loss down to its block and no further, computing gradients for that
  block's parameters only (layers above it pass input gradients, never weight gradients).

The K truncated passes are the branches of a `lax.switch` on the per-device block index (one
more, empty branch for idle devices). The index varies across devices, so each device runs only
its taken branch: the skipped backward is really skipped (`branch_flops` shows it per device).
Every branch returns a gradient tree that is zero outside its block, so a `psum` over the axis
assembles the full gradient, each block's part coming from exactly one device.

Semantics: with `assign[b]` the device of block b and D_i device i's local batch, the server
update uses g_b = grad_{theta_b} mean_loss(theta; D_assign[b]) for every block b (the same
value a single device computes from D_assign[b]); the step loss is the mean of the active
devices' local losses. The server's optimizer update (optax, through `masked_apply`) then runs
replicated after the `psum`, which is the aggregate-update-broadcast of the protocol in one
collective.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ringjax.errors import RingjaxError
from ringjax.models.backbone import arch, embed, layer_slice, peft_blocks, run_blocks
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, apply_head, example_losses
from ringjax.models.layers import attention_bias
from ringjax.peft.config import PeftConfig
from ringjax.peft.trainable import count, layer_mask, leaf_mask, merge, split
from ringjax.train.optim import masked_apply
from ringjax.train.step import TrainState, init_state, weighted_mean

AXIS = "device"
DEFAULT_BANDWIDTH_HZ = 10e6  # total uplink band when a fleet file does not give `bandwidth_hz`
DATA_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "example_mask")


# ---------------------------------------------------------------------------------------------
# Blocks and assignments
# ---------------------------------------------------------------------------------------------

def block_sizes(num_layers: int, num_blocks: int) -> tuple[int, ...]:
    """Layers per depth block, bottom-up, as even as possible (lower blocks take the extra)."""
    if not 1 <= num_blocks <= num_layers:
        raise RingjaxError(f"--blocks {num_blocks}: choose 1..{num_layers} blocks for a {num_layers}-layer model")
    base, extra = divmod(num_layers, num_blocks)
    return tuple(base + (b < extra) for b in range(num_blocks))


def block_ranges(sizes) -> tuple[range, ...]:
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    return tuple(range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]))


def device_blocks(assignment, num_devices: int) -> np.ndarray:
    """Per-device block index from assignment[b] = device; idle devices get K (the no-op branch)."""
    K = len(assignment)
    if len(set(assignment)) != K or not all(0 <= d < num_devices for d in assignment):
        raise RingjaxError(f"assignment {tuple(assignment)} must give each of the {K} blocks its own device "
                           f"among 0..{num_devices - 1}")
    out = np.full(num_devices, K, np.int32)
    out[list(assignment)] = np.arange(K, dtype=np.int32)
    return out


def round_robin(num_blocks: int, num_devices: int, round_index: int = 0) -> tuple[int, ...]:
    """Round r puts block b on device (b + r) mod N, so over rounds every block sees every shard."""
    return tuple((b + round_index) % num_devices for b in range(num_blocks))


def check_method(spec: PeftConfig) -> None:
    if spec.kind not in ("adapter", "lora"):
        raise RingjaxError(f"DEFT trains per-layer PEFT modules in depth blocks; PEFT kind {spec.kind!r} has none: "
                           f"use --adapter houlsby, pfeiffer or lora")


def make_mesh(num_devices: int, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= num_devices <= len(devices):
        kind = devices[0].platform if devices else "cpu"
        hint = (f"set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before starting "
                f"(emulated CPU devices)" if kind == "cpu" else "use fewer devices")
        raise RingjaxError(f"DEFT over {num_devices} devices but {len(devices)} {kind} devices are visible; {hint}")
    return Mesh(np.array(devices[:num_devices]), (AXIS,))


# ---------------------------------------------------------------------------------------------
# One block's truncated forward-backward
# ---------------------------------------------------------------------------------------------

def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def block_loss(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, params: dict, block_peft: dict,
               head_params: dict, batch: dict, start: int, stop: int, unroll: bool = False):
    """Mean loss with block [start, stop)'s PEFT parameters and the head given separately.

    Layers below `start` run forward only (under stop_gradient); layers above `stop` use the
    PEFT parameters in `params`, so differentiating w.r.t. `block_peft` gives input gradients
    there but never their weight gradients. `unroll` unrolls the layer scans (for FLOP counting).
    """
    L = cfg.num_layers
    bias = attention_bias(batch["attention_mask"], cfg.causal)
    blocks, pb = params["blocks"], peft_blocks(params)
    h = embed(cfg, params, batch)
    if start > 0:
        h, _ = run_blocks(cfg, spec, layer_slice(blocks, 0, start), layer_slice(pb, 0, start), h, bias, unroll=unroll)
        h = jax.lax.stop_gradient(h)
    h, _ = run_blocks(cfg, spec, layer_slice(blocks, start, stop), block_peft, h, bias, unroll=unroll)
    if stop < L:
        h, _ = run_blocks(cfg, spec, layer_slice(blocks, stop, L), layer_slice(pb, stop, L), h, bias, unroll=unroll)
    h = arch(cfg).final(cfg, params["final"], h)
    logits = apply_head(cfg, head, head_params, h, batch["attention_mask"], params["embed"])
    return weighted_mean(example_losses(head, logits, batch["labels"]), batch)


def block_value_and_grad(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, layers: range, top: bool,
                         unroll: bool = False):
    """fn(trainable, frozen, batch) -> (loss, grads shaped like `trainable`, zero outside the block).

    The gradient covers the PEFT parameters of `layers` and, for the top block, the head.
    """
    start, stop = layers.start, layers.stop

    def fn(trainable, frozen, batch):
        params = merge(trainable, frozen)
        block_peft = layer_slice(peft_blocks(params), start, stop)
        if top:
            loss, (g_block, g_head) = jax.value_and_grad(
                lambda bp, hp: block_loss(cfg, spec, head, params, bp, hp, batch, start, stop, unroll), argnums=(0, 1)
            )(block_peft, params["head"])
        else:
            loss, g_block = jax.value_and_grad(
                lambda bp: block_loss(cfg, spec, head, params, bp, params["head"], batch, start, stop, unroll)
            )(block_peft)
            g_head = _zeros(trainable["head"])
        grads = _zeros(trainable)
        grads["head"] = g_head
        grads["peft"]["blocks"] = jax.tree.map(
            lambda z, g: z.at[start:stop].set(g), grads["peft"]["blocks"], g_block)
        return loss, grads

    return fn


def idle_value_and_grad(trainable, frozen, batch):
    return jnp.zeros((), jnp.float32), _zeros(trainable)


# ---------------------------------------------------------------------------------------------
# The SPMD round step
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeftStep:
    """A compiled DEFT round for fixed (model, PEFT, head, blocks, mesh); the assignment is an input."""

    cfg: ModelConfig
    spec: PeftConfig
    head: HeadConfig
    sizes: tuple[int, ...]
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def ranges(self) -> tuple[range, ...]:
        return block_ranges(self.sizes)

    def branches(self):
        K = len(self.sizes)
        return [block_value_and_grad(self.cfg, self.spec, self.head, r, b == K - 1)
                for b, r in enumerate(self.ranges)] + [idle_value_and_grad]

    def device_fn(self):
        """The per-device program: switch on this device's block, then combine with psum."""
        branches = self.branches()

        def run(trainable, frozen, device_block, batch):
            index = device_block[0]
            loss, grads = jax.lax.switch(index, branches, trainable, frozen, batch)
            active = (index < len(self.sizes)).astype(jnp.float32)
            loss = jax.lax.psum(loss * active, AXIS) / jnp.maximum(jax.lax.psum(active, AXIS), 1.0)
            return loss, jax.lax.psum(grads, AXIS)

        return run

    def _mapped(self):
        return jax.shard_map(self.device_fn(), mesh=self.mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                             out_specs=(P(), P()), check_vma=False)

    def loss_and_grads(self):
        """jit(fn(trainable, frozen, device_block (N,), batch (N*b, ...))) -> (loss, combined grads)."""
        return jax.jit(self._mapped())

    def train_step(self, optimizer, params_like):
        """jit(fn(state, frozen, device_block, batch) -> (state, {"loss"})): one round, server update included.

        `state` is donated. The combined gradient updates every trainable leaf (every block has a
        device each round), through `masked_apply` as in the single-device step.
        """
        mapped = self._mapped()
        factors = layer_mask(params_like, self.spec, self.cfg.num_layers, self.cfg.num_layers)

        def step(state: TrainState, frozen, device_block, batch):
            loss, grads = mapped(state.trainable, frozen, device_block, batch)
            mask = jax.tree.map(lambda x: x is not None, state.trainable, is_leaf=lambda x: x is None)
            trainable_factors, _ = split(factors, mask)
            trainable, opt_state = masked_apply(optimizer, grads, state.opt_state, state.trainable, trainable_factors)
            return TrainState(trainable, opt_state, state.step + 1), {"loss": loss}

        return jax.jit(step, donate_argnums=0)

    def place(self, tree, spec=P()):
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def branch_flops(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, sizes, batch: int, seq_len: int,
                 assignment=None, num_devices: int | None = None) -> list[dict]:
    """Per-device work of one round: XLA's FLOPs of the branch each device takes, next to the cost model's.

    Each branch is compiled on its own for one device's batch (shapes only; scans unrolled, since
    XLA's cost analysis counts a loop body once). Idle devices take the empty branch: 0 FLOPs.
    """
    from ringjax.models.model import assemble, random_backbone
    from ringjax.plan.costs import step_costs

    K = len(sizes)
    num_devices = K if num_devices is None else num_devices
    assignment = tuple(range(K)) if assignment is None else tuple(assignment)
    params = jax.eval_shape(lambda k: assemble(cfg, random_backbone(cfg, k), head, spec, k), jax.random.key(0))
    trainable, frozen = split(params, leaf_mask(params, spec))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    data = {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
            "labels": jax.ShapeDtypeStruct((batch,), jnp.int32), "example_mask": jax.ShapeDtypeStruct((batch,), jnp.float32)}
    per_block = []
    for b, layers in enumerate(block_ranges(sizes)):
        fn = block_value_and_grad(cfg, spec, head, layers, b == K - 1, unroll=True)
        compiled = jax.jit(fn).lower(trainable, frozen, data).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        model = step_costs(cfg, spec, batch, seq_len, trained=layers, head_trains=b == K - 1, optimizer=False,
                           num_labels=head.outputs, first_only_top=False)
        per_block.append({"layers": [layers.start, layers.stop], "xla_flops": float(analysis.get("flops", 0.0)),
                          "model_flops": model.flops})
    rows = []
    blocks_of = device_blocks(assignment, num_devices)
    for device in range(num_devices):
        b = int(blocks_of[device])
        if b == K:
            rows.append({"device": device, "block": None, "layers": None, "xla_flops": 0.0, "model_flops": 0.0})
        else:
            rows.append({"device": device, "block": b, **per_block[b]})
    return rows


# ---------------------------------------------------------------------------------------------
# Allocation from a fleet
# ---------------------------------------------------------------------------------------------

def fleet_bandwidth(path) -> float | None:
    """Optional top-level `bandwidth_hz` (number or text like '10MHz') of a fleet file."""
    import yaml

    from ringjax.plan.profiles import parse_number

    data = yaml.safe_load(Path(path).read_text()) or {}
    value = data.get("bandwidth_hz") if isinstance(data, dict) else None
    if value is None:
        return None
    if isinstance(value, str) and value.lower().endswith("hz"):
        value = value[:-2].strip()
    return parse_number(value, f"{path}: bandwidth_hz")


def allocation_problem(cfg, spec, head: HeadConfig, profiles, sizes, batch: int, seq_len: int,
                       bandwidth_hz: float, efficiency: float = 1.0, dtype: str = "fp32"):
    """The DEFT solver's inputs from the cost model: per-block training FLOPs (forward through the
    whole model, backward down to the block), per-block peak memory, and the block's upload bits."""
    from ringjax.plan.allocation import deft_problem
    from ringjax.plan.costs import step_costs

    K = len(sizes)
    flops, memory, bits = [], [], []
    for b, layers in enumerate(block_ranges(sizes)):
        cost = step_costs(cfg, spec, batch, seq_len, trained=layers, head_trains=b == K - 1, optimizer=False,
                          num_labels=head.outputs, first_only_top=False)
        flops.append(cost.flops)
        memory.append(cost.peak_bytes)
        bits.append(8.0 * cost.upload_bytes)
    return deft_problem(profiles, flops, memory, bits, bandwidth_hz, dtype=dtype, efficiency=efficiency)


def solve(problem, seed: int = 0) -> dict:
    """Optimal allocation plus the three baselines, as JSON-ready dicts."""
    from ringjax.plan.allocation import allocate, equal_bandwidth, greedy, random_assignment

    best = allocate(problem)
    baselines = {}
    for name, fn in (("random", lambda p: random_assignment(p, seed)), ("greedy", greedy),
                     ("equal_bandwidth", equal_bandwidth)):
        try:
            baselines[name] = fn(problem).round_latency
        except RingjaxError as error:  # e.g. greedy stranding a block
            baselines[name] = None
            baselines[f"{name}_error"] = str(error)
    return {**best.to_dict(), "baselines": baselines}


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

def _subset(encoded, indices):
    """The examples `indices` of an `Encoded`, as a new `Encoded`."""
    from ringjax.data.tokenize import Encoded

    lengths = encoded.lengths[indices]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(encoded.offsets.dtype)
    take = np.concatenate([np.arange(encoded.offsets[i], encoded.offsets[i + 1]) for i in indices]) if len(indices) \
        else np.zeros(0, np.int64)
    return Encoded(encoded.input_ids[take], encoded.token_type_ids[take], offsets, encoded.labels[indices],
                   encoded.max_length, encoded.pad_id)


def stack_batches(batches: list[dict], pad_id: int) -> dict:
    """Device batches padded to their common width and stacked along the batch axis (device-major)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in DATA_KEYS:
        parts = []
        for b in batches:
            x = b[key]
            if x.ndim == 2 and x.shape[1] < width:
                fill = pad_id if key == "input_ids" else 0
                x = np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)
            parts.append(x)
        out[key] = np.concatenate(parts)
    return out


class Plan(NamedTuple):
    sizes: tuple[int, ...]
    assignment: tuple[int, ...] | None  # fixed by the allocation; None: round-robin per round
    allocation: dict


def plan_round(run, profiles, num_devices: int, num_blocks: int, bandwidth_hz: float | None) -> Plan:
    m = run.model
    sizes = block_sizes(m.config.num_layers, num_blocks)
    if profiles is None:
        return Plan(sizes, None, {"policy": "round-robin", "rule": "round r: block b on device (b + r) mod N"})
    problem = allocation_problem(m.config, m.peft_config, m.head_config, profiles, sizes, run.config.batch_size,
                                 run.config.max_length, bandwidth_hz or DEFAULT_BANDWIDTH_HZ)
    result = json.loads(json.dumps(solve(problem, run.config.seed)))  # JSON-ready: lists, not tuples
    return Plan(sizes, tuple(result["assignment"]), {"policy": "optimal", **result, "inputs": problem.to_dict()})


def train_deft(run, fleet=None, blocks: int | None = None) -> dict:
    """DEFT over the `device` mesh, for `ringjax train --method deft --devices N [--fleet F] [--blocks K]`.

    `fleet` (a fleet-file path or profiles; default `run.config.fleet`) drives the allocation,
    computed once since the costs do not change between rounds; without one, blocks rotate
    round-robin. `--batch-size` is each device's local batch per round; every device samples
    from its own IID shard of the training set. Steps are rounds. No checkpoints are written.
    Returns the summary (also written to OUT/summary.json) with the allocation."""
    from ringjax.data import BatchStream, partition
    from ringjax.peft.export import save_trainable
    from ringjax.plan.profiles import DeviceProfile, load_fleet
    from ringjax.train.optim import make_optimizer
    from ringjax.train.step import make_eval_step
    from ringjax.train.trainer import MetricsLog, evaluate, optim_config, write_summary

    c, m = run.config, run.model
    check_method(m.peft_config)
    if c.resume:
        raise RingjaxError("DEFT runs do not resume from checkpoints yet: start a fresh run (without --resume)")
    fleet = c.fleet if fleet is None else fleet
    profiles, bandwidth = None, None
    if fleet is not None:
        if isinstance(fleet, (str, Path)):
            profiles, bandwidth = load_fleet(fleet), fleet_bandwidth(fleet)
        else:
            profiles = tuple(fleet)
            if not all(isinstance(p, DeviceProfile) for p in profiles):
                raise RingjaxError("fleet must be a fleet-file path or a list of DeviceProfile")
    N = c.devices
    if profiles is not None:
        if N == 1:
            N = len(profiles)
        elif N != len(profiles):
            raise RingjaxError(f"--devices {N} but the fleet lists {len(profiles)} devices: make them agree "
                               f"(or leave out --devices)")
    K = blocks or c.blocks or min(N, m.config.num_layers)
    if K > N:
        raise RingjaxError(f"--blocks {K} but only {N} devices: DEFT gives every block its own device; "
                           f"use at most {N} blocks")
    plan = plan_round(run, profiles, N, K, bandwidth)
    mesh = make_mesh(N)
    deft = DeftStep(m.config, m.peft_config, m.head_config, plan.sizes, mesh)

    params = m.tree()
    mask = leaf_mask(params, m.peft_config)
    trainable, frozen = split(params, mask)
    total = run.total_steps()
    optimizer = make_optimizer(optim_config(c), total)
    state = deft.place(init_state(optimizer, trainable))
    frozen = deft.place(frozen)
    step_fn = deft.train_step(optimizer, params)
    eval_step = make_eval_step(m.config, m.peft_config, m.head_config)
    shards = partition(run.train.labels, N, alpha=None, seed=c.seed)
    streams = [BatchStream(_subset(run.train, idx), c.batch_size, seed=c.seed + 1000 * i)
               for i, idx in enumerate(shards)]
    iters = [s.batches() for s in streams]
    log = MetricsLog(run.out / "metrics.jsonl")
    data_sharding = NamedSharding(mesh, P(AXIS))
    loss = None
    began = time.perf_counter()
    for r in range(1, total + 1):
        assignment = plan.assignment or round_robin(K, N, r - 1)
        device_block = jax.device_put(device_blocks(assignment, N), data_sharding)
        batch = stack_batches([next(it) for it in iters], run.train.pad_id)
        batch = {k: jax.device_put(v, data_sharding) for k, v in batch.items()}
        state, metrics = step_fn(state, frozen, device_block, batch)
        loss = float(metrics["loss"])
        log.write({"step": r, "loss": loss, "assignment": list(assignment)})
        if c.progress and (r % 10 == 0 or r == total):
            print(f"deft round {r}/{total} loss {loss:.4f}", flush=True)
        if c.eval_every and r % c.eval_every == 0 and r < total:
            log.write({"step": r, "dev": evaluate(run, jax.device_get(merge(state.trainable, frozen)), eval_step)})
    train_seconds = time.perf_counter() - began
    final_params = jax.device_get(merge(state.trainable, frozen))
    dev = evaluate(run, final_params, eval_step)
    log.write({"step": total, "dev": dev})
    save_trainable(run.out, final_params, mask, m.config, m.peft_config, m.head_config)
    factors = layer_mask(params, m.peft_config, m.config.num_layers, m.config.num_layers)
    return write_summary(run, {
        "method": "deft", "task": c.task, "model": c.model, "adapter": c.adapter,
        "dev_metric": dev[run.task.metric], "dev_metric_name": run.task.metric, "dev": dev,
        "train_seconds": train_seconds, "steps": total, "rounds": total, "devices": N, "blocks": K,
        "block_layers": [[r.start, r.stop] for r in block_ranges(plan.sizes)],
        "batch_per_device": c.batch_size, "trainable_params": count(params, factors),
        "final_loss": loss, "allocation": plan.allocation,
    })
