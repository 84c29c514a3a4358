"""The single-device training loop and the pieces every method's loop shares:
run preparation (model, tokenizer, data), evaluation, the metrics log, and checkpoints."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from ringjax.data import BatchStream, Encoded, encode, eval_batches, get_task, load_task_data, task_metric
from ringjax.errors import RingjaxError
from ringjax.fl.selection import METHODS as FL_METHODS
from ringjax.models import HeadConfig, Model, load_model, load_tokenizer
from ringjax.models.model import check_max_length
from ringjax.models.precision import NARROW_KINDS, cast_frozen_kernels, check_compute_dtype
from ringjax.parallel.mesh import is_primary
from ringjax.peft import PeftConfig, leaf_mask, merge, preset, split
from ringjax.peft.export import save_trainable
from ringjax.peft.trainable import count, layer_mask
from ringjax.train.checkpoint import Checkpointer, run_identity
from ringjax.train.config import TrainConfig
from ringjax.train.optim import OptimConfig, make_optimizer
from ringjax.train.step import TrainState, init_state, make_eval_step, make_train_step

SINGLE_DEVICE_METHODS = ("full", "lora", "houlsby", "pfeiffer", "parallel", "top-t")
# Federated simulations (ringjax.methods.caff) run --rounds, not --steps / --epochs.
FEDERATED_METHODS = FL_METHODS
_FEDERATED_PEFT = {"caff": "top-t", "uniform-t": "top-t", "fedavg-full": "full", "fedlora": "lora"}


@dataclass
class Run:
    """Everything a method's loop needs, prepared once."""

    config: TrainConfig
    model: Model
    train: Encoded
    dev: Encoded
    out: Path

    @property
    def task(self):
        return get_task(self.config.task)

    def batch_stream(self) -> BatchStream:
        return BatchStream(self.train, self.config.batch_size, seed=self.config.seed)

    def total_steps(self) -> int:
        c = self.config
        if c.steps is not None:
            return c.steps
        return max(1, int(c.epochs * self.batch_stream().steps_per_epoch))


def peft_for(config: TrainConfig) -> PeftConfig:
    check_compute_dtype(config.compute_dtype)
    tuned = [f"--{flag}" for flag, value in (("train-norms", config.train_norms), ("reduction-factor", config.reduction_factor),
                                              ("lora-rank", config.lora_rank)) if value]
    if tuned and config.method not in ("houlsby", "pfeiffer", "lora"):
        raise RingjaxError(f"{', '.join(tuned)} apply to the single-device adapter and LoRA methods "
                           f"(houlsby, pfeiffer, lora), not --method {config.method}; drop them")
    name = _FEDERATED_PEFT[config.method] if config.method in FEDERATED_METHODS else (
        config.method if config.method in SINGLE_DEVICE_METHODS else config.adapter)
    if config.compute_dtype != "float32" and not (config.method in SINGLE_DEVICE_METHODS and preset(name).kind in NARROW_KINDS):
        narrow = [m for m in SINGLE_DEVICE_METHODS if preset(m).kind in NARROW_KINDS]
        raise RingjaxError(f"--compute-dtype {config.compute_dtype} applies to the single-device methods "
                           f"{', '.join(narrow)}, not --method {config.method}; drop it")
    if config.adapter_init_std is not None and preset(name).kind != "adapter":
        raise RingjaxError(f"--adapter-init-std sets bottleneck adapters' init (houlsby, pfeiffer adapters), "
                           f"not --method {config.method}; drop it")
    if config.method in FEDERATED_METHODS:
        return preset(name)
    if config.side_every is not None:
        if name != "parallel":
            raise RingjaxError(f"--side-every sets PAC's side network (--method pac or parallel), not --method {config.method}; drop it")
        return preset(name, side_every=config.side_every)
    if name == "top-t":
        return preset(name, top_t=config.top_t)
    overrides = {"train_norms": True} if config.train_norms else {}
    if config.reduction_factor is not None:
        overrides["reduction_factor"] = config.reduction_factor
    if config.adapter_init_std is not None:
        overrides["init_std"] = config.adapter_init_std
    if config.lora_rank is not None:
        overrides.update(lora_rank=config.lora_rank, lora_alpha=2.0 * config.lora_rank)
    if config.lora_targets is not None:
        if name != "lora":
            raise RingjaxError(f"--lora-targets applies to --method lora, not --method {config.method}; drop it")
        overrides["lora_targets"] = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip())
    return preset(name, **overrides)


def prepare(config: TrainConfig) -> Run:
    if config.method in FEDERATED_METHODS:
        if config.steps is not None or config.epochs is not None:
            raise RingjaxError(f"--method {config.method} runs --rounds R of --local-steps E per client, not --steps / --epochs; drop them")
    elif (config.steps is None) == (config.epochs is None):
        raise RingjaxError("give exactly one of --steps N or --epochs E")
    task = get_task(config.task)
    out = Path(config.out)
    if not config.resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise RingjaxError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if is_primary():  # in a multi-process run, process 0 writes the run's files
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    head = HeadConfig("regression" if task.is_regression else "classification", max(task.num_labels, 2),
                      pooling=config.pooling)
    model = load_model(config.model, head=head, peft=peft_for(config), seed=config.seed)
    check_max_length(model.config, config.max_length)
    tokenizer = load_tokenizer(model.directory)
    encoded = {
        split_name: encode(
            load_task_data(config.task, config.data_dir, split_name, limit, config.seed),
            tokenizer, config.max_length, model.config.max_length,
        )
        for split_name, limit in (("train", config.max_train_examples), ("dev", config.max_eval_examples))
    }
    return Run(config, model, encoded["train"], encoded["dev"], out)


def evaluate(run: Run, params, eval_step=None, batch_size: int = 64) -> dict:
    """Dev metrics of `params` (the task's main metric first, plus dev loss)."""
    m = run.model
    eval_step = eval_step or make_eval_step(m.config, m.peft_config, m.head_config)
    preds = np.zeros(len(run.dev), np.float32 if run.task.is_regression else np.int32)
    losses, weights = [], []
    for batch in eval_batches(run.dev, batch_size):
        p, loss = eval_step(params, {k: v for k, v in batch.items() if k != "index"})
        real = batch["index"] >= 0
        preds[batch["index"][real]] = np.asarray(p)[real]
        losses.append(float(loss) * real.sum())
        weights.append(real.sum())
    metrics = task_metric(run.config.task, preds, run.dev.labels)
    return {**metrics, "loss": sum(losses) / max(sum(weights), 1)}


class MetricsLog:
    """JSON lines in OUT/metrics.jsonl; on resume, records past the checkpoint are dropped, and so
    is the final evaluation (step `final_step`), which the resumed run writes again.
    Disabled (writes nothing) outside process 0 of a multi-process run."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True, final_step: int | None = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            def kept(record):
                step = record.get("step", 0)
                return step <= resume_step and not (step == final_step and "dev" in record)

            keep = [l for l in path.read_text().splitlines() if l and kept(json.loads(l))]
            path.write_text("".join(l + "\n" for l in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def write_summary(run: Run, summary: dict) -> dict:
    if is_primary():
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def optim_config(config: TrainConfig) -> OptimConfig:
    return OptimConfig(lr=config.learning_rate, weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio)


class SingleDevice:
    """Plain jitted training on one device; the trainer protocol `fit` drives:
    `train_step(batch) -> metrics`, `params()`, `depth()`, `state_dict()`, `load_state_dict()`."""

    def __init__(self, run: Run, optimizer):
        m = run.model
        params = m.tree()
        trainable, frozen = split(params, leaf_mask(params, m.peft_config))
        self.frozen = cast_frozen_kernels(frozen, run.config.compute_dtype, m.peft_config)
        self.state = init_state(optimizer, trainable)
        self._depth = m.depth
        self._step = make_train_step(m.config, m.peft_config, m.head_config, optimizer, params, self._depth,
                                     compute_dtype=run.config.compute_dtype)

    def depth(self) -> int:
        return self._depth

    def train_step(self, batch: dict) -> dict:
        self.state, metrics = self._step(self.state, self.frozen, batch)
        return {"loss": float(metrics["loss"])}

    def params(self) -> dict:
        return merge(self.state.trainable, self.frozen)

    def state_dict(self) -> dict:
        return {"train_state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainState(*state["train_state"])


def fit(run: Run, trainer, total: int, extra_summary: dict | None = None) -> dict:
    """The loop every batch-stream method shares: metrics log, progress, periodic evaluation,
    orbax checkpoints with exact resume, and the final summary and trainable export."""
    c, m = run.config, run.model
    ckpt = Checkpointer(run.out)
    identity = run_identity(c) | {"learning_rate": c.learning_rate}
    start = 0
    if c.resume:
        saved = trainer.state_dict()
        restored, record = ckpt.restore(saved["train_state"], identity)
        trainer.load_state_dict({**record.get("extra", {}), "train_state": restored})
        start = record["data_position"]
    primary = is_primary()  # every process trains and checkpoints (orbax saves collectively); process 0 writes logs
    log = MetricsLog(run.out / "metrics.jsonl", start if c.resume else None, enabled=primary, final_step=total)
    eval_step = make_eval_step(m.config, m.peft_config, m.head_config)

    def save(step):
        state = trainer.state_dict()
        extra = {k: v for k, v in state.items() if k != "train_state"}
        ckpt.save(step, state["train_state"], {"data_position": step, "seed": c.seed, "identity": identity, "extra": extra})

    began = time.perf_counter()
    loss = None
    bar = tqdm(total=total, initial=start, disable=not (c.progress and primary), desc=f"{c.method} {c.task}", unit="step")
    for step, batch in enumerate(run.batch_stream().batches(start=start, stop=total), start=start + 1):
        metrics = trainer.train_step({k: v for k, v in batch.items() if k != "index"})
        loss = metrics["loss"]
        log.write({**metrics, "step": step})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if c.eval_every and step % c.eval_every == 0 and step < total:
            dev = evaluate(run, trainer.params(), eval_step)
            if hasattr(trainer, "observe_dev_loss"):  # drives plateau unfreezing
                trainer.observe_dev_loss(dev["loss"])
            log.write({"step": step, "dev": dev})
        if c.checkpoint_every and step % c.checkpoint_every == 0:
            save(step)
    bar.close()
    train_seconds = time.perf_counter() - began
    final_params = trainer.params()
    dev = evaluate(run, final_params, eval_step)
    log.write({"step": total, "dev": dev})
    params = m.tree()
    if primary:
        save_trainable(run.out, final_params, leaf_mask(params, m.peft_config), m.config, m.peft_config, m.head_config)
    if c.checkpoint_every and total % c.checkpoint_every:  # otherwise the loop saved step `total` already
        save(total)
    factors = layer_mask(params, m.peft_config, trainer.depth(), m.config.num_layers)
    return write_summary(run, {
        "method": c.method, "task": c.task, "model": c.model,
        "dev_metric": dev[run.task.metric], "dev_metric_name": run.task.metric, "dev": dev,
        "train_seconds": train_seconds, "steps": total, "trainable_params": count(params, factors),
        "final_loss": loss, **(extra_summary or {}),
    })


def train_single_device(run: Run) -> dict:
    total = run.total_steps()
    return fit(run, SingleDevice(run, make_optimizer(optim_config(run.config), total)), total)
