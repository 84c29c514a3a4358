"""Which parameters train: one abstraction for optax, the trainer and unfreeze schedules.

Two views of the same decision:
- `leaf_mask`: a bool per leaf, fixed for a method, so the optimizer keeps state only for
  leaves that can ever train (and keeps it across unfreeze-depth changes);
- `layer_mask`: a 0/1 factor per leaf, with a per-layer vector for stacked leaves, for a given
  depth (the number of top blocks that train). Updates are multiplied by it, so frozen layers
  get exactly zero update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ringjax.peft.config import PeftConfig

STACKED = ("blocks",)  # subtrees whose leaves carry a leading layer axis


def default_depth(spec: PeftConfig, num_layers: int) -> int:
    return min(spec.top_t, num_layers) if spec.kind == "top-t" else num_layers


def _keys(path) -> list:
    return [getattr(k, "key", None) for k in path]


def _is_block_norm(path) -> bool:
    keys = _keys(path)
    return keys[0] == "blocks" and any(isinstance(k, str) and k.endswith("norm") for k in keys[1:])


def _trains(spec: PeftConfig, path) -> bool:
    top = path[0].key
    if top in ("head", "peft") or spec.kind == "full":
        return True
    if spec.kind == "top-t" and top in ("blocks", "final"):
        return True
    return spec.train_norms and _is_block_norm(path)


def leaf_mask(params: dict, spec: PeftConfig) -> dict:
    return jax.tree_util.tree_map_with_path(lambda path, _: _trains(spec, path), params)


def _is_stacked(path) -> bool:
    return "blocks" in _keys(path)


def layer_mask(params: dict, spec: PeftConfig, depth: int, num_layers: int) -> dict:
    """Per-leaf update factors for `depth` trainable top blocks (embeddings train only at full depth)."""
    top_layers = (jnp.arange(num_layers) >= num_layers - depth).astype(jnp.float32)

    def factor(path, leaf):
        top = path[0].key
        if not _trains(spec, path):
            return jnp.zeros(())
        if _is_stacked(path):
            return top_layers.reshape((num_layers,) + (1,) * (leaf.ndim - 1))
        if top == "embed":
            return jnp.asarray(float(depth >= num_layers))
        return jnp.ones(())

    return jax.tree_util.tree_map_with_path(factor, params)


def split(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen) with None holes, so `merge` can rebuild the tree."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def count(params: dict, factors: dict) -> int:
    """Number of trainable scalars: leaf sizes weighted by their layer factors."""
    return int(sum(jnp.sum(jnp.broadcast_to(f, p.shape)) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(factors))))
