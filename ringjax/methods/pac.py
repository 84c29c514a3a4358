"""PAC: parallel adapters, an activation cache, and pipeline-then-data parallelism.

The trainable part is the side network (`ringjax.peft.parallel`) plus the task head; the
backbone is frozen and only ever runs forward. So:

- epoch 1 runs the backbone forward, pipelined over the devices of a `stage` mesh axis
  (GPipe, forward only: `RingForward`) or jitted on one device (`make_taps_fn`). The taps it
  produces train the side network at once *and* fill the activation cache
  (`ringjax.methods.activation_cache`), padding dropped, in float32 / bfloat16 / float16;
- every later epoch rebuilds padded batches from the cache (same batch plan, attention mask
  from the cached lengths) and trains the side network with pure data parallelism over all
  devices: `shard_map` over a `data` axis, local gradients all-reduced with `psum`. There is
  no backbone compute after epoch 1: the cached steps never receive the backbone weights.

`train_pac` is the loop the CLI wraps; `bench_pac` measures it next to full fine-tuning and
Houlsby adapters. Taps travel in a (B, T, K, H) layout (K = stored taps), the cache's
per-token row layout, which the side network reads directly (`tap_axis=2`).

Not covered: the 'lm' head (PAC here trains classification / regression heads).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringjax.data.batching import BatchStream, default_buckets
from ringjax.errors import RingjaxError
from ringjax.methods import activation_cache as ac
from ringjax.models import backbone
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, apply_head, example_losses, predictions
from ringjax.models.layers import attention_bias
from ringjax.peft import parallel
from ringjax.peft.config import PeftConfig
from ringjax.train.step import TrainState, init_state

STAGE, DATA = "stage", "data"


# ----------------------------------------------------------------------------- parameters and taps


def split_params(params: dict) -> tuple[dict, dict]:
    """(trainable {head, peft: {side}}, frozen backbone {embed, blocks, final})."""
    if "side" not in params.get("peft", {}):
        raise RingjaxError("PAC needs a model built with peft='parallel' (a side network in params['peft']['side'])")
    trainable = {"head": params["head"], "peft": {"side": params["peft"]["side"]}}
    frozen = {k: v for k, v in params.items() if k not in ("head", "peft")}
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, "head": trainable["head"], "peft": trainable["peft"]}


def stored_taps(spec: PeftConfig, num_layers: int) -> tuple[int, ...]:
    """Tap indices the cache holds: what the side network reads, plus the last block (h_final)."""
    return tuple(sorted(set(parallel.tap_indices(spec, num_layers)) | {num_layers}))


def _side_positions(spec: PeftConfig, num_layers: int) -> np.ndarray:
    stored = stored_taps(spec, num_layers)
    return np.asarray([stored.index(t) for t in parallel.tap_indices(spec, num_layers)])


def _check_head(head: HeadConfig) -> None:
    if head.kind == "lm":
        raise RingjaxError("PAC trains classification or regression heads; the 'lm' head is not supported")


def logits_from_taps(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, trainable, final, taps, attention_mask):
    """Head logits from stored taps (B, T, K, H) in `stored_taps` order: no backbone weights involved."""
    h_final = backbone.arch(cfg).final(cfg, final, taps[:, :, -1].astype(jnp.float32))
    positions = _side_positions(spec, cfg.num_layers)
    if len(positions) != taps.shape[2]:
        taps = jnp.take(taps, jnp.asarray(positions), axis=2)
    h = parallel.side_output(spec, trainable["peft"]["side"], taps, h_final, attention_mask, cfg.causal, tap_axis=2)
    return apply_head(cfg, head, trainable["head"], h, attention_mask, {})


def live_logits(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, trainable, frozen, batch):
    """The same logits with the backbone run live (the reference the cached path must equal)."""
    h, taps = backbone.encode(cfg, spec, frozen, batch, depth=0, keep_taps=True)
    taps = jax.lax.stop_gradient(taps)
    h = parallel.side_output(spec, trainable["peft"]["side"], taps, jax.lax.stop_gradient(h), batch["attention_mask"], cfg.causal)
    return apply_head(cfg, head, trainable["head"], h, batch["attention_mask"], {})


def _mean_loss(head, logits, batch, count):
    w = batch["example_mask"]
    return (example_losses(head, logits, batch["labels"]) * w).sum() / jnp.maximum(count, 1.0)


def live_loss(cfg, spec, head, trainable, frozen, batch):
    return _mean_loss(head, live_logits(cfg, spec, head, trainable, frozen, batch), batch, batch["example_mask"].sum())


def cached_loss(cfg, spec, head, trainable, final, batch):
    """batch: taps (B, T, K, H), attention_mask, labels, example_mask."""
    logits = logits_from_taps(cfg, spec, head, trainable, final, batch["taps"], batch["attention_mask"])
    return _mean_loss(head, logits, batch, batch["example_mask"].sum())


@functools.lru_cache(maxsize=8)
def make_taps_fn(cfg: ModelConfig, spec: PeftConfig, dtype="float32"):
    """Single-device jitted backbone forward: (frozen, token batch) -> taps (B, T, K, H) in `dtype`."""
    ids = np.asarray(stored_taps(spec, cfg.num_layers))
    out_dtype = ac.DTYPES[ac.dtype_name(dtype)]

    def taps_fn(frozen, batch):
        _, taps = backbone.encode(cfg, spec, frozen, batch, depth=0, keep_taps=True)
        return jnp.moveaxis(taps[ids], 0, 2).astype(out_dtype)

    return jax.jit(taps_fn)


# ----------------------------------------------------------------------------- the forward-only ring pipeline


def stage_sizes(num_layers: int, n_stages: int) -> tuple[int, ...]:
    """Contiguous, as even as possible, extra layers to the first stages (6 over 4: 2, 2, 1, 1)."""
    base, extra = divmod(num_layers, n_stages)
    return tuple(base + (s < extra) for s in range(n_stages))


class RingForward:
    """Backbone forward pipelined over a `stage` mesh axis (GPipe fill/drain, forward only).

    Stage s holds blocks [start_s, start_s + sizes[s]) (uneven sizes allowed); every stage
    holds the frozen embedding. A global batch is split into M microbatches; at tick t stage s
    works on microbatch t - s, receiving its input from stage s - 1 by `ppermute`. Bubble
    ticks and the padding layers of short stages are skipped with `lax.cond` on the stage
    index, so they cost no compute. Each stage keeps its own blocks' outputs (the taps) for
    every microbatch; the caller gets all stored taps as (B, T, K, H) in the cache dtype.

    Forward only: no residuals are kept for a backward pass, which PAC never runs. Unify with
    `ringjax.parallel`'s ring engine once its forward path exists.
    """

    def __init__(self, cfg: ModelConfig, spec: PeftConfig, frozen: dict, devices, microbatches: int | None = None,
                 sizes: tuple[int, ...] | None = None, dtype="float32"):
        self.cfg, self.spec = cfg, spec
        n = len(devices)
        self.sizes = tuple(sizes) if sizes is not None else stage_sizes(cfg.num_layers, n)
        if len(self.sizes) != n or sum(self.sizes) != cfg.num_layers or min(self.sizes) < 0:
            raise RingjaxError(f"stage sizes {self.sizes} must be {n} counts summing to {cfg.num_layers} layers")
        self.microbatches = microbatches or n
        self.mesh = jax.sharding.Mesh(np.asarray(devices), (STAGE,))
        self.out_dtype = ac.DTYPES[ac.dtype_name(dtype)]
        self.ids = stored_taps(spec, cfg.num_layers)
        lmax = max(max(self.sizes), 1)
        starts = np.concatenate([[0], np.cumsum(self.sizes)])[:-1]
        # stage-stacked blocks (N, lmax, ...): padding slots repeat a real layer and are never run
        layer_of = np.array([[min(starts[s] + min(j, max(self.sizes[s] - 1, 0)), cfg.num_layers - 1)
                              for j in range(lmax)] for s in range(n)])
        staged = jax.tree.map(lambda x: np.asarray(x)[layer_of], frozen["blocks"])
        rep, by_stage = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(STAGE))
        self.embed = jax.block_until_ready(jax.device_put(frozen["embed"], rep))
        self.staged = jax.block_until_ready(jax.device_put(staged, by_stage))
        self._rep = rep
        self._fn = _ring_program(cfg, spec, self.sizes, self.microbatches, ac.dtype_name(dtype), self.mesh)

    def __call__(self, batch: dict) -> jax.Array:
        b = batch["input_ids"].shape[0]
        if b % self.microbatches:
            raise RingjaxError(f"batch size {b} does not split into {self.microbatches} microbatches")
        keys = ("input_ids", "attention_mask", "token_type_ids")
        tokens = jax.block_until_ready(jax.device_put({k: np.asarray(batch[k]) for k in keys if k in batch}, self._rep))
        return self._fn(self.embed, self.staged, tokens)


@functools.lru_cache(maxsize=8)
def _ring_program(cfg: ModelConfig, spec: PeftConfig, sizes: tuple[int, ...], m: int, dtype: str, mesh):
    """The jitted pipeline for one (model, stage sizes, microbatches, dtype, mesh): params are arguments."""
    n = len(sizes)
    block = backbone.arch(cfg).block
    sizes_arr = np.asarray(sizes)
    out_dtype = ac.DTYPES[dtype]
    forward_perm = [(i, i + 1) for i in range(n - 1)]
    ids = stored_taps(spec, cfg.num_layers)
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    where = {int(starts[s] + j + 1): (s, j) for s in range(n) for j in range(sizes[s])}

    def per_stage(embed, staged, batch):
        s = jax.lax.axis_index(STAGE)
        size = jnp.asarray(sizes_arr)[s]
        blocks = jax.tree.map(lambda x: x[0], staged)  # (lmax, ...)
        h0 = backbone.arch(cfg).embed(cfg, embed, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        b, t, hidden = h0.shape
        mb = b // m
        h0 = h0.reshape(m, mb, t, hidden)
        bias = attention_bias(batch["attention_mask"], cfg.causal)
        bias = bias.reshape(m, mb, *bias.shape[1:])
        lmax = jax.tree.leaves(blocks)[0].shape[0]

        def run_stage(x, bias_m):
            def layer(h, item):
                j, p = item
                h = jax.lax.cond(j < size, lambda h: block(cfg, p, h, bias_m, {}, spec), lambda h: h, h)
                return h, h.astype(out_dtype)

            return jax.lax.scan(layer, x, (jnp.arange(lmax), blocks))

        def tick(carry, step):
            recv, buf = carry
            mi = step - s
            active = (mi >= 0) & (mi < m)
            mc = jnp.clip(mi, 0, m - 1)
            x = jnp.where(s == 0, h0[mc], recv)

            def work(x, buf):
                h, ys = run_stage(x, bias[mc])
                return h, jax.lax.dynamic_update_index_in_dim(buf, ys, mc, 0)

            h, buf = jax.lax.cond(active, work, lambda x, buf: (x, buf), x, buf)
            return (jax.lax.ppermute(h, STAGE, forward_perm), buf), None

        buf = jnp.zeros((m, lmax, mb, t, hidden), out_dtype)
        recv = jnp.zeros((mb, t, hidden), h0.dtype)
        recv, buf = jax.lax.pcast((recv, buf), STAGE, to="varying")
        (_, buf), _ = jax.lax.scan(tick, (recv, buf), jnp.arange(m + n - 1))
        return h0.reshape(b, t, hidden).astype(out_dtype), buf[None]

    mapped = jax.shard_map(per_stage, mesh=mesh, in_specs=(P(), P(STAGE), P()), out_specs=(P(), P(STAGE)))

    def run(embed, staged, batch):
        h0, bufs = mapped(embed, staged, batch)  # h0 (B, T, H); bufs (N, M, lmax, mb, T, H)
        _, m_, _, mb, t, hidden = bufs.shape
        stacks = []
        for tap in ids:
            if tap == 0:
                stacks.append(h0)
            else:
                s, j = where[tap]
                stacks.append(bufs[s, :, j].reshape(m_ * mb, t, hidden))
        return jnp.stack(stacks, axis=2)  # (B, T, K, H)

    return jax.jit(run)


# ----------------------------------------------------------------------------- data-parallel side-network step


def data_mesh(devices) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(devices), (DATA,))


def make_side_step(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, optimizer, mesh=None):
    """Jitted step (state, final, batch) -> (state, loss) on cached taps.

    The loss is the weighted mean over real rows (`example_mask`). With a mesh (axis `data`):
    `shard_map`, each device takes B / N rows and differentiates its local sum(loss * w); one
    `psum` all-reduces (loss sum, gradient sums, real-row count) and both are divided by the
    global count, so the step equals the single-device one whatever rows each shard holds.
    The parameters are cast to device-varying before differentiation, so that psum is the
    explicit all-reduce (otherwise shard_map's autodiff inserts an implicit one and a second
    psum would scale the gradients by N). The optimizer update then runs replicated.
    Without a mesh: the same computation on one device.
    """
    _check_head(head)

    def step(state: TrainState, final, batch, axis=None):
        w = batch["example_mask"]

        def loss_sum(trainable):
            logits = logits_from_taps(cfg, spec, head, trainable, final, batch["taps"], batch["attention_mask"])
            return (example_losses(head, logits, batch["labels"]) * w).sum()

        trainable = state.trainable if axis is None else jax.lax.pcast(state.trainable, axis, to="varying")
        total, grads = jax.value_and_grad(loss_sum)(trainable)
        count = w.sum()
        if axis is not None:  # one all-reduce of (loss sum, gradient sums, real-row count)
            total, grads, count = jax.lax.psum((total, grads, count), axis)
        count = jnp.maximum(count, 1.0)
        loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        return TrainState(optax.apply_updates(state.trainable, updates), opt_state, state.step + 1), loss

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    mapped = jax.shard_map(
        lambda state, final, batch: step(state, final, batch, DATA),
        mesh=mesh, in_specs=(P(), P(), P(DATA)), out_specs=(P(), P()),
    )
    return jax.jit(mapped, donate_argnums=0)


def make_side_eval(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, mesh=None):
    """Jitted (trainable, final, batch) -> (predictions, per-example losses) on cached taps."""
    _check_head(head)

    def evaluate(trainable, final, batch):
        logits = logits_from_taps(cfg, spec, head, trainable, final, batch["taps"], batch["attention_mask"])
        return predictions(head, logits), example_losses(head, logits, batch["labels"])

    if mesh is None:
        return jax.jit(evaluate)
    return jax.jit(jax.shard_map(evaluate, mesh=mesh, in_specs=(P(), P(), P(DATA)), out_specs=(P(DATA), P(DATA))))


@functools.lru_cache(maxsize=8)
def _cached_side_fns(cfg, spec, head, optimizer, mesh):
    return make_side_step(cfg, spec, head, optimizer, mesh), make_side_eval(cfg, spec, head, mesh)


def _side_fns(cfg, spec, head, optimizer, mesh):
    """Jitted step and eval, shared by calls with the same (hashable) optimizer: no recompiles."""
    try:
        return _cached_side_fns(cfg, spec, head, optimizer, mesh)
    except TypeError:  # an unhashable optimizer
        return make_side_step(cfg, spec, head, optimizer, mesh), make_side_eval(cfg, spec, head, mesh)


# ----------------------------------------------------------------------------- batches


def token_batch(encoded, indices, width: int, batch_size: int) -> dict:
    """A padded token batch of `indices` (padding rows repeat the first and carry index -1)."""
    indices = np.asarray(indices, np.int64)
    real = len(indices)
    rows = np.concatenate([indices, np.full(batch_size - real, indices[0])])
    lengths = np.minimum(np.diff(encoded.offsets)[rows], width)
    columns = np.arange(width)
    mask = columns[None, :] < lengths[:, None]
    pos = np.where(mask, encoded.offsets[rows][:, None] + columns[None, :], 0)
    real_rows = np.arange(batch_size) < real
    return {
        "input_ids": np.where(mask, encoded.input_ids[pos], encoded.pad_id).astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "token_type_ids": np.where(mask, encoded.token_type_ids[pos], 0).astype(np.int32),
        "labels": encoded.labels[rows],
        "example_mask": real_rows.astype(np.float32),
        "index": np.where(real_rows, rows, -1).astype(np.int32),
    }


def cached_batch(cache: ac.ActivationCache, batch: dict) -> dict:
    """Rebuild the side-network batch of a token batch's rows from the cache (no token ids needed)."""
    index = batch["index"]
    first = index[index >= 0][0] if (index >= 0).any() else 0
    rows = np.where(index >= 0, index, first)  # padding rows repeat the first real row, as BatchStream's
    width = batch["attention_mask"].shape[1]
    taps, lengths = cache.gather(rows, width)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    return {"taps": taps, "attention_mask": mask, "labels": batch["labels"], "example_mask": batch["example_mask"]}


def cached_epoch(cache: ac.ActivationCache, encoded, stream: BatchStream, epoch: int) -> Iterator[dict]:
    """Epoch `epoch`'s side-network batches straight from the cache.

    Same plan (rows, order, bucket widths) as `stream.epoch(epoch)`, without assembling the
    token ids that a cached epoch never needs.
    """
    lengths = np.minimum(np.diff(encoded.offsets), stream.buckets[-1])
    labels = np.asarray(encoded.labels)
    for rows in stream.epoch_plan(epoch):
        width = _width(lengths, rows, stream.buckets)
        taps, got = cache.gather(rows, width)
        real = np.arange(stream.batch_size) < len(rows)
        if not real.all():  # a last partial batch (drop_last=False): repeat a row, weight 0
            pad = stream.batch_size - len(rows)
            taps = np.concatenate([taps, np.repeat(taps[:1], pad, 0)])
            got = np.concatenate([got, np.repeat(got[:1], pad)])
            rows = np.concatenate([rows, np.repeat(rows[:1], pad)])
        yield {
            "taps": taps,
            "attention_mask": (np.arange(width)[None, :] < got[:, None]).astype(np.int32),
            "labels": labels[rows],
            "example_mask": real.astype(np.float32),
        }


IN_FLIGHT = 2  # steps the host dispatches ahead of the devices


def _bound_in_flight(results: list) -> None:
    """Wait for the result IN_FLIGHT dispatches back. XLA:CPU can deadlock the collectives of a
    multi-device program when hundreds of its executions are queued (seen: a 250-step cached
    epoch over 4 emulated devices hung in an all-reduce); two in flight keep the overlap."""
    if len(results) > IN_FLIGHT:
        jax.block_until_ready(results[-IN_FLIGHT - 1])


def _side_batch(taps, batch) -> dict:
    return {"taps": taps, "attention_mask": batch["attention_mask"], "labels": batch["labels"],
            "example_mask": batch["example_mask"]}


def _eval_plan(n: int, lengths: np.ndarray, batch_size: int, buckets) -> list[np.ndarray]:
    """Every example once, grouped by bucket (few shapes), unshuffled."""
    bucket_of = np.searchsorted(buckets, np.minimum(lengths, buckets[-1]))
    plan = []
    for b in range(len(buckets)):
        members = np.flatnonzero(bucket_of == b)
        plan.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return plan


def _width(lengths, indices, buckets) -> int:
    return int(buckets[int(np.searchsorted(buckets, min(int(lengths[indices].max()), buckets[-1])))])


# ----------------------------------------------------------------------------- the training loop


class PacResult(NamedTuple):
    trainable: dict  # {head, peft: {side}}
    summary: dict  # epoch_seconds, train_seconds, dev metrics per epoch, cache bytes, ...


def cache_material(cfg: ModelConfig, spec: PeftConfig, frozen: dict, encoded, dtype, split: str, max_width: int,
                   identity: dict | None = None) -> tuple[str, dict]:
    """Cache key over everything the taps depend on.

    identity may add {"model": ac.model_identity(dir), "tokenizer": ac.tokenizer_identity(tok)};
    weights are hashed by content regardless, data by its token ids.
    """
    fields = {
        "what": "pac-taps",
        "split": split,
        "config": dataclasses.asdict(cfg),
        "weights": ac.weights_identity(frozen),
        "data": ac.data_identity(encoded.input_ids, encoded.token_type_ids, encoded.offsets),
        "max_length": int(encoded.max_length),
        "max_width": int(max_width),
        "taps": list(stored_taps(spec, cfg.num_layers)),
        "dtype": ac.dtype_name(dtype),
        **(identity or {}),
    }
    return ac.cache_key(**fields)


def _put(tree, sharding):
    """Place a host batch and wait for the copies to land before any step uses it.

    Waiting matters with emulated CPU devices: XLA:CPU runs host-to-device copies on the same
    worker pool as the devices' programs, and a collective step dispatched before its inputs
    have landed can leave some devices blocked in the all-reduce while another device's
    input copy waits for a free worker (seen here as a rare hang / 40 s rendezvous abort on
    2 shared cores with 4 devices). The copies are plain memcpys, so waiting costs little.
    """
    return jax.block_until_ready(jax.device_put(tree, sharding)) if sharding is not None else tree


def train_pac(
    cfg: ModelConfig,
    spec: PeftConfig,
    head: HeadConfig,
    params: dict,
    train,
    dev,
    n_devices: int,
    epochs: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    cache_dir=None,
    dtype="float32",
    *,
    seed: int = 0,
    buckets: tuple[int, ...] | None = None,
    microbatches: int | None = None,
    pipeline: bool = True,
    identity: dict | None = None,
    warmup: bool = True,
    metric: Callable | None = None,
    log: Callable[[dict], None] | None = None,
    devices=None,
    on_step: Callable[[], None] | None = None,
) -> PacResult:
    """Train PAC: epoch 1 from the live backbone (ring-pipelined forward), later epochs from the cache.

    train / dev: tokenised data as `ringjax.data.Encoded` (flat input_ids, token_type_ids,
    offsets, labels, max_length, pad_id); dev may be None. n_devices: devices of the ring and of
    the data-parallel axis (1: everything jitted on one device). optimizer: any optax
    transformation (its schedule should span epochs * steps_per_epoch steps). cache_dir: where
    the memory-mapped cache lives (None: host RAM, rebuilt every run). dtype: cache dtype
    (float32 / bfloat16 / float16; bf16 taps are what the side network sees in every epoch).
    A complete cache for the same key is reused, so a rerun skips the backbone entirely.
    metric(predictions, labels) -> dict scores dev (default: accuracy, or pearson for regression).
    log(record) is called after each epoch; on_step() after each training step (progress bars).
    Returns PacResult(trainable, summary) with summary["epoch_seconds"] and ["cache_bytes"].
    """
    _check_head(head)
    if epochs < 1:
        raise RingjaxError(f"epochs must be at least 1, got {epochs}")
    devices = list(devices if devices is not None else jax.devices()[:n_devices])
    if len(devices) < n_devices:
        raise RingjaxError(
            f"{n_devices} devices requested but JAX sees {len(jax.devices())}; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n_devices} before JAX starts"
        )
    if batch_size % n_devices:
        raise RingjaxError(f"batch size {batch_size} must divide over {n_devices} devices")
    buckets = tuple(buckets or default_buckets(train.max_length))
    dtype = ac.dtype_name(dtype)
    metric = metric or _default_metric(head)
    trainable, frozen = split_params(params)
    final = frozen["final"]

    # --- the cached step runs data-parallel over every device
    mesh = data_mesh(devices) if n_devices > 1 else None
    by_row = NamedSharding(mesh, P(DATA)) if mesh is not None else devices[0]
    rep = NamedSharding(mesh, P()) if mesh is not None else None
    step_fn, eval_fn = _side_fns(cfg, spec, head, optimizer, mesh)
    # fresh buffers: the step donates its state, and the caller's params must survive
    home = rep if rep is not None else devices[0]  # committed everywhere, so no step recompiles
    state = jax.block_until_ready(jax.device_put(init_state(optimizer, jax.device_get(trainable)), home))
    final_dev = jax.block_until_ready(jax.device_put(final, home))

    # --- epoch 1's backbone: ring pipeline over the same devices, or one jitted device
    if pipeline and n_devices > 1:
        mb = microbatches or n_devices
        if batch_size % mb:
            raise RingjaxError(f"batch size {batch_size} does not split into {mb} microbatches")
        ring = RingForward(cfg, spec, frozen, devices, mb, dtype=dtype)
        forward = ring
        forward_kind = f"ring pipeline, {n_devices} stages {ring.sizes}, {mb} microbatches"
    else:
        taps_fn = make_taps_fn(cfg, spec, dtype)
        frozen_dev = jax.block_until_ready(jax.device_put(frozen, devices[0]))
        forward = lambda batch: taps_fn(frozen_dev, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
        forward_kind = "single device"

    # --- caches: reuse a complete one, else build during epoch 1
    def open_or_build(encoded, split):
        key, material = cache_material(cfg, spec, frozen, encoded, dtype, split, buckets[-1], identity)
        cache = ac.ActivationCache.open(cache_dir, key) if cache_dir is not None else None
        if cache is not None:
            return cache, None
        lengths = np.minimum(np.diff(encoded.offsets), buckets[-1])
        try:
            return None, ac.CacheBuilder(cache_dir, key, material, lengths, len(stored_taps(spec, cfg.num_layers)),
                                         cfg.hidden_size, dtype)
        except OSError as e:  # a file in the way, a read-only folder, a full disk: one line, not a traceback
            raise RingjaxError(f"cannot build the activation cache in {cache_dir} ({e.strerror or e}); "
                               "choose a writable --cache-dir") from None

    t_key = time.perf_counter()
    train_cache, train_builder = open_or_build(train, "train")
    dev_cache, dev_builder = (None, None) if dev is None else open_or_build(dev, "dev")
    key_seconds = time.perf_counter() - t_key
    stream = BatchStream(train, batch_size, seed=seed, buckets=buckets)

    compile_seconds = 0.0
    if warmup:
        t0 = time.perf_counter()
        state = _warm_up(cfg, head, forward, step_fn, eval_fn, state, final_dev, train, batch_size, buckets, dtype,
                         stored=len(stored_taps(spec, cfg.num_layers)), by_row=by_row,
                         need_forward=train_builder is not None or dev_builder is not None)
        compile_seconds = time.perf_counter() - t0

    history, epoch_seconds, train_seconds, epoch_cpu = [], [], [], []
    cache_hit = train_cache is not None
    try:
        for epoch in range(epochs):
            began, began_cpu = time.perf_counter(), time.process_time()
            losses = []
            live = train_cache is None
            if live:
                state, losses = _live_epoch(forward, step_fn, state, final_dev, stream, train, train_builder,
                                            batch_size, buckets, by_row, on_step)
                train_cache = train_builder.finish()
                train_builder = None
            else:
                for side in cached_epoch(train_cache, train, stream, epoch):
                    state, loss = step_fn(state, final_dev, _put(side, by_row))
                    losses.append(loss)
                    _bound_in_flight(losses)
                    if on_step is not None:
                        on_step()
            losses = np.asarray(jax.device_get(losses), np.float64)
            trained = time.perf_counter() - began
            record = {"epoch": epoch + 1, "source": "backbone" if live else "cache", "train_loss": float(losses.mean())}
            if dev is not None:
                if dev_cache is None:
                    dev_cache = _fill(forward, dev, dev_builder, batch_size, buckets)
                    dev_builder = None
                record["dev"] = _evaluate(eval_fn, state.trainable, final_dev, dev_cache, dev, batch_size, buckets,
                                          by_row, metric)
            jax.block_until_ready(state)
            epoch_seconds.append(time.perf_counter() - began)
            epoch_cpu.append(time.process_time() - began_cpu)
            train_seconds.append(trained)
            record["seconds"] = epoch_seconds[-1]
            record["cpu_seconds"] = epoch_cpu[-1]
            history.append(record)
            if log is not None:
                log(record)
    finally:
        for builder in (train_builder, dev_builder):
            if builder is not None:
                builder.abort()

    caches = [c for c in (train_cache, dev_cache) if c is not None]
    summary = {
        "method": "pac",
        "epochs": history,
        "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu,  # process CPU time: the work done, robust to a shared machine's load
        "train_seconds_per_epoch": train_seconds,
        "compile_seconds": compile_seconds,
        "key_seconds": key_seconds,
        "cache_bytes": int(sum(c.disk_bytes if c.path is not None else c.nbytes for c in caches)),
        "cache_tap_bytes": int(sum(c.nbytes for c in caches)),
        "cache_paths": [str(c.path) for c in caches if c.path is not None],
        "cache_dtype": dtype,
        "cache_hit": cache_hit,
        "epoch1_forward": forward_kind if not cache_hit else "none (cache hit)",
        "devices": n_devices,
        "steps_per_epoch": stream.steps_per_epoch,
    }
    if history and "dev" in history[-1]:
        summary["dev"] = history[-1]["dev"]
    return PacResult(jax.device_get(state.trainable), summary)


def _default_metric(head: HeadConfig):
    if head.kind == "regression":
        from ringjax.data.metrics import pearson

        return lambda p, y: {"pearson": pearson(p, y)}
    return lambda p, y: {"accuracy": float(np.mean(np.asarray(p) == np.asarray(y)))}


def _lookahead(iterable: Iterator, fn: Callable):
    """Yield (item, fn(item)) with fn of the next item dispatched before the current one is consumed."""
    it = iter(iterable)
    try:
        item = next(it)
    except StopIteration:
        return
    pending = (item, fn(item))
    for item in it:
        nxt = (item, fn(item))
        yield pending
        pending = nxt
    yield pending


def _live_epoch(forward, step_fn, state, final, stream, train, builder, batch_size, buckets, by_row, on_step=None):
    """Epoch 1: backbone taps train the side network and fill the cache (leftover rows too)."""
    losses = []
    for batch, taps in _lookahead(stream.epoch(0), forward):
        host = np.asarray(taps)  # waits for the forward; the next batch's forward is already queued
        state, loss = step_fn(state, final, _put(_side_batch(host, batch), by_row))
        builder.write(batch["index"], host)  # overlaps the step just dispatched
        losses.append(loss)
        _bound_in_flight(losses)
        if on_step is not None:
            on_step()
    _fill(forward, train, builder, batch_size, buckets, finish=False)  # rows the epoch's plan left out
    return state, losses


def _fill(forward, encoded, builder, batch_size, buckets, finish=True):
    """Run the backbone over every example not yet written, in bucketed batches, and store the taps."""
    missing = builder.missing()
    lengths = np.minimum(np.diff(encoded.offsets), buckets[-1])
    plan = [missing[c] for c in _eval_plan(len(missing), lengths[missing], batch_size, buckets)]
    batches = (token_batch(encoded, idx, _width(lengths, idx, buckets), batch_size) for idx in plan)
    for batch, taps in _lookahead(batches, forward):
        builder.write(batch["index"], np.asarray(taps))
    return builder.finish() if finish else None


def _evaluate(eval_fn, trainable, final, cache, encoded, batch_size, buckets, by_row, metric):
    lengths = np.minimum(np.diff(encoded.offsets), buckets[-1])
    preds = np.zeros(len(encoded), np.float32)
    loss_sum = 0.0
    indices, outs = [], []
    for idx in _eval_plan(len(encoded), lengths, batch_size, buckets):
        batch = token_batch(encoded, idx, _width(lengths, idx, buckets), batch_size)
        indices.append(batch["index"])
        outs.append(eval_fn(trainable, final, _put(cached_batch(cache, batch), by_row)))
        _bound_in_flight(outs)
    for index, (p, l) in zip(indices, outs):
        real = index >= 0
        preds[index[real]] = np.asarray(p)[real]
        loss_sum += float(np.asarray(l)[real].sum())
    labels = np.asarray(encoded.labels)
    if np.issubdtype(labels.dtype, np.integer):
        preds = preds.astype(labels.dtype)
    return {**metric(preds, labels), "loss": loss_sum / max(len(encoded), 1)}


def _warm_up(cfg, head, forward, step_fn, eval_fn, state, final, train, batch_size, buckets, dtype, stored, by_row,
             need_forward):
    """Compile every bucket shape of the forward, the step and the eval before any timing."""
    labels_dtype = np.asarray(train.labels).dtype
    throwaway = jax.tree.map(lambda x: x.copy(), state)
    for width in buckets:
        tokens = {
            "input_ids": np.zeros((batch_size, width), np.int32),
            "attention_mask": np.ones((batch_size, width), np.int32),
            "token_type_ids": np.zeros((batch_size, width), np.int32),
        }
        if need_forward:
            jax.block_until_ready(forward(tokens))
        side = {
            "taps": np.zeros((batch_size, width, stored, cfg.hidden_size), ac.DTYPES[dtype]),
            "attention_mask": tokens["attention_mask"],
            "labels": np.zeros((batch_size,), labels_dtype),
            "example_mask": np.zeros((batch_size,), np.float32),
        }
        side = _put(side, by_row)
        throwaway, _ = step_fn(throwaway, final, side)
        jax.block_until_ready(eval_fn(state.trainable, final, side))
    jax.block_until_ready(throwaway)
    return state


# ----------------------------------------------------------------------------- memory and bench


def memory_bytes(compiled) -> dict:
    """XLA's memory analysis of a compiled step.

    peak_bytes = temp + argument + output (the brief's definition: an upper bound, since
    donated outputs may reuse argument buffers); alias_bytes is that reuse, so
    peak_bytes - alias_bytes is the tighter figure.
    """
    m = compiled.memory_analysis()
    fields = {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    fields["peak_bytes"] = fields["temp_bytes"] + fields["argument_bytes"] + fields["output_bytes"]
    return fields


def step_memory(kind: str, cfg: ModelConfig, head: HeadConfig, params: dict, optimizer, batch_size: int, width: int,
                spec: PeftConfig | None = None, dtype="float32", mesh=None) -> dict:
    """Peak bytes of one training step: kind 'pac' (cached taps), or any PEFT preset via make_train_step."""
    from ringjax.peft import leaf_mask, split
    from ringjax.train.step import make_train_step

    tokens = {
        "input_ids": np.zeros((batch_size, width), np.int32),
        "attention_mask": np.ones((batch_size, width), np.int32),
        "token_type_ids": np.zeros((batch_size, width), np.int32),
        "labels": np.zeros((batch_size,), np.int32 if head.kind == "classification" else np.float32),
        "example_mask": np.ones((batch_size,), np.float32),
    }
    if kind == "pac":
        trainable, frozen = split_params(params)
        state = init_state(optimizer, trainable)
        k = len(stored_taps(spec, cfg.num_layers))
        batch = {
            "taps": np.zeros((batch_size, width, k, cfg.hidden_size), ac.DTYPES[ac.dtype_name(dtype)]),
            **{x: tokens[x] for x in ("attention_mask", "labels", "example_mask")},
        }
        step = make_side_step(cfg, spec, head, optimizer, mesh)
        if mesh is not None:
            rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))
            state, batch, final = jax.device_put(state, rep), jax.device_put(batch, rows), jax.device_put(frozen["final"], rep)
        else:
            final = frozen["final"]
        compiled = step.lower(state, final, batch).compile()
        return memory_bytes(compiled) | {"per_device": mesh is not None}
    spec = spec or _preset(kind)
    trainable, frozen = split(params, leaf_mask(params, spec))
    state = init_state(optimizer, trainable)
    step = make_train_step(cfg, spec, head, optimizer, params, cfg.num_layers if spec.kind != "top-t" else spec.top_t)
    return memory_bytes(step.lower(state, frozen, tokens).compile()) | {"per_device": False}


def _preset(name):
    from ringjax.peft import preset

    return preset(name)


def bench_pac(
    cfg: ModelConfig,
    head: HeadConfig,
    base: dict,
    train,
    dev,
    *,
    n_devices: int = 4,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 3e-3,
    baseline_lr: dict | None = None,
    cache_dir=None,
    dtype="bfloat16",
    seed: int = 0,
    memory_width: int | None = None,
    baselines: tuple[str, ...] = ("full", "houlsby"),
    baseline_epochs: int | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """PAC against full fine-tuning and Houlsby adapters on the same data, in one run.

    base: backbone params {embed, blocks, final}. Reports, per method, epoch seconds (after
    compilation, which is reported apart), dev metrics, and the training step's peak bytes
    from XLA's memory analysis at batch `batch_size` x `memory_width` tokens (default the data's
    max length): PAC's single-device cached step (and its per-device data-parallel step)
    against `make_train_step` for the baselines. `baseline_epochs` (default `epochs`) lets a
    bench time fewer baseline epochs; their per-epoch time does not change.
    """
    from ringjax.models.model import assemble
    from ringjax.peft import preset
    from ringjax.train.optim import OptimConfig, make_optimizer

    key = jax.random.key(seed)
    buckets = default_buckets(train.max_length)
    stream = BatchStream(train, batch_size, seed=seed, buckets=buckets)
    steps = stream.steps_per_epoch
    width = memory_width or train.max_length
    baseline_lr = {"full": 5e-5, "houlsby": 1e-3, **(baseline_lr or {})}
    out = {"n_devices": n_devices, "batch_size": batch_size, "train_examples": len(train),
           "dev_examples": 0 if dev is None else len(dev), "memory_tokens": [batch_size, width], "methods": {}}

    spec = preset("parallel")
    params = assemble(cfg, base, head, spec, key)
    optimizer = make_optimizer(OptimConfig(lr=lr), epochs * steps)
    result = train_pac(cfg, spec, head, params, train, dev, n_devices, epochs, batch_size, optimizer, cache_dir,
                       dtype, seed=seed, buckets=buckets, log=log)
    mesh = data_mesh(jax.devices()[:n_devices]) if n_devices > 1 else None
    pac = {
        **{k: result.summary[k] for k in ("epoch_seconds", "train_seconds_per_epoch", "compile_seconds", "cache_bytes",
                                            "cache_dtype", "epoch1_forward")},
        "dev": result.summary.get("dev"),
        "total_seconds": float(sum(result.summary["epoch_seconds"])),
        "memory": step_memory("pac", cfg, head, params, optimizer, batch_size, width, spec, dtype),
    }
    if mesh is not None:
        pac["memory_data_parallel"] = step_memory("pac", cfg, head, params, optimizer, batch_size, width, spec, dtype,
                                                   mesh)
    out["methods"]["pac"] = pac
    for name in baselines:
        bspec = preset(name)
        bparams = assemble(cfg, base, head, bspec, key)
        b_epochs = baseline_epochs or epochs
        boptim = make_optimizer(OptimConfig(lr=baseline_lr.get(name, lr)), epochs * steps)
        entry = train_baseline(cfg, bspec, head, bparams, train, dev, b_epochs, batch_size, boptim, seed=seed,
                               buckets=buckets, log=log)
        entry["memory"] = step_memory(name, cfg, head, bparams, boptim, batch_size, width, bspec)
        out["methods"][name] = entry
    full = out["methods"].get("full")
    hou = out["methods"].get("houlsby")
    secs = pac["epoch_seconds"]
    out["ratios"] = {
        "epoch2_over_epoch1": secs[1] / secs[0] if len(secs) > 1 else None,
        "pac_over_full_peak_bytes": pac["memory"]["peak_bytes"] / full["memory"]["peak_bytes"] if full else None,
        "houlsby_over_pac_total_seconds": (
            np.mean(hou["epoch_seconds"]) * epochs / pac["total_seconds"] if hou else None
        ),
    }
    return out


def train_baseline(cfg, spec, head, params, train, dev, epochs, batch_size, optimizer, *, seed=0, buckets=None,
                   warmup=True, log=None) -> dict:
    """Single-device training with the core step (`make_train_step`), timed per epoch like PAC."""
    from ringjax.models.backbone import forward as model_forward
    from ringjax.peft import leaf_mask, merge, split
    from ringjax.train.step import make_train_step

    buckets = tuple(buckets or default_buckets(train.max_length))
    trainable, frozen = split(params, leaf_mask(params, spec))
    # fresh buffers: the step donates its state, and the caller's arrays (often shared) must survive
    trainable = jax.device_put(jax.device_get(trainable), jax.devices()[0])
    state = jax.device_put(init_state(optimizer, trainable), jax.devices()[0])
    depth = cfg.num_layers if spec.kind != "top-t" else spec.top_t
    step = make_train_step(cfg, spec, head, optimizer, params, depth)
    eval_fn = jax.jit(lambda p, b: predictions(head, model_forward(cfg, spec, head, p, b).logits))
    stream = BatchStream(train, batch_size, seed=seed, buckets=buckets)
    compile_seconds = 0.0
    if warmup:
        t0 = time.perf_counter()
        throwaway = jax.tree.map(lambda x: x.copy(), state)
        for width in buckets:
            b = token_batch(train, np.arange(min(batch_size, len(train))), width, batch_size)
            b = {k: v for k, v in b.items() if k != "index"}
            throwaway, _ = step(throwaway, frozen, {**b, "example_mask": np.zeros_like(b["example_mask"])})
            jax.block_until_ready(eval_fn(merge(state.trainable, frozen), b))
        jax.block_until_ready(throwaway)
        compile_seconds = time.perf_counter() - t0
    metric = _default_metric(head)
    history, seconds, cpu = [], [], []
    for epoch in range(epochs):
        began, began_cpu = time.perf_counter(), time.process_time()
        losses = []
        for batch in stream.epoch(epoch):
            state, m = step(state, frozen, {k: v for k, v in batch.items() if k != "index"})
            losses.append(m["loss"])
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(jax.device_get(losses)))}
        if dev is not None:
            lengths = np.minimum(np.diff(dev.offsets), buckets[-1])
            preds = np.zeros(len(dev), np.asarray(dev.labels).dtype)
            p_all = merge(state.trainable, frozen)
            for idx in _eval_plan(len(dev), lengths, batch_size, buckets):
                b = token_batch(dev, idx, _width(lengths, idx, buckets), batch_size)
                p = np.asarray(eval_fn(p_all, {k: v for k, v in b.items() if k != "index"}))
                real = b["index"] >= 0
                preds[b["index"][real]] = p[real]
            record["dev"] = metric(preds, dev.labels)
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
        record["seconds"] = seconds[-1]
        record["cpu_seconds"] = cpu[-1]
        history.append(record)
        if log is not None:
            log({"method": spec.kind, **record})
    return {"epoch_seconds": seconds, "epoch_cpu_seconds": cpu, "compile_seconds": compile_seconds, "epochs": history,
            "dev": history[-1].get("dev") if history else None, "total_seconds": float(sum(seconds))}


# ----------------------------------------------------------------------------- `ringjax train --method pac`


def check_run_config(config) -> None:
    """One-line errors for a PAC run config, before any model or data is loaded."""
    if config.steps is not None:
        raise RingjaxError("PAC trains whole epochs (epoch 1 fills the activation cache, later epochs read it): "
                           "give --epochs E instead of --steps N")
    if config.epochs is None:
        raise RingjaxError("PAC needs --epochs E (whole epochs: epoch 1 fills the activation cache, later epochs read it)")
    if config.epochs != int(config.epochs) or config.epochs < 1:
        raise RingjaxError(f"PAC trains whole epochs: --epochs must be a positive integer, got {config.epochs}")
    if config.resume or config.checkpoint_every:
        raise RingjaxError("PAC writes no checkpoints (--resume, --checkpoint-every); its activation cache "
                           "(--cache-dir) is what makes a rerun cheap")
    n = config.devices
    if n < 1:
        raise RingjaxError(f"--devices must be at least 1, got {n}")
    if config.batch_size % n:
        raise RingjaxError(f"--batch-size {config.batch_size} must be a multiple of --devices {n} "
                           "(every cached step splits its batch evenly over the devices)")
    if n > 1 and config.batch_size % config.microbatches:
        raise RingjaxError(f"--batch-size {config.batch_size} does not split into --microbatches {config.microbatches} "
                           "(epoch 1's ring pipeline)")
    ac.dtype_name(config.cache_dtype)
    if config.cache_dir is not None:
        from pathlib import Path

        path = Path(config.cache_dir)
        if path.exists() and not path.is_dir():
            raise RingjaxError(f"--cache-dir {path} exists and is not a directory")


def run_pac(config) -> dict:
    """`ringjax train --method pac`: the shared run preparation, then `train_pac`.

    The model is loaded with the parallel-adapter preset (its side network is what trains).
    Writes OUT/config.json, OUT/metrics.jsonl (one record per epoch: train loss, seconds, dev
    metrics, whether the epoch read the backbone or the cache), OUT/trainable.safetensors (so
    `ringjax eval` / `export` work) and OUT/summary.json with the keys every method writes
    plus epoch_seconds (a list), cache_bytes (the cache entries' size on disk; their size in
    host RAM without --cache-dir) and cache_hit (a complete cache was reused: no backbone compute).
    """
    from ringjax.data import task_metric
    from ringjax.parallel.mesh import make_stage_mesh, maybe_initialize_distributed
    from ringjax.peft import leaf_mask
    from ringjax.peft.export import save_trainable
    from ringjax.train.optim import make_optimizer
    from ringjax.train.trainer import MetricsLog, optim_config, prepare, write_summary
    from tqdm.auto import tqdm

    check_run_config(config)
    if maybe_initialize_distributed() and jax.process_count() > 1:
        raise RingjaxError("PAC runs in one process over that process's devices; run it without `ringjax launch`")
    if config.devices > 1:
        make_stage_mesh(config.devices)  # too few visible devices: the same one-line error as --method ringada
    # the side network is always the parallel-adapter preset; config.json records it, so `ringjax eval` rebuilds it
    config = dataclasses.replace(config, adapter="parallel")
    run = prepare(config)
    m, task = run.model, run.task
    cfg, spec, head = m.config, m.peft_config, m.head_config
    epochs, n = int(config.epochs), config.devices
    buckets = default_buckets(run.train.max_length)
    steps = BatchStream(run.train, config.batch_size, seed=config.seed, buckets=buckets).steps_per_epoch
    total = epochs * steps
    optimizer = make_optimizer(optim_config(config), total)
    identity = {"model": ac.model_identity(m.directory), "tokenizer": ac.tokenizer_identity(m.directory)}
    params = m.tree()
    log = MetricsLog(run.out / "metrics.jsonl")
    bar = tqdm(total=total, disable=not config.progress, desc=f"pac {config.task} (compiling)", unit="step")
    compiling = [True]

    def on_step():
        if compiling and not bar.disable:  # first step: restart the clock, so rates exclude compilation
            bar.set_description(f"pac {config.task}", refresh=False)
            bar.reset(total)
        compiling.clear()
        bar.update(1)

    def on_epoch(record):
        log.write({"epoch": record["epoch"], "step": record["epoch"] * steps, "loss": record["train_loss"],
                   "source": record["source"], "seconds": record["seconds"], "cpu_seconds": record["cpu_seconds"],
                   **({"dev": record["dev"]} if "dev" in record else {})})
        bar.set_postfix(epoch=record["epoch"], loss=f"{record['train_loss']:.4f}", source=record["source"])

    began = time.perf_counter()
    try:
        result = train_pac(cfg, spec, head, params, run.train, run.dev, n, epochs, config.batch_size, optimizer,
                           config.cache_dir, config.cache_dtype, seed=config.seed, buckets=buckets,
                           microbatches=config.microbatches if n > 1 else None, identity=identity,
                           metric=lambda p, y: task_metric(config.task, p, y), log=on_epoch,
                           on_step=on_step)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - began
    s = result.summary
    _, frozen = split_params(params)
    save_trainable(run.out, merge_params(result.trainable, frozen), leaf_mask(params, spec), cfg, spec, head)
    dev = s["dev"]
    return write_summary(run, {
        "method": "pac", "task": config.task, "model": config.model,
        "dev_metric": dev[task.metric], "dev_metric_name": task.metric, "dev": dev,
        "train_seconds": train_seconds, "steps": total,
        "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(result.trainable))),
        "final_loss": s["epochs"][-1]["train_loss"],
        "epochs": epochs, "devices": n, "epoch_seconds": s["epoch_seconds"], "epoch_cpu_seconds": s["epoch_cpu_seconds"],
        "compile_seconds": s["compile_seconds"], "cache_bytes": s["cache_bytes"], "cache_hit": s["cache_hit"],
        "cache_dir": config.cache_dir, "cache_dtype": s["cache_dtype"], "cache_paths": s["cache_paths"],
        "epoch1_forward": s["epoch1_forward"],
    })
