"""Federated fine-tuning simulation: clients, budgets, layer selection, aggregation, rounds."""

from ringjax.fl.aggregation import Aggregator, layerwise_average, moving_average, server_momentum
from ringjax.fl.budgets import Budget, ClientBudgets, Fleet, Tier, load_fleet, parse_fleet
from ringjax.fl.clients import (
    FLModel,
    GroupRunner,
    LocalJob,
    chunk_sizes,
    client_logits,
    compile_local_step,
    local_optimizer,
    make_local_round,
    make_local_step,
    measured_peak_bytes,
    peak_bytes,
    split_params,
    tree_bytes,
)
from ringjax.fl.costs import ClientCost, CostModel, Workload
from ringjax.fl.rounds import FederatedRun, FLConfig, RoundMetrics, run_federated
from ringjax.fl.selection import METHODS, ClientPlan, choose_model, depth_score, plan_clients, select_depth, verify_memory

__all__ = [
    "METHODS", "Aggregator", "Budget", "ClientBudgets", "ClientCost", "ClientPlan", "CostModel", "FLConfig", "FLModel",
    "FederatedRun", "Fleet", "GroupRunner", "LocalJob", "RoundMetrics", "Tier", "Workload", "choose_model", "chunk_sizes",
    "client_logits", "compile_local_step", "depth_score", "layerwise_average", "load_fleet", "local_optimizer",
    "make_local_round", "make_local_step", "measured_peak_bytes", "parse_fleet", "peak_bytes", "plan_clients",
    "moving_average", "run_federated", "select_depth", "server_momentum", "split_params", "tree_bytes", "verify_memory",
]
