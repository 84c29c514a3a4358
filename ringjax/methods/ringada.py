"""RingAda: adapters trained through a ring pipeline, unfrozen top-down by a schedule.

`RingAda` holds the training state and one compiled ring step per unfreeze depth (compiled on
first use); changing depth keeps the optimizer state, because every depth updates the same
trainable tree through `masked_apply` with its own layer mask (frozen adapters get exactly zero
update). With `compile_ahead` the next phase's step compiles on a helper thread, for each batch
shape seen, while the current phase trains, so a phase change need not stall for its compile. By
default only when the ring's devices are not CPUs: emulated CPU devices keep the host's cores
busy, and there the helper's compile only took their time (SST-2, 1,000 steps over 4 emulated
devices on 2 cores: 302.8 s with it, 303.2 s without; the steps beside each compile ran ~75%
slower).
`train_ringada` is the loop the CLI drives: it yields one metrics dict per step.

The global batch stream does not depend on the number of devices: each global batch is cut into
M microbatches and microbatch m is owned by device m % N, so runs with the same seed see the
same examples in the same order whatever N is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, reads_first_token
from ringjax.parallel.mesh import make_stage_mesh, put_tree, replicated
from ringjax.parallel.placement import Placement, plan_stages
from ringjax.parallel.ring import AXIS, RingPipeline
from ringjax.parallel.unfreeze import UnfreezeSchedule
from ringjax.peft.config import PeftConfig
from ringjax.peft.trainable import layer_mask, leaf_mask, merge, split
from ringjax.train.optim import masked_apply
from ringjax.train.step import TrainState, init_state


def local(x) -> np.ndarray:
    """Host copy of a replicated array, also in multi-process runs (where it is not fully addressable)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def make_ring_train_step(pipeline: RingPipeline, optimizer: optax.GradientTransformation, params_like: dict):
    """A jitted (state, frozen, data, stash) -> (state, {"loss"}, stash) step: the single-device
    step's update (`masked_apply` with the depth's layer mask) on the ring's loss and gradients.
    The residual stash (`pipeline.new_stash`) is donated and comes back for the next step, so it
    is not zero-filled and faulted in every step (MiniLM, 4 devices, all unfrozen: 0.671 s against
    0.741 s at M = 8, 32 x 64); stash None: the step zero-fills its own and returns None."""
    factors = layer_mask(params_like, pipeline.spec, pipeline.depth, pipeline.cfg.num_layers)

    def train_step(state: TrainState, frozen, data, stash=None):
        out = pipeline.loss_and_grads(state.trainable, frozen, data, stash)
        loss, grads = out[:2]
        present = jax.tree.map(lambda x: x is not None, state.trainable, is_leaf=lambda x: x is None)
        trainable_factors, _ = split(factors, present)
        trainable, opt_state = masked_apply(optimizer, grads, state.opt_state, state.trainable, trainable_factors)
        return TrainState(trainable, opt_state, state.step + 1), {"loss": loss}, (out[2] if stash is not None else None)

    everywhere = replicated(pipeline.mesh)
    return jax.jit(train_step, donate_argnums=(0, 3), out_shardings=(everywhere, everywhere, NamedSharding(pipeline.mesh, P(AXIS))),
                   compiler_options=pipeline.compiler_options)


class RingAda:
    """Training state plus one ring step per unfreeze depth."""

    def __init__(
        self,
        cfg: ModelConfig,
        spec: PeftConfig,
        head: HeadConfig,
        params: dict,
        *,
        devices: int,
        microbatches: int,
        unfreeze: UnfreezeSchedule | str = "all",
        optimizer: optax.GradientTransformation,
        stages: str | tuple[int, ...] | Callable[[int], tuple[int, ...]] | None = "equal",
        schedule: str = "1f1b",
        residuals: str = "keep",
        mesh=None,
        compiler_options: dict | None = None,
        compile_ahead: bool | None = None,
    ):
        self.cfg, self.spec, self.head, self.optimizer = cfg, spec, head, optimizer
        self.mesh = make_stage_mesh(devices) if mesh is None else mesh
        self.microbatches, self.stages, self.schedule, self.residuals = microbatches, stages, schedule, residuals
        self.compiler_options = compiler_options
        self.unfreeze = UnfreezeSchedule.parse(unfreeze, cfg.num_layers) if isinstance(unfreeze, str) else unfreeze
        self.params_like = params
        trainable, frozen = split(params, leaf_mask(params, spec))
        self.frozen = frozen
        self.state = put_tree(init_state(optimizer, trainable), self.mesh)
        self.history: list[float] = []
        self._steps: dict[int, tuple] = {}  # depth -> (pipeline, jitted step)
        self._placed: tuple[Placement, dict] | None = None
        # a step compiled ahead is cached by jax.jit, and the first call at its depth finds it there
        if compile_ahead is None:
            compile_ahead = self.mesh.devices.flat[0].platform != "cpu"
        self.compile_ahead = compile_ahead and jax.process_count() == 1
        self._ahead: dict[tuple, Future] = {}  # (depth, batch shapes) -> its compile on the helper thread
        self._ran: set[tuple] = set()  # (depth, batch shapes) already run
        self._stashes: dict[tuple, dict] = {}  # batch shapes -> the residual stash the last step returned
        self._stash_depth: int | None = None  # the depth those stashes belong to
        self._helper: ThreadPoolExecutor | None = None
        self.end_step: int | None = None  # phases from this step on are not compiled ahead (`train` sets it)

    # ---- phases -------------------------------------------------------------------------
    def placement(self, depth: int) -> Placement:
        """Stage sizes at `depth` ("balanced" moves blocks toward frozen stages as the depth grows;
        a callable, as `ringjax.parallel.placement.auto_stages` builds, maps the depth to sizes)."""
        if callable(self.stages):
            return plan_stages(self.cfg.num_layers, self.mesh.shape["stage"], self.stages(depth))
        return plan_stages(self.cfg.num_layers, self.mesh.shape["stage"], self.stages, depth=depth)

    def pipeline(self, depth: int) -> RingPipeline:
        return self._compiled(depth)[0]

    def _compiled(self, depth: int):
        if depth not in self._steps:
            pipe = RingPipeline(self.cfg, self.spec, self.head, self.mesh, self.placement(depth), self.microbatches,
                                depth, schedule=self.schedule, residuals=self.residuals,
                                compiler_options=self.compiler_options)
            self._steps[depth] = (pipe, make_ring_train_step(pipe, self.optimizer, self.params_like))
        return self._steps[depth]

    def _frozen_for(self, pipe: RingPipeline) -> dict:
        if self._placed is None or self._placed[0] != pipe.placement:  # weights move once per phase
            self._placed = (pipe.placement, pipe.place_frozen(self.frozen))
        return self._placed[1]

    @property
    def step(self) -> int:
        return int(local(self.state.step))

    def depth(self, step: int | None = None) -> int:
        return self.unfreeze.depth(self.step if step is None else step, self.history)

    # ---- training -----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a global batch (numpy arrays, leading axis B)."""
        step, depth = self.step, self.depth()
        pipe, fn = self._compiled(depth)
        start = time.perf_counter()
        data = pipe.shard_batch(batch)
        shapes = tuple(sorted((k, v.shape) for k, v in data.items()))
        ahead = self._ahead.pop((depth, shapes), None)
        if ahead is not None:
            ahead.exception()  # wait for it; had it failed, the call below compiles and says why
        if self._stash_depth != depth:  # each phase carries its own stashes, one per batch shape
            self._stashes, self._stash_depth = {}, depth
        stash = self._stashes.pop(shapes, None) or pipe.new_stash(self.state.trainable, self.frozen, data)
        self.state, metrics, self._stashes[shapes] = fn(self.state, self._frozen_for(pipe), data, stash)
        loss = float(local(metrics["loss"]))
        seconds = time.perf_counter() - start
        if (depth, shapes) not in self._ran:
            self._ran.add((depth, shapes))
            self._compile_next_phase(step, shapes, data)
        return {"step": step + 1, "loss": loss, "depth": depth, "stages": list(pipe.placement.sizes),
                "seconds": seconds}

    def _compile_next_phase(self, step: int, shapes: tuple, data: dict) -> None:
        """Start compiling, on the helper thread, the step of the depth the schedule reaches after
        `step` (before the current `train` call ends) for batches shaped like `data`."""
        depth = self.unfreeze.next_depth(step, self.end_step, self.history)
        if not self.compile_ahead or depth is None or (depth, shapes) in self._ahead or (depth, shapes) in self._ran:
            return
        pipe, fn = self._compiled(depth)
        like = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type), tree)
        args = (like(self.state), pipe.placed_frozen_like(self.frozen), like(data),
                pipe.stash_like(self.state.trainable, self.frozen, data))
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="ringada-compile-ahead")
        self._ahead[(depth, shapes)] = self._helper.submit(lambda: fn.lower(*args).compile())

    def observe_dev_loss(self, loss: float) -> None:
        """Record a dev-set loss (drives the `plateau` schedule)."""
        self.history.append(float(loss))

    def train(self, batches: Iterable[dict], steps: int | None = None,
              evaluate: Callable[[dict], dict] | None = None, eval_every: int = 0) -> Iterator[dict]:
        """Yield per-step metrics; every `eval_every` steps `evaluate(params)` (a dict with "loss")
        runs and its numbers join the metrics, its loss feeding the unfreeze schedule."""
        self.end_step = None if steps is None else self.step + steps
        try:
            for i, batch in enumerate(batches):
                if steps is not None and i >= steps:
                    return
                metrics = self.train_step(batch)
                if evaluate is not None and eval_every and metrics["step"] % eval_every == 0:
                    dev = evaluate(self.params())
                    self.observe_dev_loss(dev["loss"])
                    metrics.update({f"dev_{k}": v for k, v in dev.items()})
                yield metrics
        finally:
            if self._helper is not None:  # compiles not started are dropped; a running one finishes
                self._helper.shutdown(wait=False, cancel_futures=True)
                self._helper, self._ahead = None, {}

    # ---- parameters and checkpoints ---------------------------------------------------------
    def params(self) -> dict:
        """The full parameter tree (host arrays), as the single-device code takes it."""
        return merge(jax.tree.map(local, self.state.trainable), self.frozen)

    def state_dict(self) -> dict:
        """What a checkpoint needs: train state (host arrays) and the unfreeze phase."""
        return {"train_state": jax.tree.map(local, self.state),
                "unfreeze": self.unfreeze.state_dict(self.history, self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.unfreeze, self.history = UnfreezeSchedule.from_state_dict(state["unfreeze"])
        self.state = put_tree(TrainState(*state["train_state"]), self.mesh)  # a TrainState or its fields


def train_ringada(
    cfg: ModelConfig,
    spec: PeftConfig,
    head: HeadConfig,
    params: dict,
    batches: Iterable[dict],
    *,
    devices: int,
    microbatches: int,
    unfreeze: UnfreezeSchedule | str,
    optimizer: optax.GradientTransformation,
    steps: int | None = None,
    evaluate: Callable[[dict], dict] | None = None,
    eval_every: int = 0,
    **options,
) -> Iterator[dict]:
    """The RingAda loop: yields {"step", "loss", "depth", "stages", "seconds", dev_*} per step.

    `options` go to `RingAda` (stages, schedule, residuals, mesh). To keep the trained
    parameters, build `RingAda(...)` and iterate its `.train(...)`, then call `.params()`.
    """
    run = RingAda(cfg, spec, head, params, devices=devices, microbatches=microbatches, unfreeze=unfreeze,
                  optimizer=optimizer, **options)
    yield from run.train(batches, steps, evaluate, eval_every)


def ring_stages(config, model):
    """The `stages` RingAda takes for a run's `--placement`: "equal", "balanced", sizes like
    "2,2,1,1", or "auto": the optimal contiguous split of the analytic per-block costs at each
    unfreeze depth, over the `--fleet`'s device profiles when one is given (equal devices otherwise)."""
    if config.placement != "auto":
        return config.placement
    from ringjax.parallel.placement import auto_stages
    from ringjax.plan.profiles import load_fleet

    profiles = load_fleet(config.fleet) if config.fleet else None
    return auto_stages(model.config, model.peft_config, config.devices, max(1, config.batch_size // config.microbatches),
                       config.max_length, config.microbatches, profiles,
                       num_labels=model.head_config.num_labels,
                       first_only_top=reads_first_token(model.config, model.head_config))
