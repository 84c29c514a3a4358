"""CAFF: federated fine-tuning with constraint-aware layer selection.

Each client trains the largest top-t blocks (plus the head) that fit its memory, FLOPs-per-round
and upload budgets by the cost model (`ringjax.fl.costs`); clients that cannot even train the
head sit out. Among candidate pretrained models the server picks the one maximising the mean
trained depth, normalised as the fraction t / L of the candidate's blocks (excluded clients
count 0; ties go to the deeper model). Aggregation is layer-wise, each block averaged over the
clients that trained it, weighted by sample counts. The baselines (fedavg-full, fedlora,
uniform-t) run on the same machinery through `run_federated`.

Entry points: `train_caff` (model choice + the CAFF loop), `run_federated` (any method), and
`federated_from_files` (what `ringjax train --method caff|fedavg-full|fedlora|uniform-t ...`
calls: loads the model, the task and the fleet, and runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax

from ringjax.data.load import load_task_data
from ringjax.data.tasks import get_task
from ringjax.data.tokenize import Encoded, encode
from ringjax.errors import RingjaxError
from ringjax.fl.budgets import EXAMPLE, ClientBudgets, load_fleet
from ringjax.fl.costs import CostModel
from ringjax.fl.rounds import FederatedRun, FLConfig, run_federated
from ringjax.fl.selection import METHODS, choose_model
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig
from ringjax.models.hub import load_tokenizer
from ringjax.models.model import check_max_length, load_model

FEDERATED_METHODS = METHODS  # caff, fedavg-full, fedlora, uniform-t


def slice_top_blocks(cfg: ModelConfig, params: dict, keep: int) -> tuple[ModelConfig, dict]:
    """A smaller variant of a model keeping its top `keep` blocks (embeddings and head unchanged)."""
    L = cfg.num_layers
    if not 1 <= keep <= L:
        raise RingjaxError(f"cannot keep {keep} of {L} blocks; choose 1..{L}")
    blocks = jax.tree.map(lambda x: x[L - keep :], params["blocks"])
    peft = params.get("peft", {})
    if peft.get("blocks"):
        peft = {**peft, "blocks": jax.tree.map(lambda x: x[L - keep :], peft["blocks"])}
    return cfg.replace(num_layers=keep), {**params, "blocks": blocks, "peft": peft}


def candidate_models(cfg: ModelConfig, params: dict, keeps: tuple[int, ...], name: str = "model") -> dict[str, tuple[ModelConfig, dict]]:
    """{name: the model, f"{name}-top{k}": its top-k variant for each k < L in `keeps`}."""
    out = {}
    for k in keeps:
        out[name if k == cfg.num_layers else f"{name}-top{k}"] = (cfg, params) if k == cfg.num_layers else slice_top_blocks(cfg, params, k)
    return out


def train_caff(
    candidates: dict[str, tuple[ModelConfig, dict]],
    head: HeadConfig,
    train: Encoded,
    budgets: ClientBudgets,
    config: FLConfig = FLConfig(),
    dev: Encoded | None = None,
    task: str = "sst2",
    normalise: str = "fraction",
    mesh=None,
    log: Callable[[str], None] | None = print,
    on_round=None,
) -> tuple[str, dict[str, float], FederatedRun]:
    """Pick the candidate maximising mean trained depth, then run CAFF on it.

    Returns (chosen name, depth score per candidate, the run).
    """
    costs = {name: CostModel(cfg, head, config.workload) for name, (cfg, _) in candidates.items()}
    name, scores = choose_model(costs, budgets, normalise)
    if log:
        log(f"[caff] model choice by mean trained depth ({normalise}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" -> {name}")
    cfg, params = candidates[name]
    run = run_federated("caff", cfg, head, params, train, budgets, config, dev, task, mesh, log, on_round=on_round)
    return name, scores, run


def federated_from_files(
    method: str,
    fleet_path: str | Path,
    config: FLConfig,
    task: str = "sst2",
    data_dir: str | Path | None = None,
    model: str = "minilm",
    candidate_keeps: tuple[int, ...] = (),
    max_train_examples: int | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> FederatedRun:
    """Load model, data and fleet, run `method`, and write OUT/federated.json when `out` is given.

    `candidate_keeps` (CAFF only) adds top-k variants of the model as candidates, e.g. (6, 3).
    """
    if method not in FEDERATED_METHODS:
        raise RingjaxError(f"unknown federated method {method!r}; choose one of {FEDERATED_METHODS}")
    spec = get_task(task)
    head = HeadConfig("regression" if spec.is_regression else "classification", max(spec.num_labels, 2))
    loaded = load_model(model, head=head, peft="top-t", seed=config.seed)
    check_max_length(loaded.config, config.max_length)
    tokenizer = load_tokenizer(loaded.directory)
    train = encode(load_task_data(task, data_dir, "train", max_train_examples, config.seed), tokenizer, config.max_length, loaded.config.max_length)
    dev = encode(load_task_data(task, data_dir, "dev"), tokenizer, config.max_length, loaded.config.max_length)
    budgets = load_fleet(fleet_path).assign(config.num_clients, config.seed)
    params = loaded.tree()
    if method == "caff" and candidate_keeps:
        _, _, run = train_caff(candidate_models(loaded.config, params, candidate_keeps, model), head, train, budgets, config, dev, task, log=log)
    else:
        run = run_federated(method, loaded.config, head, params, train, budgets, config, dev, task, log=log)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        run.write(Path(out) / "federated.json")
    return run


def tier_depths(run: FederatedRun, budgets: ClientBudgets) -> dict[str, list[int]]:
    """Distinct trained depths per fleet tier (-1: excluded): for reports."""
    depths = run.plan.depths()
    out: dict[str, set] = {}
    for i in range(len(budgets)):
        out.setdefault(budgets.tier_name(i), set()).add(int(depths[i]))
    return {k: sorted(v) for k, v in out.items()}


def parse_keeps(text: str | None, num_layers: int) -> tuple[int, ...]:
    """`--candidates 6,3` -> (6, 3): block counts of the top-k variants CAFF chooses among."""
    if not text:
        return ()
    try:
        keeps = tuple(sorted({int(k) for k in str(text).split(",") if k.strip()}, reverse=True))
    except ValueError:
        raise RingjaxError(f"--candidates takes block counts like 6,3, got {text!r}") from None
    bad = [k for k in keeps if not 1 <= k <= num_layers]
    if bad:
        raise RingjaxError(f"--candidates {text}: the model has {num_layers} blocks, so each count must be in 1..{num_layers}")
    return keeps


def train_federated(c) -> dict:
    """`ringjax train --method caff|fedavg-full|fedlora|uniform-t --fleet F --clients C --per-round S
    --rounds R --local-steps E [--alpha A] [--candidates 6,3] [--devices N]`, from its `TrainConfig`.

    `--fleet` is a budget-tier file (`ringjax.fl.budgets`); `--batch-size` is each client's local
    batch; `--alpha` is the Dirichlet label skew (0: IID); `--eval-every` counts rounds (0: every
    round); `--devices N` shards each group of clients over N devices; `--candidates` (CAFF only)
    adds top-k variants of the model for the server to choose among. Writes OUT/metrics.jsonl (one
    record per round), OUT/federated.json (the plan, measured peaks, every round), the aggregated
    trainable parameters and OUT/summary.json. No checkpoints: a run does not resume.
    Cheap checks (flags, the fleet file) come before the model and data are loaded.
    """
    import dataclasses
    import time

    import numpy as np
    from jax.sharding import Mesh
    from tqdm.auto import tqdm

    from ringjax.peft import leaf_mask
    from ringjax.peft.export import save_trainable
    from ringjax.train.trainer import MetricsLog, prepare, write_summary

    method = c.method
    if method not in FEDERATED_METHODS:
        raise RingjaxError(f"unknown federated method {method!r}; choose one of {FEDERATED_METHODS}")
    if c.fleet is None:
        raise RingjaxError(f"--method {method} needs --fleet FILE with the clients' budget tiers, e.g. {EXAMPLE}")
    if c.resume:
        raise RingjaxError(f"--method {method} runs do not checkpoint or resume: start a fresh run (without --resume)")
    if c.rounds < 1:
        raise RingjaxError(f"--rounds must be at least 1, got {c.rounds}")
    if c.alpha is not None and c.alpha < 0:
        raise RingjaxError(f"--alpha must be positive (Dirichlet label skew) or 0 for an IID split, got {c.alpha}")
    if c.candidates and method != "caff":
        raise RingjaxError(f"--candidates is CAFF's model choice; drop it for --method {method}")
    if c.devices > len(jax.devices()):
        raise RingjaxError(f"--devices {c.devices} but only {len(jax.devices())} are visible; lower --devices")
    fl = FLConfig(
        num_clients=c.clients, per_round=c.per_round, rounds=c.rounds, local_steps=c.local_steps,
        batch_size=c.batch_size, max_length=c.max_length, alpha=c.alpha if c.alpha else None, seed=c.seed,
        lr=c.learning_rate, lora_lr=c.learning_rate, weight_decay=c.weight_decay,
        client_chunk=c.devices * -(-8 // c.devices), eval_every=c.eval_every or 1,
        server_momentum=c.server_momentum, server_lr=c.server_lr, server_ema=c.server_ema, logit_adjust=c.logit_adjust,
        sampling=c.sampling,
    )
    budgets = load_fleet(c.fleet).assign(fl.num_clients, fl.seed)

    run = prepare(c)
    m = run.model
    keeps = parse_keeps(c.candidates, m.config.num_layers)
    if c.clients > len(run.train):
        raise RingjaxError(f"{len(run.train)} training examples cannot be split over {c.clients} clients; lower --clients or raise --max-train-examples")
    mesh = Mesh(np.array(jax.devices()[: c.devices]), ("clients",)) if c.devices > 1 else None

    records = MetricsLog(run.out / "metrics.jsonl")
    bar = tqdm(total=fl.rounds, disable=not c.progress, desc=f"{method} {c.task}", unit="round")
    say = tqdm.write if c.progress else (lambda text: print(text, flush=True))
    metric_name = run.task.metric

    def on_round(r, plan):
        records.write({**dataclasses.asdict(r), "dev_metric_name": metric_name, "excluded": plan.excluded})
        bar.update(1)
        bar.set_postfix(**({"loss": f"{r.train_loss:.4f}"} if r.train_loss is not None else {}),
                        **({metric_name: f"{r.dev_metric:.4f}"} if r.dev_metric is not None else {}))

    began = time.perf_counter()
    params = m.tree()
    chosen_model, scores = c.model, None
    try:
        if keeps:
            candidates = candidate_models(m.config, params, tuple(sorted({*keeps, m.config.num_layers}, reverse=True)), c.model)
            chosen_model, scores, fed = train_caff(candidates, m.head_config, run.train, budgets, fl, run.dev, c.task,
                                                   mesh=mesh, log=say, on_round=on_round)
        else:
            fed = run_federated(method, m.config, m.head_config, params, run.train, budgets, fl, run.dev, c.task,
                                mesh, say, on_round=on_round)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - began
    fed.write(run.out / "federated.json")
    last = fed.rounds[-1]  # the last round is always evaluated
    dev = {metric_name: last.dev_metric, "loss": last.dev_loss}
    if chosen_model == c.model:  # a top-k variant does not fit this run's model: `ringjax eval` could not load it
        save_trainable(run.out, fed.params, leaf_mask(params, m.peft_config), m.config, m.peft_config, m.head_config)
    return write_summary(run, {
        "method": method, "task": c.task, "model": c.model, "dev_metric": dev[metric_name], "dev_metric_name": metric_name,
        "dev": dev, "train_seconds": train_seconds, "rounds": fl.rounds, "clients": fl.num_clients,
        "per_round": fl.per_round, "sampling": fl.sampling, "local_steps": fl.local_steps, "alpha": fl.alpha,
        "total_bytes_uploaded": last.total_bytes_uploaded, "excluded": fed.plan.excluded,
        "participating": len(fed.plan.eligible), "plan": fed.plan.summary(), "tier_depths": tier_depths(fed, budgets),
        "mean_depth": float(np.mean([r.mean_depth for r in fed.rounds])),
        "measured_peak_bytes": fed.measured_peak_bytes, "final_loss": last.train_loss,
        **({"chosen_model": chosen_model, "candidate_scores": scores} if scores is not None else {}),
    })


__all__ = ["FEDERATED_METHODS", "candidate_models", "federated_from_files", "parse_keeps", "run_federated", "slice_top_blocks",
           "tier_depths", "train_caff", "train_federated"]
