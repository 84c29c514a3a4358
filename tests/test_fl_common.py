"""Shared helpers for the federated tests (no tests here): a tiny BERT, synthetic data, a three-tier fleet."""

import numpy as np

import ringjax
from ringjax.data.tokenize import Encoded
from ringjax.fl import Budget, CostModel, LocalJob, Workload
from ringjax.fl.budgets import Fleet, Tier
from ringjax.models import backbone
from ringjax.models.heads import head_shapes

CFG = ringjax.ModelConfig(arch="bert", vocab_size=100, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                          max_position=64, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
HEAD = ringjax.HeadConfig("classification", 2)
B, T, E = 4, 16, 2
FAST = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time; numerics unchanged


def tiny_params(seed=0):
    """Random tiny BERT + head as numpy (no XLA work): norms 1, biases 0, kernels N(0, 0.02)."""
    rng = np.random.default_rng(seed)

    def build(tree, path=""):
        if isinstance(tree, tuple):
            if "scale" in path:
                return np.ones(tree, np.float32)
            if "bias" in path:
                return np.zeros(tree, np.float32)
            return (0.02 * rng.standard_normal(tree)).astype(np.float32)
        return {k: build(v, f"{path}/{k}") for k, v in tree.items()}

    params = build(backbone.arch(CFG).param_shapes(CFG))
    params["final"] = {}
    params["head"] = build(head_shapes(CFG, HEAD))
    params["peft"] = {}
    return params


def synthetic(n, seed=0, max_len=T):
    """Token 2 or 5 at position 1 gives the label; random filler elsewhere."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int32)
    lengths = rng.integers(4, max_len + 1, n)
    rows = []
    for length, y in zip(lengths, labels):
        toks = rng.integers(10, CFG.vocab_size, length)
        toks[0], toks[1] = 1, 2 + 3 * y
        rows.append(toks)
    flat = np.concatenate(rows).astype(np.int32)
    return Encoded(flat, np.zeros_like(flat), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), labels, max_len, 0)


def costs(batch=B, seq=T, steps=E):
    return CostModel(CFG, HEAD, Workload(batch, seq, steps))


def fleet(tiers=("weak", "medium", "strong")):
    """weak: top block only; medium: two blocks; strong: everything (full fine-tuning too)."""
    c = costs()

    def fit(job):
        x = c.cost(job)
        return Budget(x.memory_bytes * 1.01, x.flops_per_round * 1.01, x.upload_bytes * 1.01)

    full, top4 = c.cost(LocalJob("full", 4)), c.cost(LocalJob("top-t", 4))
    strong = Budget(max(full.memory_bytes, top4.memory_bytes) * 1.01, max(full.flops_per_round, top4.flops_per_round) * 1.01,
                    full.upload_bytes * 1.01)
    all_tiers = {"weak": (fit(LocalJob("top-t", 1)), 0.4), "medium": (fit(LocalJob("top-t", 2)), 0.4), "strong": (strong, 0.2)}
    chosen = [(name, *all_tiers[name]) for name in tiers]
    total = sum(f for _, _, f in chosen)
    return Fleet(tuple(Tier(name, budget, fraction / total) for name, budget, fraction in chosen))
