"""The single-device training step: a pure function of (state, frozen params, batch)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ringjax.models.backbone import forward
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, example_losses, predictions
from ringjax.models.precision import narrow_block_kernels
from ringjax.peft.config import PeftConfig
from ringjax.peft.trainable import layer_mask, merge, split
from ringjax.train.optim import masked_apply


class TrainState(NamedTuple):
    trainable: dict  # leaves that can train (None holes where frozen)
    opt_state: object
    step: jax.Array


def weighted_mean(losses, batch):
    """Mean over real examples: `example_mask` marks padding rows of a final eval batch."""
    w = batch.get("example_mask")
    if w is None:
        return losses.mean()
    return (losses * w).sum() / jnp.maximum(w.sum(), 1.0)


def loss_fn(trainable, frozen, batch, *, cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, depth: int,
            unroll: bool = False, compute_dtype: str = "float32"):
    params = narrow_block_kernels(merge(trainable, frozen), compute_dtype)
    out = forward(cfg, spec, head, params, batch, depth, unroll, logits_only=True)
    return weighted_mean(example_losses(head, out.logits, batch["labels"]), batch)


def make_train_step(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig, optimizer, params_like, depth: int,
                    unroll: bool = False, compute_dtype: str = "float32"):
    """A jitted step for one trainable depth (depth is static: each depth compiles once).
    compute_dtype "bfloat16" multiplies the blocks' projections in bf16 (`ringjax.models.precision`)."""
    factors = layer_mask(params_like, spec, depth, cfg.num_layers)
    grad_fn = jax.value_and_grad(lambda t, f, b: loss_fn(t, f, b, cfg=cfg, spec=spec, head=head, depth=depth,
                                                         unroll=unroll, compute_dtype=compute_dtype))

    def train_step(state: TrainState, frozen, batch):
        loss, grads = grad_fn(state.trainable, frozen, batch)
        trainable_factors, _ = split(factors, jax.tree.map(lambda x: x is not None, state.trainable, is_leaf=lambda x: x is None))
        trainable, opt_state = masked_apply(optimizer, grads, state.opt_state, state.trainable, trainable_factors)
        return TrainState(trainable, opt_state, state.step + 1), {"loss": loss}

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig):
    def eval_step(params, batch):
        out = forward(cfg, spec, head, params, batch, logits_only=True)
        return predictions(head, out.logits), weighted_mean(example_losses(head, out.logits, batch["labels"]), batch)

    return jax.jit(eval_step)


def init_state(optimizer, trainable) -> TrainState:
    return TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32))
