"""AdamW with warm-up and decay, applied only where the trainable mask allows."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    decay: str = "linear"  # "linear" | "cosine" | "constant"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = int(cfg.warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup, 1)
    after = {
        "linear": optax.linear_schedule(cfg.lr, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps),
        "constant": optax.constant_schedule(cfg.lr),
    }[cfg.decay]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule(cfg, total_steps), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay),
    )


def masked_apply(optimizer: optax.GradientTransformation, grads, opt_state, params, factors):
    """One optimizer update in which frozen layers get exactly zero change.

    Gradients are masked first (so moments of frozen layers stay zero until they unfreeze),
    and updates after (so weight decay does not move them either).
    """
    grads = jax.tree.map(lambda g, f: g * f, grads, factors)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, f: u * f, updates, factors)
    return optax.apply_updates(params, updates), opt_state
