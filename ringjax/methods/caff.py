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
from ringjax.fl.budgets import ClientBudgets, load_fleet
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
) -> tuple[str, dict[str, float], FederatedRun]:
    """Pick the candidate maximising mean trained depth, then run CAFF on it.

    Returns (chosen name, depth score per candidate, the run).
    """
    costs = {name: CostModel(cfg, head, config.workload) for name, (cfg, _) in candidates.items()}
    name, scores = choose_model(costs, budgets, normalise)
    if log:
        log(f"[caff] model choice by mean trained depth ({normalise}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" -> {name}")
    cfg, params = candidates[name]
    run = run_federated("caff", cfg, head, params, train, budgets, config, dev, task, mesh, log)
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


__all__ = ["FEDERATED_METHODS", "candidate_models", "federated_from_files", "run_federated", "slice_top_blocks", "tier_depths", "train_caff"]
