"""AdamW with warm-up and decay, applied only where the trainable mask allows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


class RowAdamState(NamedTuple):
    count: Any  # per leaf, one int32 counter per leading index (a stacked leaf's layer)
    mu: Any
    nu: Any


def _row_counter(p):
    return jnp.zeros((p.shape[0],) + (1,) * (p.ndim - 1) if p.ndim else (), jnp.int32)


def scale_by_row_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """Adam whose bias correction counts, for each leading index of each leaf, the updates that
    index took part in: `update(..., factors=F)` counts only where F is non-zero.

    With a layer mask, a stacked adapter unfrozen at step t0 then starts as a fresh Adam would;
    with optax's single counter its moments, which begin at zero, are divided by step t0's bias
    corrections instead, which mis-scales its steps for hundreds of steps (the first one is 1.6x
    a fresh Adam's at t0 = 300, 2.1x at t0 = 600). Without factors, or with every factor 1, every
    counter equals optax's and the updates are `optax.scale_by_adam`'s.
    """

    def init(params):
        return RowAdamState(jax.tree.map(_row_counter, params), jax.tree.map(jnp.zeros_like, params),
                            jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None, *, factors=None, **extra):
        del params, extra
        took_part = (jax.tree.map(lambda c: jnp.ones_like(c), state.count) if factors is None
                     else jax.tree.map(lambda c, f: jnp.broadcast_to(f != 0, c.shape).astype(c.dtype), state.count, factors))
        count = jax.tree.map(jnp.add, state.count, took_part)
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v, updates, state.nu)

        def step(m, v, c):
            seen = c > 0  # a row that never trained has zero moments: its step is 0, not 0 / 0
            m_hat = m / jnp.where(seen, 1 - b1**c, 1).astype(m.dtype)
            v_hat = v / jnp.where(seen, 1 - b2**c, 1).astype(v.dtype)
            return m_hat / (jnp.sqrt(v_hat) + eps)

        return jax.tree.map(step, mu, nu, count), RowAdamState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """Clipping, then AdamW (`scale_by_row_adam`, decoupled weight decay, the lr schedule)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        scale_by_row_adam(cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule(cfg, total_steps)),
    )


def masked_apply(optimizer: optax.GradientTransformation, grads, opt_state, params, factors):
    """One optimizer update in which frozen layers get exactly zero change.

    Gradients are masked first (so moments of frozen layers stay zero until they unfreeze),
    and updates after (so weight decay does not move them either); the factors also tell
    `scale_by_row_adam` which layers took a step.
    """
    grads = jax.tree.map(lambda g, f: g * f, grads, factors)
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        updates, opt_state = optimizer.update(grads, opt_state, params, factors=factors)
    else:
        updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, f: u * f, updates, factors)
    return optax.apply_updates(params, updates), opt_state
