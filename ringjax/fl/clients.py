"""Simulated federated clients: data shards, the local training step, and vectorised groups.

A client trains one of three kinds of local job (`LocalJob`):
- "top-t": the top `depth` transformer blocks, the final norm and the head train; the
  embeddings and the blocks below are frozen and their backward pass is never built;
- "full": every weight, embeddings included (FedAvg full fine-tuning);
- "lora": LoRA factors in every block plus the head; gradients flow through all blocks.

Everything is a pure function of pytrees (FedJAX's for_each_client style): a client's trainable
tree holds only what it trains (the top blocks already sliced off the stack), so optimizer state
and the bytes it uploads cover exactly its trained part, and its compiled step's memory is what a
real device with that job would need. A round's clients are run as groups of equal jobs through
`jax.vmap` over a leading client axis (and `jax.shard_map` over a mesh axis when a mesh is given),
each (job, group size, sequence length) compiled once and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from ringjax.data.tokenize import Encoded
from ringjax.errors import RingjaxError
from ringjax.models import backbone
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, apply_head, example_losses
from ringjax.models.layers import attention_bias
from ringjax.peft.config import PeftConfig

KINDS = ("top-t", "full", "lora")


@dataclass(frozen=True)
class LocalJob:
    """What one client trains in a round: a kind and a depth (top blocks whose weights train)."""

    kind: str
    depth: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RingjaxError(f"unknown local job {self.kind!r}; choose one of {KINDS}")
        if self.depth < 0:
            raise RingjaxError(f"depth must be >= 0, got {self.depth}")


@dataclass(frozen=True)
class FLModel:
    """The static description of the model the federation fine-tunes (hashable)."""

    cfg: ModelConfig
    head: HeadConfig
    lora: PeftConfig = PeftConfig(kind="lora")

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def spec(self, job: LocalJob) -> PeftConfig:
        return self.lora if job.kind == "lora" else PeftConfig(kind="full" if job.kind == "full" else "top-t", top_t=job.depth)


# ----------------------------------------------------------------------------- parameters


def layer_slice(tree, start: int, stop: int):
    """Layers [start, stop) of stacked leaves; works on arrays and on `jax.ShapeDtypeStruct`s."""

    def cut(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((stop - start, *x.shape[1:]), x.dtype)
        return x[start:stop]

    return jax.tree.map(cut, tree)


def split_params(params: dict, job: LocalJob, num_layers: int) -> tuple[dict, dict]:
    """(trainable, frozen) for a job; the stacked blocks are cut at `num_layers - depth`.

    top-t: trainable {"blocks": top `depth` layers, "final", "head"}, frozen {"embed", "blocks":
    the layers below}. full: everything trainable but "peft". lora: {"peft", "head"} trainable.
    """
    if job.kind == "top-t":
        if job.depth > num_layers:
            raise RingjaxError(f"depth {job.depth} exceeds the model's {num_layers} blocks")
        cut = num_layers - job.depth
        trainable = {"blocks": layer_slice(params["blocks"], cut, num_layers), "final": params["final"], "head": params["head"]}
        frozen = {"embed": params["embed"], "blocks": layer_slice(params["blocks"], 0, cut)}
        return trainable, frozen
    if job.kind == "full":
        return {k: params[k] for k in ("embed", "blocks", "final", "head")}, {}
    if not params.get("peft", {}).get("blocks"):
        raise RingjaxError("a LoRA job needs LoRA parameters in params['peft']; build them with ringjax.peft.init_peft")
    return {"peft": params["peft"], "head": params["head"]}, {k: params[k] for k in ("embed", "blocks", "final")}


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def upload_bytes(params: dict, job: LocalJob, num_layers: int) -> int:
    """Bytes a client sends back: its trained parameters, in their own dtype."""
    trainable, _ = split_params(jax.eval_shape(lambda p: p, params), job, num_layers)
    return tree_bytes(trainable)


# ----------------------------------------------------------------------------- forward / step


def _blocks(cfg: ModelConfig, spec: PeftConfig, blocks, peft_blocks, h, bias, unroll: bool):
    block = backbone.arch(cfg).block

    def step(h, layer):
        p, peft = layer
        return block(cfg, p, h, bias, peft, spec), None

    n = next(iter(jax.tree.leaves(blocks))).shape[0]
    return jax.lax.scan(step, h, (blocks, peft_blocks), unroll=n if unroll else 1)[0]


def client_logits(model: FLModel, job: LocalJob, trainable: dict, frozen: dict, batch: dict, unroll: bool = False):
    """Head logits of a client's model; gradients reach only `trainable`.

    `unroll=True` unrolls the layer loops (same numbers): XLA's cost analysis counts a loop body
    once, so FLOP checks compile the unrolled form.
    """
    cfg, spec = model.cfg, model.spec(job)
    both = {**frozen, **trainable}
    embed_p = both["embed"]
    bias = attention_bias(batch["attention_mask"], cfg.causal)
    h = backbone.embed(cfg, {"embed": embed_p}, batch)
    peft_blocks = both.get("peft", {}).get("blocks", {})
    if job.kind == "top-t":
        if frozen["blocks"] and next(iter(jax.tree.leaves(frozen["blocks"]))).shape[0] > 0:
            h = _blocks(cfg, spec, frozen["blocks"], {}, h, bias, unroll)
        h = jax.lax.stop_gradient(h)
        if job.depth > 0:
            h = _blocks(cfg, spec, trainable["blocks"], {}, h, bias, unroll)
    else:
        h = _blocks(cfg, spec, both["blocks"], peft_blocks, h, bias, unroll)
    h = backbone.arch(cfg).final(cfg, both["final"], h)
    return apply_head(cfg, model.head, both["head"], h, batch["attention_mask"], embed_p)


def client_loss(model: FLModel, job: LocalJob, trainable, frozen, batch, unroll: bool = False):
    """Mean local loss; a batch's `logit_offset` (B, labels), when present, is added to the logits
    before the loss (logit adjustment by the client's label prior, see `label_log_prior`)."""
    logits = client_logits(model, job, trainable, frozen, batch, unroll)
    if "logit_offset" in batch:
        logits = logits + batch["logit_offset"]
    losses = example_losses(model.head, logits, batch["labels"])
    w = batch.get("example_mask")
    return losses.mean() if w is None else (losses * w).sum() / jnp.maximum(w.sum(), 1.0)


def make_local_step(model: FLModel, job: LocalJob, optimizer: optax.GradientTransformation, unroll: bool = False):
    """step((trainable, opt_state), frozen, batch) -> ((trainable, opt_state), loss): one local step."""
    grad_fn = jax.value_and_grad(lambda t, f, b: client_loss(model, job, t, f, b, unroll))

    def local_step(state, frozen, batch):
        trainable, opt_state = state
        loss, grads = grad_fn(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), loss

    return local_step


def make_local_round(model: FLModel, job: LocalJob, optimizer: optax.GradientTransformation):
    """local_round(trainable, frozen, batches) -> (trained, mean loss): E steps from a fresh optimizer.

    `batches` has a leading axis of E local steps; the loop is a `lax.scan`.
    """
    step = make_local_step(model, job, optimizer)

    def local_round(trainable, frozen, batches):
        state = (trainable, optimizer.init(trainable))
        (trainable, _), losses = jax.lax.scan(lambda s, b: step(s, frozen, b), state, batches)
        return trainable, losses.mean()

    return local_round


@functools.lru_cache(maxsize=64)
def local_optimizer(lr: float, weight_decay: float = 0.0, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Client optimizer: AdamW at a constant rate, fresh each round (clients are rarely resampled).

    Cached, so equal settings give the same object and runs share compiled group functions.
    """
    adam = optax.adamw(lr, weight_decay=weight_decay)
    return adam if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adam)


# ----------------------------------------------------------------------------- measured memory


def peak_bytes(stats) -> int:
    """Peak bytes of a compiled executable: arguments + outputs - aliased (donated) + temporaries."""
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def example_batch(batch_size: int, seq_len: int, labels_dtype=jnp.int32, offset_labels: int = 0) -> dict:
    """Shapes of one local batch; `offset_labels` > 0 adds a (B, labels) `logit_offset`."""
    shape = (batch_size, seq_len)
    batch = {
        "input_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32),
        "token_type_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
        "labels": jax.ShapeDtypeStruct((batch_size,), labels_dtype),
    }
    if offset_labels:
        batch["logit_offset"] = jax.ShapeDtypeStruct((batch_size, offset_labels), jnp.float32)
    return batch


def compile_local_step(model: FLModel, job: LocalJob, optimizer, params: dict, batch_size: int, seq_len: int, unroll: bool = False,
                       compiler_options: dict | None = None, offset_labels: int = 0):
    """AOT-compile one client's local step (one client, not vmapped), state donated as on a device;
    `offset_labels` > 0: its batches carry a logit offset (`label_log_prior`)."""
    shapes = jax.eval_shape(lambda p: p, params)
    trainable, frozen = split_params(shapes, job, model.num_layers)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    labels = jnp.float32 if model.head.kind == "regression" else jnp.int32
    step = make_local_step(model, job, optimizer, unroll)
    lowered = jax.jit(step, donate_argnums=0).lower((trainable, opt_state), frozen, example_batch(batch_size, seq_len, labels, offset_labels))
    return lowered.compile(compiler_options) if compiler_options else lowered.compile()


def measured_peak_bytes(model: FLModel, job: LocalJob, optimizer, params: dict, batch_size: int, seq_len: int,
                        offset_labels: int = 0) -> int:
    """A client's real peak bytes: XLA's memory analysis of its compiled local step."""
    compiled = compile_local_step(model, job, optimizer, params, batch_size, seq_len, offset_labels=offset_labels)
    return peak_bytes(compiled.memory_analysis())


# ----------------------------------------------------------------------------- data


def client_example_rows(sizes: np.ndarray, client: int, steps: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """(steps, batch_size) positions into a client's shard: without replacement when it has enough."""
    n = int(sizes[client])
    need = steps * batch_size
    rows = rng.permutation(n)[:need] if n >= need else rng.integers(0, n, need)
    return rows.reshape(steps, batch_size)


def label_log_prior(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """log of a client's label distribution, add-one smoothed: (num_labels,) float32.

    Training on logits + tau * log prior (balanced softmax; FedLC's logit calibration) keeps a
    label-skewed client from pulling the shared head towards its own majority label: its prior
    already explains the skew. Evaluation uses the plain logits.
    """
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_labels)[:num_labels].astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + num_labels)).astype(np.float32)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


def gather(encoded: Encoded, rows: np.ndarray, seq_len: int) -> dict:
    """Padded arrays for example indices `rows` (any shape), cut to `seq_len` tokens."""
    flat = rows.reshape(-1)
    lengths = np.minimum(encoded.lengths[flat], seq_len)
    columns = np.arange(seq_len)
    attention = columns[None, :] < lengths[:, None]
    positions = np.where(attention, encoded.offsets[flat][:, None] + columns[None, :], 0)
    shape = (*rows.shape, seq_len)
    return {
        "input_ids": np.where(attention, encoded.input_ids[positions], encoded.pad_id).astype(np.int32).reshape(shape),
        "attention_mask": attention.astype(np.int32).reshape(shape),
        "token_type_ids": np.where(attention, encoded.token_type_ids[positions], 0).astype(np.int32).reshape(shape),
        "labels": encoded.labels[flat].reshape(rows.shape),
    }


# ----------------------------------------------------------------------------- vectorised groups


def chunk_sizes(n: int, chunk: int, multiple: int = 1) -> list[int]:
    """Split n clients into compiled group sizes: full chunks, then the rest padded to a power of two.

    Sizes come from a small fixed set ({chunk} and powers of two below it, times `multiple`),
    so a depth compiles at most log2(chunk) + 1 times whatever the round's mix.
    """
    if chunk < 1 or chunk % multiple:
        raise RingjaxError(f"client chunk {chunk} must be a positive multiple of the mesh size {multiple}")
    sizes = [chunk] * (n // chunk)
    rest = n % chunk
    if rest:
        size = multiple
        while size < rest:
            size *= 2
        sizes.append(min(size, chunk))
    return sizes


_COMPILED: dict[tuple, Callable] = {}  # process-wide: runs with equal settings share executables


def _shape_key(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


class GroupRunner:
    """Runs groups of clients with the same job: vmap over clients, optionally shard_map over a mesh.

    `run` returns the weight-summed trained parameters (sum_i w_i theta_i), the weight sum and the
    per-client mean losses; padded clients carry weight 0. Executables are compiled ahead of time
    once per (job, group size, batch shape, optimizer, mesh, compiler options) and cached for the
    whole process; `compiles` counts the compilations this runner did, `shapes_used` the distinct
    keys it ran. `compiler_options` go to XLA (e.g. {"xla_backend_optimization_level": 0} halves
    CPU compile time for short simulations and tests).
    """

    def __init__(self, model: FLModel, optimizers: dict[str, optax.GradientTransformation], mesh: Mesh | None = None,
                 axis: str = "clients", compiler_options: dict | None = None):
        self.model = model
        self.optimizers = optimizers
        self.mesh = mesh
        self.axis = axis
        self.compiler_options = dict(compiler_options or {})
        self.compiles = 0
        self.shapes_used: set[tuple] = set()

    @property
    def multiple(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[self.axis]

    def _fn(self, job: LocalJob, reduce: bool):
        local_round = make_local_round(self.model, job, self.optimizers[job.kind])

        def group(trainable, frozen, batches, weights):
            if self.mesh is not None:
                # Mark the replicated start as per-device: differentiating an axis-invariant input
                # inside shard_map transposes its implicit broadcast into a psum, which would sum
                # gradients across devices, i.e. mix clients.
                trainable = jax.tree.map(lambda x: jax.lax.pcast(x, self.axis, to="varying"), trainable)
            trained, losses = jax.vmap(local_round, in_axes=(None, None, 0))(trainable, frozen, batches)
            if not reduce:
                return trained, losses
            sums = jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), trained)
            total = weights.sum()
            if self.mesh is not None:
                sums, total = jax.lax.psum((sums, total), self.axis)
            return sums, total, losses

        if self.mesh is not None:
            a = P(self.axis)
            out = (P(), P(), a) if reduce else (a, a)
            group = jax.shard_map(group, mesh=self.mesh, in_specs=(P(), P(), a, a), out_specs=out)
        return group

    def run(self, job: LocalJob, trainable: dict, frozen: dict, batches: dict, weights: np.ndarray, reduce: bool = True):
        """`batches` leaves are (G, E, B, T...) numpy or jax arrays; `weights` is (G,)."""
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape[0] % self.multiple:
            raise RingjaxError(f"group of {weights.shape[0]} clients does not divide over {self.multiple} devices")
        key = (
            self.model, job, reduce, id(self.optimizers[job.kind]), self.mesh, self.axis, tuple(sorted(self.compiler_options.items())),
            _shape_key(trainable), _shape_key(frozen), _shape_key(batches), weights.shape,
        )
        fn = _COMPILED.get(key)
        if fn is None:
            lowered = jax.jit(self._fn(job, reduce)).lower(trainable, frozen, batches, weights)
            fn = lowered.compile(self.compiler_options) if self.compiler_options else lowered.compile()
            _COMPILED[key] = fn
            self.compiles += 1
        self.shapes_used.add(key)
        return fn(trainable, frozen, batches, weights)
