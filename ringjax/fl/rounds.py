"""The federated loop: sample clients, run their local jobs vectorised, aggregate, evaluate.

`run_federated(method, ...)` runs CAFF or a baseline on the same machinery:
- "caff": each client trains its largest affordable top-t (selection.plan_clients);
- "uniform-t": everyone trains the weakest participating client's t;
- "fedavg-full": full fine-tuning, only clients whose budgets afford it;
- "fedlora": LoRA in every block plus the head, only clients that afford it (its memory
  holds every block's activations, since gradients reach the lowest block).
Sampling (`FLConfig.sampling`), seeded by (seed, round): "eligible" draws `per_round` of the
clients that can take part (those that cannot are never drawn, so every round has `per_round`
participants); "all" draws `per_round` of all clients and those that cannot afford the method's
job sit out that round, so every method sees the same draw and a baseline only a few clients
afford trains on fewer clients per round (a round with none leaves the server model as it was).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ringjax.data.batching import eval_batches
from ringjax.data.metrics import main_metric_name, task_metric
from ringjax.data.partition import partition
from ringjax.data.tokenize import Encoded
from ringjax.errors import RingjaxError
from ringjax.fl.aggregation import Aggregator, moving_average, server_momentum
from ringjax.fl.budgets import ClientBudgets
from ringjax.fl.clients import (
    FLModel,
    GroupRunner,
    LocalJob,
    bucket_for,
    chunk_sizes,
    client_example_rows,
    gather,
    label_log_prior,
    local_optimizer,
    measured_peak_bytes,
    split_params,
    tree_bytes,
)
from ringjax.fl.costs import CostModel, Workload
from ringjax.fl.selection import METHODS, ClientPlan, plan_clients, verify_memory
from ringjax.models.backbone import forward
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, predictions
from ringjax.peft.config import PeftConfig
from ringjax.peft.modules import init_peft


SAMPLING = ("eligible", "all")


@dataclass(frozen=True)
class FLConfig:
    num_clients: int = 100
    per_round: int = 10
    rounds: int = 20
    local_steps: int = 5
    batch_size: int = 16
    max_length: int = 64  # the padded length budgets are planned for; batches use the smallest bucket that fits
    buckets: tuple[int, ...] = (16, 32, 64)
    alpha: float | None = 0.5  # Dirichlet label skew; None: IID
    seed: int = 0
    lr: float = 5e-5  # top-t and full jobs
    lora_lr: float = 5e-4
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    server_momentum: float = 0.0  # FedAvgM's beta: 0 is plain averaging
    server_lr: float = 1.0  # the server moves by server_lr x the (momentum of the) round's change
    # the model evaluated and returned is an exponential moving average of the rounds' server models
    # with this decay (0: the latest); training always continues from the latest
    server_ema: float = 0.0
    # classification: clients train on logits + logit_adjust x log(their label prior) (balanced
    # softmax / FedLC calibration against label skew, `clients.label_log_prior`); 0: plain loss
    logit_adjust: float = 0.0
    client_chunk: int = 8  # clients per compiled group call (a multiple of the mesh size)
    sampling: str = "eligible"  # eligible | all: whom each round draws from (module docstring)
    eval_every: int = 1
    eval_batch_size: int = 128
    verify_memory: bool = True  # compile each distinct job once and check measured peak bytes
    compiler_options: tuple[tuple[str, object], ...] = ()  # XLA options for the group executables

    def __post_init__(self):
        if self.per_round < 1 or self.num_clients < 1 or self.rounds < 0 or self.local_steps < 1 or self.batch_size < 1:
            raise RingjaxError("clients, per-round, local steps and batch size must be positive (rounds >= 0)")
        if not 0.0 <= self.server_momentum < 1.0:
            raise RingjaxError(f"server momentum must be in [0, 1), got {self.server_momentum}")
        if not 0.0 < self.server_lr <= 1.0:
            raise RingjaxError(f"server lr must be in (0, 1], got {self.server_lr}")
        if not 0.0 <= self.server_ema < 1.0:
            raise RingjaxError(f"server EMA decay must be in [0, 1) (0: evaluate the latest model), got {self.server_ema}")
        if self.logit_adjust < 0.0:
            raise RingjaxError(f"logit adjustment must be >= 0 (0: plain cross-entropy), got {self.logit_adjust}")
        if self.sampling not in SAMPLING:
            raise RingjaxError(f"unknown sampling {self.sampling!r}; choose one of {SAMPLING}")
        if self.per_round > self.num_clients:
            raise RingjaxError(f"cannot sample {self.per_round} clients per round from {self.num_clients}; lower --per-round")
        if self.max_length not in self.buckets:
            object.__setattr__(self, "buckets", tuple(sorted({*(b for b in self.buckets if b < self.max_length), self.max_length})))

    @property
    def workload(self) -> Workload:
        return Workload(self.batch_size, self.max_length, self.local_steps)


@dataclass
class RoundMetrics:
    round: int
    participants: int
    bytes_uploaded: int
    total_bytes_uploaded: int
    mean_depth: float  # trained blocks per participant (full and LoRA count every block)
    mean_depth_fraction: float  # the same over the model's block count
    train_loss: float | None  # None in a round nobody took part in ("all" sampling)
    dev_metric: float | None
    dev_loss: float | None
    train_seconds: float
    eval_seconds: float
    clients: list[int] = field(default_factory=list)  # the participating clients' ids


@dataclass
class FederatedRun:
    method: str
    plan: ClientPlan
    metric_name: str
    rounds: list[RoundMetrics]
    params: dict = field(repr=False)  # the served model: the latest, or its moving average under server_ema
    measured_peak_bytes: dict[str, int] = field(default_factory=dict)
    compiles: int = 0  # group executables this run compiled (others came from the process cache)
    executables: int = 0  # distinct group executables it ran

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "metric": self.metric_name,
            "plan": self.plan.summary(),
            "excluded_clients": self.plan.excluded,
            "measured_peak_bytes": self.measured_peak_bytes,
            "compiles": self.compiles,
            "executables": self.executables,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
        }

    def write(self, path) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_json(), fh, indent=1)


def eval_spec(method: str, model: FLModel) -> PeftConfig:
    return model.lora if method == "fedlora" else PeftConfig(kind="top-t")


def make_evaluator(model: FLModel, spec: PeftConfig, task: str, batch_size: int, buckets: tuple[int, ...]):
    """evaluate(params, dev) -> (metric dict, mean loss) over every dev example once."""
    from ringjax.models.heads import example_losses

    @jax.jit
    def step(params, batch):
        logits = forward(model.cfg, spec, model.head, params, batch).logits
        return predictions(model.head, logits), example_losses(model.head, logits, batch["labels"])

    def evaluate(params, dev: Encoded):
        preds, labels, losses = [], [], []
        for batch in eval_batches(dev, batch_size, buckets=buckets):
            real = batch["index"] >= 0
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
            p, l = step(params, inputs)
            preds.append(np.asarray(p)[real])
            losses.append(np.asarray(l)[real])
            labels.append(batch["labels"][real])
        preds, labels, losses = map(np.concatenate, (preds, labels, losses))
        return task_metric(task, preds, labels), float(losses.mean())

    return evaluate


def ensure_lora(params: dict, model: FLModel, seed: int) -> dict:
    """Params with LoRA factors in every block (zero B: the model's function is unchanged)."""
    if params.get("peft", {}).get("blocks", {}).get("lora"):
        return params
    from ringjax.models import backbone

    peft = init_peft(model.lora, params["blocks"], model.cfg.hidden_size, jax.random.key(seed), backbone.arch(model.cfg).DEFAULT_LORA_TARGETS)
    return {**params, "peft": peft}


def run_round(
    server: dict,
    chosen: np.ndarray,
    plan: ClientPlan,
    runner: GroupRunner,
    train: Encoded,
    parts: list[np.ndarray],
    config: FLConfig,
    round_index: int,
) -> tuple[dict, list[float]]:
    """One round: the chosen clients' local jobs, grouped by job and vectorised, then aggregation.

    Returns the new server params and each client's mean local loss. A client's examples are
    drawn by (seed, round, client), so the result does not depend on how clients are grouped.
    """
    L = plan.num_layers
    sizes = np.array([len(p) for p in parts])
    num_labels = runner.model.head.num_labels
    groups: dict[LocalJob, list[int]] = defaultdict(list)
    for c in chosen:
        groups[plan.jobs[c]].append(int(c))
    agg = Aggregator(server, L)
    losses: list[float] = []
    for job in sorted(groups, key=lambda j: (j.kind, j.depth)):
        clients = groups[job]
        trainable, frozen = split_params(server, job, L)
        pos = 0
        for size in chunk_sizes(len(clients), config.client_chunk, runner.multiple):
            members = clients[pos : pos + size]
            pos += len(members)
            rows = [
                parts[c][client_example_rows(sizes, c, config.local_steps, config.batch_size, np.random.default_rng((config.seed, round_index, c)))]
                for c in members
            ]
            rows += [rows[0]] * (size - len(members))
            rows = np.stack(rows)
            seq = bucket_for(int(min(train.lengths[rows].max(), config.max_length)), config.buckets)
            weights = np.zeros(size, np.float32)
            weights[: len(members)] = sizes[members]
            batches = gather(train, rows, seq)
            if config.logit_adjust:
                priors = [label_log_prior(train.labels[parts[c]], num_labels) for c in members]
                priors += [priors[0]] * (size - len(members))
                offsets = config.logit_adjust * np.stack(priors)[:, None, None, :]
                batches["logit_offset"] = np.broadcast_to(offsets, (*rows.shape, num_labels)).astype(np.float32)
            sums, total, group_losses = runner.run(job, trainable, frozen, batches, weights)
            agg.add(job, sums, total)
            losses.extend(np.asarray(group_losses)[: len(members)].tolist())
    return agg.result(), losses


def sample_clients(eligible: np.ndarray, per_round: int, seed: int, round_index: int, num_clients: int | None = None) -> np.ndarray:
    """The round's participants, seeded by (seed, round): `per_round` eligible clients (all of them
    when fewer); with `num_clients` ("all" sampling), the eligible among `per_round` drawn from all."""
    rng = np.random.default_rng((seed, round_index))
    if num_clients is not None:
        return np.intersect1d(rng.choice(num_clients, per_round, replace=False), eligible)
    return np.sort(rng.choice(eligible, min(per_round, len(eligible)), replace=False))


def run_federated(
    method: str,
    cfg: ModelConfig,
    head: HeadConfig,
    params: dict,
    train: Encoded,
    budgets: ClientBudgets,
    config: FLConfig = FLConfig(),
    dev: Encoded | None = None,
    task: str = "sst2",
    mesh: Mesh | None = None,
    log: Callable[[str], None] | None = print,
    partitions: list[np.ndarray] | None = None,
    on_round: Callable[[RoundMetrics, ClientPlan], None] | None = None,
) -> FederatedRun:
    """Run `config.rounds` rounds of `method`; returns per-round metrics and the final params.

    `on_round(metrics, plan)` is called after each round (metrics logs, progress bars).
    """
    if method not in METHODS:
        raise RingjaxError(f"unknown federated method {method!r}; choose one of {METHODS}")
    if len(budgets) != config.num_clients:
        raise RingjaxError(f"{len(budgets)} client budgets for {config.num_clients} clients")
    say = log or (lambda _: None)
    if config.logit_adjust and head.kind != "classification":
        raise RingjaxError(f"--logit-adjust calibrates a classifier's logits; this task's head is {head.kind!r}: drop --logit-adjust")
    model = FLModel(cfg, head)
    L = cfg.num_layers
    if method == "fedlora":
        params = ensure_lora(params, model, config.seed)
    optimizers = {
        "top-t": local_optimizer(config.lr, config.weight_decay, config.clip_norm),
        "full": local_optimizer(config.lr, config.weight_decay, config.clip_norm),
        "lora": local_optimizer(config.lora_lr, config.weight_decay, config.clip_norm),
    }
    costs = CostModel(cfg, head, config.workload, model.lora)
    plan = plan_clients(method, costs, budgets)
    measured: dict[LocalJob, int] = {}
    if config.verify_memory:
        plan, measured = verify_memory(
            plan, budgets, lambda job: measured_peak_bytes(model, job, optimizers[job.kind], params, config.batch_size, config.max_length,
                                                     head.num_labels if config.logit_adjust else 0)
        )
    eligible = plan.eligible
    say(f"[{method}] {plan.summary()}")
    if len(eligible) == 0:
        raise RingjaxError(f"{method}: no client's budgets afford even its smallest job; raise the fleet's budgets or use a smaller model")

    parts = partitions if partitions is not None else partition(train.labels, config.num_clients, config.alpha, config.seed)
    if len(parts) != config.num_clients:
        raise RingjaxError(f"{len(parts)} data partitions for {config.num_clients} clients")
    runner = GroupRunner(model, optimizers, mesh, compiler_options=dict(config.compiler_options))
    evaluate = make_evaluator(model, eval_spec(method, model), task, config.eval_batch_size, config.buckets) if dev is not None else None
    upload_of = {job: tree_bytes(split_params(jax.eval_shape(lambda p: p, params), job, L)[0]) for job in set(j for j in plan.jobs if j is not None)}
    metric_name = main_metric_name(task) if dev is not None else ""

    history: list[RoundMetrics] = []
    total_bytes = 0
    server, velocity, served = params, None, params  # served: the model evaluated and returned
    for r in range(1, config.rounds + 1):
        start = time.perf_counter()
        chosen = sample_clients(eligible, config.per_round, config.seed, r, config.num_clients if config.sampling == "all" else None)
        averaged, losses = run_round(server, chosen, plan, runner, train, parts, config, r)
        if config.server_momentum or config.server_lr != 1.0:
            server, velocity = server_momentum(server, averaged, velocity, config.server_momentum, config.server_lr)
        else:
            server = averaged
        served = moving_average(served, server, config.server_ema) if config.server_ema and r > 1 else server
        jax.block_until_ready(served)
        train_seconds = time.perf_counter() - start
        round_bytes = int(sum(upload_of[plan.jobs[c]] for c in chosen))
        total_bytes += round_bytes
        depths = np.array([plan.jobs[c].depth for c in chosen] or [0], float)
        metric = dev_loss = None
        eval_seconds = 0.0
        if evaluate is not None and (r % config.eval_every == 0 or r == config.rounds):
            t0 = time.perf_counter()
            scores, dev_loss = evaluate(served, dev)
            metric = scores[metric_name]
            eval_seconds = time.perf_counter() - t0
        m = RoundMetrics(r, len(chosen), round_bytes, total_bytes, float(depths.mean()), float(depths.mean() / L), float(np.mean(losses)) if losses else None, metric, dev_loss, train_seconds, eval_seconds,
                         [int(c) for c in chosen])
        history.append(m)
        if on_round is not None:
            on_round(m, plan)
        say(
            f"[{method}] round {r}: {len(chosen)} clients, depth {m.mean_depth:.2f}"
            + (f", loss {m.train_loss:.4f}" if m.train_loss is not None else " (the server model is unchanged)")
            + (f", dev {metric_name} {metric:.4f}" if metric is not None else "")
            + f", uploaded {round_bytes / 1e6:.1f} MB ({total_bytes / 1e6:.1f} MB total), {train_seconds:.1f}+{eval_seconds:.1f} s"
        )
    peaks = {f"{j.kind}-{j.depth}": b for j, b in sorted(measured.items(), key=lambda kv: (kv[0].kind, kv[0].depth))}
    return FederatedRun(method, plan, metric_name, history, served, peaks, runner.compiles, len(runner.shapes_used))
