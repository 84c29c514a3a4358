"""The ring pipeline engine: explicit forward and backward ticks under `shard_map`.

Layout. Device d of the `stage` mesh axis holds stage d's frozen blocks (stages padded to the
largest stage along the layer axis, so every device's slab has one shape), the frozen embedding,
the final norm and the head. The global batch of B examples is cut into M microbatches of B/M;
microbatch m is owned by device m % N, and each device receives only its own microbatches'
input ids, attention masks and labels. Ids and masks (never labels) are all-gathered, because
stage 0 embeds every microbatch and every stage needs the attention masks.

A step is a `lax.scan` over the ticks of a `PipelineSchedule` (see schedules.py). In each tick
every device reads its row of the schedule's tables and runs at most one of:
- forward: `lax.cond` on "my action is fwd", then the device's stage program, picked among
  the distinct programs by device index (a program is: number of blocks, unfreeze cut inside
  the stage, whether the input gradient is needed, whether it holds the model's top block
  and the head reads only the [CLS] position, so that block computes that row alone). Frozen
  layers run plainly; each block of the trainable suffix runs under its own `jax.vjp` (in a
  layer scan, the top block and an input-gradient-free lowest block on their own), and its pullback's
  residuals (minus the weights and adapters, which the backward tick has anyway) are written
  straight into this microbatch's row of a per-device stash. With
  `residuals="recompute"` only the activation at the cut is kept and the backward tick
  re-runs the suffix's forward. Frozen programs keep nothing;
- backward: `lax.cond` on "my action is bwd", then a reverse layer scan of the blocks'
  pullbacks rebuilt from the stash (each residual read straight from its row), giving adapter
  gradients (accumulated) and, only where the stage below trains, the input gradient. The
  vjp is wrt the adapters (and the input where needed), never wrt the frozen weights, so no
  weight gradients are computed.
Conditions on device-varying predicates run only the taken branch, so idle ticks (bubbles),
frozen stages and devices without head work cost no compute. Stages wholly below the unfreeze
depth get no backward actions at all, and the depth is static: each depth compiles its own,
shorter schedule, and its stash is sized by the training stages' residuals only (1F1B: at most
`schedule.slots` microbatches in flight, not M). One SPMD program reserves the same buffers on
every device; frozen devices never write theirs. A training loop hands the stash from step to step
(`new_stash`, `loss_and_grads(..., stash)`, donated) rather than zero-filling a fresh one each step.

Transfers happen at the end of a tick and land at the start of the next: `ppermute` to the
next stage (activations) and to the previous stage (gradients); the last stage's output goes
to the microbatch's owner, and the owner's loss gradient comes back (the shift changes per
tick, so it is a `lax.switch` over the N static shifts on a tick-uniform index). The owner
applies the final norm, head and loss with its own labels. Loss and head gradients are summed
over devices (`psum`) at the end. Buffers are always written before they are read within a
tick, and each training program writes the stash under its own two-way `cond` rather than as
one branch of a switch: XLA copies a buffer whole in every branch when several branches of one
conditional update it in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ringjax.errors import RingjaxError
from ringjax.models.backbone import arch, embed as embed_tokens, run_blocks, top_block
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, apply_head, example_losses, reads_first_token
from ringjax.models.layers import attention_bias
from ringjax.parallel.mesh import AXIS, put
from ringjax.parallel.placement import Placement
from ringjax.parallel.schedules import BWD, FWD, PipelineSchedule, build_schedule
from ringjax.peft.config import PeftConfig

RESIDUAL_MODES = ("keep", "recompute")
_RESIDUAL_SIZES: dict = {}  # (model, shapes) -> residual elements of one trainable block, per dtype
DATA_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "example_mask")


@dataclass(frozen=True)
class StageProgram:
    """What one device computes: `size` blocks, of which the first `cut` are frozen; `dx`: the
    stage below trains, so the input gradient is needed; `first_only`: its last block is the
    model's top and computes only the first position (the head reads nothing else)."""

    size: int
    cut: int
    dx: bool
    first_only: bool = False

    @property
    def trains(self) -> bool:
        return self.cut < self.size


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


class RingPipeline:
    """One compiled ring step for a fixed (placement, microbatches, unfreeze depth)."""

    def __init__(
        self,
        cfg: ModelConfig,
        spec: PeftConfig,
        head: HeadConfig,
        mesh: Mesh,
        placement: Placement,
        num_microbatches: int,
        depth: int,
        schedule: str = "1f1b",
        residuals: str = "keep",
        unroll: bool = False,
        compiler_options: dict | None = None,
    ):
        if spec.kind not in ("adapter", "lora"):
            raise RingjaxError(
                f"RingAda trains adapters or LoRA inside the pipeline stages; PEFT kind {spec.kind!r} is not "
                f"supported (use --peft houlsby, pfeiffer or lora)"
            )
        if residuals not in RESIDUAL_MODES:
            raise RingjaxError(f"unknown residual mode {residuals!r}; choose one of {RESIDUAL_MODES}")
        N = mesh.shape[AXIS]
        if placement.num_stages != N:
            raise RingjaxError(f"placement has {placement.num_stages} stages but the mesh has {N} devices")
        L = cfg.num_layers
        if placement.num_layers != L:
            raise RingjaxError(f"placement covers {placement.num_layers} blocks but the model has {L}")
        if not 0 <= depth <= L:
            raise RingjaxError(f"unfreeze depth {depth} is outside 0..{L}")
        if num_microbatches < 1:
            raise RingjaxError(f"need at least one microbatch; got {num_microbatches}")
        self.cfg, self.spec, self.head, self.mesh = cfg, spec, head, mesh
        self.placement, self.M, self.depth, self.N = placement, int(num_microbatches), int(depth), N
        self.residuals, self.unroll = residuals, bool(unroll)
        cut = L - depth
        self.first_only = reads_first_token(cfg, head)
        self.programs = [
            StageProgram(size=s, cut=min(max(cut - a, 0), s), dx=cut < a, first_only=self.first_only and s > 0 and a + s == L)
            for a, s in zip(placement.starts, placement.sizes)
        ]
        self.branches = list(dict.fromkeys(self.programs))  # each distinct program is one switch branch
        self._train_blocks = max((p.size - p.cut for p in self.programs), default=0)  # most trainable blocks of any stage
        self.schedule: PipelineSchedule = build_schedule(schedule, N, self.M, [p.trains for p in self.programs])
        self.tables = self.schedule.engine_tables()
        self._block_plans: dict[tuple, tuple] = {}  # residual layout of a trainable block, by (needs dx, first only)
        self._pad = np.array(placement.padded_index(), np.int32)
        self._unpad = np.array(placement.unpadded_index(), np.int32)
        self._arch = arch(cfg)
        self.compiler_options = compiler_options
        self._step = jax.jit(self.loss_and_grads, compiler_options=compiler_options)

    # ---- layout -------------------------------------------------------------------------
    def stage_tree(self, tree):
        """(L, ...) stacked leaves -> (N * max_size, ...) in stage order (device d owns rows d*S..)."""
        return jax.tree.map(lambda x: jnp.take(x, self._pad, axis=0), tree)

    def unstage_tree(self, tree):
        return jax.tree.map(lambda x: jnp.take(x, self._unpad, axis=0), tree)

    def place_frozen(self, frozen: dict) -> dict:
        """The frozen parts on the mesh: blocks split by stage, embedding and final norm on every device."""
        blocks = jax.tree.map(lambda x: put(np.asarray(x)[self._pad], self.mesh, P(AXIS)), frozen["blocks"])
        return {
            "blocks": blocks,
            "embed": jax.tree.map(lambda x: put(x, self.mesh), frozen["embed"]),
            "final": jax.tree.map(lambda x: put(x, self.mesh), frozen.get("final", {})),
        }

    def placed_frozen_like(self, frozen: dict) -> dict:
        """`place_frozen(frozen)` as shapes and shardings only: to compile a step before its
        placement's weights move."""
        stage, everywhere = NamedSharding(self.mesh, P(AXIS)), NamedSharding(self.mesh, P())
        like = lambda x, sharding, rows=None: jax.ShapeDtypeStruct(  # noqa: E731
            np.shape(x) if rows is None else (rows, *np.shape(x)[1:]), jnp.result_type(x), sharding=sharding)
        return {
            "blocks": jax.tree.map(lambda x: like(x, stage, len(self._pad)), frozen["blocks"]),
            "embed": jax.tree.map(lambda x: like(x, everywhere), frozen["embed"]),
            "final": jax.tree.map(lambda x: like(x, everywhere), frozen.get("final", {})),
        }

    def microbatch_size(self, batch_size: int) -> int:
        if batch_size % self.M:
            raise RingjaxError(f"batch size {batch_size} is not a multiple of {self.M} microbatches; change --batch-size or --microbatches")
        return batch_size // self.M

    def owner_order(self) -> np.ndarray:
        """Row r of the owner layout holds microbatch owner_order()[r] (-1: padding)."""
        K = -(-self.M // self.N)
        order = np.full(self.N * K, -1, np.int64)
        for m in range(self.M):
            order[(m % self.N) * K + m // self.N] = m
        return order

    def shard_batch(self, batch: dict) -> dict:
        """Global batch (B, ...) -> owner layout (N*K, B/M, ...), each device holding only its microbatches."""
        B = int(np.shape(batch["input_ids"])[0])
        mb = self.microbatch_size(B)
        order = self.owner_order()
        out = {}
        for key in DATA_KEYS:
            if key not in batch:
                continue
            x = np.asarray(batch[key]).reshape(self.M, mb, *np.shape(batch[key])[1:])
            rows = np.zeros((len(order), *x.shape[1:]), x.dtype)
            rows[order >= 0] = x[order[order >= 0]]
            out[key] = put(rows, self.mesh, P(AXIS))
        return out

    # ---- per-stage programs -------------------------------------------------------------
    def _layers(self, tree, start, stop):
        return jax.tree.map(lambda x: x[start:stop], tree)

    def _run(self, W, Pf, h, bias, first_only_top: bool = False):
        """Blocks W (stacked) with adapters Pf over h (`unroll`: the layer scan unrolled, for FLOP counts)."""
        if jax.tree.leaves(W)[0].shape[0] == 0:
            return h
        return run_blocks(self.cfg, self.spec, W, Pf, h, bias, False, self.unroll, first_only_top)[0]

    def _block_vjp(self, W_l, P_l, h, bias, key: tuple):
        """Output and pullback of one trainable block: wrt its adapters, and its input when
        `key[0]` (needs dx); `key[1]`: it is the top block computing the first position only."""
        dx, first_only = key
        fn = top_block if first_only else self._arch.block
        f = lambda pf, h: fn(self.cfg, W_l, h, bias, pf, self.spec)  # noqa: E731
        return jax.vjp(f, P_l, h) if dx else jax.vjp(lambda pf: f(pf, h), P_l)

    def _residuals(self, vjp, W_l, P_l, bias, key: tuple) -> list:
        """The pullback's leaves to stash: all but the weights, adapters and bias, which the
        backward tick has anyway. Records the layout `_pullback` rebuilds it from."""
        leaves, treedef = jax.tree.flatten(vjp)
        avail = jax.tree.leaves((W_l, P_l)) + [bias]
        plan, kept = [], []
        for leaf in leaves:
            hit = next((i for i, a in enumerate(avail) if leaf is a), None)
            if hit is None:
                plan.append(("kept", len(kept)))
                kept.append(leaf)
            else:
                plan.append(("avail", hit))
        self._block_plans[key] = (treedef, plan, [(k.shape, k.dtype) for k in kept])
        return kept

    def _pullback(self, W_l, P_l, bias, key: tuple, kept: list):
        treedef, plan, _ = self._block_plans[key]
        avail = jax.tree.leaves((W_l, P_l)) + [bias]
        return jax.tree.unflatten(treedef, [avail[i] if src == "avail" else kept[i] for src, i in plan])

    def _block_offsets(self, stash: dict, j) -> dict:
        """Where trainable block j of a stage starts in a stash row, per dtype (a row holds
        `_train_blocks` equal block slots, `residual_sizes`)."""
        return {name: j * (buf.shape[1] // self._train_blocks) for name, buf in stash.items()}

    @staticmethod
    def _write(stash: dict, slot, offsets: dict, leaves: list) -> dict:
        """Write `leaves` one after another into stash row `slot`, from `offsets` on."""
        stash, offsets = dict(stash), dict(offsets)
        for leaf in leaves:
            name = str(jnp.dtype(leaf.dtype))
            stash[name] = jax.lax.dynamic_update_slice(stash[name], leaf.reshape(1, -1), (slot, offsets[name]))
            offsets[name] = offsets[name] + leaf.size
        return stash

    @staticmethod
    def _read(stash: dict, slot, offsets: dict, layout: list) -> list:
        """The leaves of `layout` ((shape, dtype) pairs) from stash row `slot`, from `offsets` on."""
        offsets, leaves = dict(offsets), []
        for shape, dtype in layout:
            name, n = str(jnp.dtype(dtype)), int(np.prod(shape))
            leaves.append(jax.lax.dynamic_slice(stash[name], (slot, offsets[name]), (1, n)).reshape(shape))
            offsets[name] = offsets[name] + n
        return leaves

    def _spans(self, prog: StageProgram) -> tuple[int, int, int]:
        """(lo, hi, n): of a stage's n trainable blocks, those below lo (the lowest, when its
        input needs no gradient) and from hi on (the model's top block, first position only) run
        on their own; lo..hi share one layer scan (input gradient, every position)."""
        n = prog.size - prog.cut
        lo = 0 if prog.dx else 1
        return lo, max(n - 1 if prog.first_only else n, lo), n

    @staticmethod
    def _key(prog: StageProgram, j: int, n: int) -> tuple:
        """Residual layout key of trainable block j of n: (needs dx, first position only)."""
        return (j > 0 or prog.dx, prog.first_only and j == n - 1)

    def stage_forward(self, prog: StageProgram, blocks, peft, h, bias, stash: dict, slot):
        """One microbatch through one stage: (output, stash with the microbatch's residuals in row `slot`).

        The trainable blocks run one `jax.vjp` each inside a layer scan that writes each block's
        residuals straight into the stash, so they are written once, where the backward tick
        reads them (a vjp of the whole layer scan stacks them first, and copying that stack into
        the stash cost a second write and a second read of every residual)."""
        h = self._run(self._layers(blocks, 0, prog.cut), self._layers(peft, 0, prog.cut), h, bias,
                      prog.first_only and prog.cut == prog.size)
        if not prog.trains:
            return h, stash
        W, Pf = self._layers(blocks, prog.cut, prog.size), self._layers(peft, prog.cut, prog.size)
        if self.residuals == "recompute":
            return self._run(W, Pf, h, bias, prog.first_only), self._write(stash, slot, {name: 0 for name in stash}, [h])
        lo, hi, n = self._spans(prog)

        def one(h, stash, j):
            W_l, P_l = jax.tree.map(lambda x: x[j], (W, Pf))
            key = self._key(prog, j, n)
            h, vjp = self._block_vjp(W_l, P_l, h, bias, key)
            return h, self._write(stash, slot, self._block_offsets(stash, j), self._residuals(vjp, W_l, P_l, bias, key))

        for j in range(lo):
            h, stash = one(h, stash, j)
        if hi > lo:
            def block(carry, layer):
                h, stash = carry
                W_l, P_l, j = layer
                h, vjp = self._block_vjp(W_l, P_l, h, bias, (True, False))
                return (h, self._write(stash, slot, self._block_offsets(stash, j), self._residuals(vjp, W_l, P_l, bias, (True, False)))), None

            layers = (self._layers(W, lo, hi), self._layers(Pf, lo, hi), jnp.arange(lo, hi, dtype=jnp.int32))
            (h, stash), _ = jax.lax.scan(block, (h, stash), layers, unroll=self.unroll)
        for j in range(hi, n):
            h, stash = one(h, stash, j)
        return h, stash

    def stage_backward(self, prog: StageProgram, blocks, peft, stash: dict, slot, bias, g):
        """(adapter gradients for the stage's padded slab, input gradient or zeros) of the
        microbatch whose residuals are in stash row `slot`."""
        W, Pf = self._layers(blocks, prog.cut, prog.size), self._layers(peft, prog.cut, prog.size)
        if self.residuals == "recompute":
            (h,) = self._read(stash, slot, {name: 0 for name in stash}, [(g.shape, g.dtype)])
            f = lambda pf, h: self._run(W, pf, h, bias, prog.first_only)  # noqa: E731
            _, vjp = jax.vjp(f, Pf, h) if prog.dx else jax.vjp(lambda pf: f(pf, h), Pf)
            cts = vjp(g)
            g_peft, g_h = cts[0], (cts[1] if prog.dx else jnp.zeros_like(g))
        else:
            lo, hi, n = self._spans(prog)

            def one(g, j):
                W_l, P_l = jax.tree.map(lambda x: x[j], (W, Pf))
                key = self._key(prog, j, n)
                kept = self._read(stash, slot, self._block_offsets(stash, j), self._block_plans[key][2])
                cts = self._pullback(W_l, P_l, bias, key, kept)(g)
                return (cts[1] if key[0] else jnp.zeros_like(g)), jax.tree.map(lambda x: x[None], cts[0])

            top = []
            for j in reversed(range(hi, n)):
                g, g_p = one(g, j)
                top.insert(0, g_p)
            middle = []
            if hi > lo:
                def block(g, layer):
                    W_l, P_l, j = layer
                    kept = self._read(stash, slot, self._block_offsets(stash, j), self._block_plans[(True, False)][2])
                    g_p, g = self._pullback(W_l, P_l, bias, (True, False), kept)(g)
                    return g, g_p

                layers = (self._layers(W, lo, hi), self._layers(Pf, lo, hi), jnp.arange(lo, hi, dtype=jnp.int32))
                g, g_rest = jax.lax.scan(block, g, layers, reverse=True, unroll=self.unroll)
                middle.append(g_rest)
            bottom = []
            for j in reversed(range(lo)):
                g, g_p = one(g, j)
                bottom.insert(0, g_p)
            parts = bottom + middle + top
            g_peft = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts) if len(parts) > 1 else parts[0]
            g_h = g
        pad = ((prog.cut, self.placement.max_size - prog.size),)
        return jax.tree.map(lambda x: jnp.pad(x, pad + ((0, 0),) * (x.ndim - 1)), g_peft), g_h

    # ---- residual layout ----------------------------------------------------------------
    def bias_shape(self, mb_shape) -> jax.ShapeDtypeStruct:
        """The attention bias the stage programs get for a (microbatch, seq) batch, as the step
        builds it: (mb, 1, 1, seq) for encoders, whose first-position top block relies on it."""
        return jax.eval_shape(lambda m: attention_bias(m, self.cfg.causal), jax.ShapeDtypeStruct(mb_shape, jnp.int32))

    def residual_sizes(self, local_blocks, local_peft, mb_shape) -> dict:
        """{dtype: elements} of one stash row: the largest residual set of any training program
        (keep: its trainable blocks times the per-block size; recompute: the stage input)."""
        if not any(p.trains for p in self.programs):
            return {}
        h = jax.ShapeDtypeStruct((*mb_shape, self.cfg.hidden_size), jnp.float32)
        if self.residuals == "recompute":
            return {str(h.dtype): int(np.prod(h.shape))}
        abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)  # noqa: E731
        W_l, P_l = abstract(local_blocks), abstract(local_peft)
        bias = self.bias_shape(mb_shape)
        key = (self.cfg, self.spec, self.first_only, h.shape, jax.tree.structure((W_l, P_l)),
               tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves((W_l, P_l))))
        if key not in _RESIDUAL_SIZES:  # tracing a block's vjp is slow: once per model and shape
            unit: dict = {}
            for block_key in [(dx, top) for dx in (False, True) for top in (False, True) if self.first_only or not top]:
                kept = jax.eval_shape(lambda W, P, h, bias: self._residuals(self._block_vjp(W, P, h, bias, block_key)[1], W, P, bias, block_key),
                                      W_l, P_l, h, bias)
                per: dict = {}
                for k in kept:
                    per[str(jnp.dtype(k.dtype))] = per.get(str(jnp.dtype(k.dtype)), 0) + int(np.prod(k.shape))
                for name, n in per.items():
                    unit[name] = max(unit.get(name, 0), n)
            _RESIDUAL_SIZES[key] = unit
        return {name: self._train_blocks * n for name, n in _RESIDUAL_SIZES[key].items()}

    # ---- the step -----------------------------------------------------------------------
    def loss_and_grads(self, trainable: dict, frozen: dict, data: dict, stash: dict | None = None):
        """Mean loss over the global batch and gradients shaped like `trainable` (None holes kept);
        given a `stash` (`new_stash`), also the stash to pass to the next step.

        trainable: the single-device trainable tree (head + peft blocks); frozen: `place_frozen`'s
        output; data: `shard_batch`'s output. Without a stash the step zero-fills a fresh one; a
        stash carried from step to step (donated) is neither zeroed nor faulted in again, and what
        the last step left in it is never read (each microbatch's rows are written before read).
        """
        peft_staged = self.stage_tree(trainable["peft"]["blocks"])
        carried = stash is not None
        body = jax.shard_map(
            self._device_step,
            mesh=self.mesh,
            in_specs=(P(AXIS), P(), P(), P(), P(AXIS), {k: P(AXIS) for k in data}, {k: P(AXIS) for k in (stash or {})}),
            out_specs=(P(), P(), P(AXIS), {k: P(AXIS) for k in (stash or {})}),
            check_vma=False,
        )
        loss, g_head, g_peft, stash = body(peft_staged, trainable["head"], frozen["embed"], frozen["final"], frozen["blocks"],
                                           data, stash if carried else {})
        grads = dict(trainable)
        grads["head"] = g_head
        grads["peft"] = {**trainable["peft"], "blocks": self.unstage_tree(g_peft)}
        return (loss, grads, stash) if carried else (loss, grads)

    def stash_like(self, trainable: dict, frozen: dict, data: dict) -> dict:
        """{dtype: (N * slots, n)} shapes, sharded by stage, of the residual stash a step on `data`
        (`shard_batch`'s output) uses; `frozen` placed or not (only its blocks' row shapes count)."""
        S = self.placement.max_size
        local = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct((S, *np.shape(x)[1:]), jnp.result_type(x)), tree)
        mb, seq = data["input_ids"].shape[1:3]
        sizes = self.residual_sizes(local(frozen["blocks"]), local(trainable["peft"]["blocks"]), (mb, seq))
        sharding = NamedSharding(self.mesh, P(AXIS))
        return {k: jax.ShapeDtypeStruct((self.N * self.schedule.slots, n), jnp.dtype(k), sharding=sharding) for k, n in sizes.items()}

    def new_stash(self, trainable: dict, frozen: dict, data: dict) -> dict:
        """A zeroed stash for `loss_and_grads(..., stash)`, to carry from step to step."""
        like = self.stash_like(trainable, frozen, data)
        return {k: jnp.zeros(x.shape, x.dtype, device=x.sharding) for k, x in like.items()}

    def __call__(self, trainable, frozen, data):
        return self._step(trainable, frozen, data)

    def _device_step(self, peft, head_p, embed_p, final_p, blocks, data, stash_in):
        cfg, N, M, T = self.cfg, self.N, self.M, self.tables
        d = jax.lax.axis_index(AXIS)
        mb, seq = data["input_ids"].shape[1:3]
        H = cfg.hidden_size
        gathered = {k: jax.lax.all_gather(data[k], AXIS) for k in ("input_ids", "attention_mask", "token_type_ids") if k in data}

        def of_mb(key, m):
            return gathered[key][m % N, m // N]

        if "example_mask" in data:
            count = jnp.maximum(jax.lax.psum(data["example_mask"].sum(), AXIS), 1.0)
        else:
            count = float(M * mb)

        sizes = self.residual_sizes(blocks, peft, (mb, seq))
        S = self.schedule.slots
        hshape = (mb, seq, H)

        def frozen_branch(prog):
            def run(blocks, peft, h, bias):
                return self.stage_forward(prog, blocks, peft, h, bias, {}, 0)[0]
            return run

        def bwd_branch(prog):
            def run(blocks, peft, stash, slot, bias, g):
                return self.stage_backward(prog, blocks, peft, stash, slot, bias, g)
            return run

        # Frozen programs are one switch (they keep nothing). Training programs write their
        # residuals into the stash, each under its own two-way cond: when two or more branches of
        # one conditional update a buffer in place, XLA copies the whole buffer in every branch.
        training = [p for p in self.branches if p.trains]
        frozen_progs = [p for p in self.branches if not p.trains]
        fwd_frozen = [frozen_branch(p) for p in frozen_progs]
        index = [training.index(p) if p.trains else frozen_progs.index(p) for p in self.programs]
        local_index = jnp.asarray(np.array(index, np.int32))[d]
        trains_here = jnp.asarray(np.array([p.trains for p in self.programs]))[d]
        bwd_train = [bwd_branch(p) for p in training]

        def head_loss(hp, h, mask, labels, weight):
            h = self._arch.final(cfg, final_p, h)
            logits = apply_head(cfg, self.head, hp, h, mask, embed_p)
            return jnp.sum(example_losses(self.head, logits, labels) * weight) / count

        head_grad = jax.value_and_grad(head_loss, argnums=(0, 1))

        def shift(x, k):
            return jax.lax.ppermute(x, AXIS, [(i, (i + k) % N) for i in range(N)]) if k % N else x

        fwd_perm = [(i, i + 1) for i in range(N - 1)]
        bwd_perm = [(i + 1, i) for i in range(N - 1)]

        def tick(carry, row):
            act, gin, stash, head_in, pending, g_peft, g_head, loss = carry
            kind, m, slot = row["kind"][d], row["mb"][d], row["slot"][d]
            # Messages of the previous tick land first: every buffer is written before it is read
            # in a tick, which lets XLA update it in place (a read before an in-place write in the
            # same loop body makes it copy the whole buffer).
            (act_msg, act_at), (grad_msg, grad_at) = pending
            act = jax.lax.dynamic_update_index_in_dim(act, act_msg, act_at, 0)
            gin = jax.lax.dynamic_update_index_in_dim(gin, grad_msg, grad_at, 0)
            bias = attention_bias(of_mb("attention_mask", m), cfg.causal)

            def do_fwd(stash):
                def embedded():
                    b = {"input_ids": of_mb("input_ids", m), "attention_mask": of_mb("attention_mask", m)}
                    if "token_type_ids" in gathered:
                        b["token_type_ids"] = of_mb("token_type_ids", m)
                    return embed_tokens(cfg, {"embed": embed_p}, b)

                h_in = jax.lax.cond(d == 0, embedded, lambda: act[m])

                def train_path(stash):
                    if len(training) == 1:
                        return self.stage_forward(training[0], blocks, peft, h_in, bias, stash, slot)
                    h_out = h_in
                    for j, prog in enumerate(training):
                        def run(carry, prog=prog):
                            return self.stage_forward(prog, blocks, peft, h_in, bias, carry[1], slot)

                        h_out, stash = jax.lax.cond(local_index == j, run, lambda carry: carry, (h_out, stash))
                    return h_out, stash

                def frozen_path(stash):
                    return jax.lax.switch(local_index, fwd_frozen, blocks, peft, h_in, bias), stash

                if not training:
                    return frozen_path(stash)
                if not frozen_progs:
                    return train_path(stash)
                return jax.lax.cond(trains_here, train_path, frozen_path, stash)

            def no_fwd(stash):
                return jnp.zeros(hshape, jnp.float32), stash

            h_out, stash = jax.lax.cond(kind == FWD, do_fwd, no_fwd, stash)

            def do_bwd(stash, gin):
                g_out = jax.lax.dynamic_index_in_dim(gin, m, 0, keepdims=False)
                return jax.lax.switch(local_index, bwd_train, blocks, peft, stash, slot, bias, g_out)

            def no_bwd(stash, gin):
                return _zeros_like(peft), jnp.zeros(hshape, jnp.float32)

            if training:  # frozen stages never get a backward action
                g_peft_m, g_h = jax.lax.cond(kind == BWD, do_bwd, no_bwd, stash, gin)
                g_peft = jax.tree.map(jnp.add, g_peft, g_peft_m)
            else:
                g_h = jnp.zeros(hshape, jnp.float32)

            hl = row["head_local"]

            def do_head():
                weight = data["example_mask"][hl] if "example_mask" in data else jnp.ones((mb,), jnp.float32)
                value, (gh, gx) = head_grad(head_p, head_in, data["attention_mask"][hl], data["labels"][hl], weight)
                return value, gh, gx

            def no_head():
                return jnp.zeros((), jnp.float32), _zeros_like(head_p), jnp.zeros(hshape, jnp.float32)

            loss_m, g_head_m, g_final = jax.lax.cond(d == row["head_owner"], do_head, no_head)
            loss = loss + loss_m
            g_head = jax.tree.map(jnp.add, g_head, g_head_m)

            zero = lambda: jnp.zeros(hshape, jnp.float32)  # noqa: E731
            fwd_msg = jax.lax.cond(row["fwd_any"] > 0, lambda: jax.lax.ppermute(h_out, AXIS, fwd_perm), zero) if N > 1 else zero()
            bwd_msg = jax.lax.cond(row["bwd_any"] > 0, lambda: jax.lax.ppermute(g_h, AXIS, bwd_perm), zero) if N > 1 else zero()
            head_msg = jax.lax.switch(row["send_head"], [lambda x, k=k: shift(x, k) for k in range(N)], h_out)
            grad_msg = jax.lax.switch(row["send_grad"], [lambda x, k=k: shift(x, k) for k in range(N)], g_final)
            pending = ((fwd_msg, row["recv_act"][d]), (jnp.where(d == N - 1, grad_msg, bwd_msg), row["recv_grad"][d]))
            return (act, gin, stash, head_msg, pending, g_peft, g_head, loss), None

        nothing = (jnp.zeros(hshape, jnp.float32), jnp.asarray(M, jnp.int32))
        carry = (
            jnp.zeros((M + 1, *hshape), jnp.float32),
            jnp.zeros((M + 1, *hshape), jnp.float32),
            stash_in if stash_in else {k: jnp.zeros((S, n), k) for k, n in sizes.items()},
            jnp.zeros(hshape, jnp.float32),
            (nothing, nothing),
            _zeros_like(peft),
            _zeros_like(head_p),
            jnp.zeros((), jnp.float32),
        )
        rows = {k: jnp.asarray(v) for k, v in T.items()}
        (_, _, stash, *_, g_peft, g_head, loss), _ = jax.lax.scan(tick, carry, rows)
        return jax.lax.psum(loss, AXIS), jax.lax.psum(g_head, AXIS), g_peft, (stash if stash_in else {})
