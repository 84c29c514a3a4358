"""The trainers' AdamW: optax's numbers when everything trains, a fresh start for a layer unfrozen late."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ringjax.train.optim import OptimConfig, make_optimizer, masked_apply, schedule

CFG = OptimConfig(lr=1e-3, warmup_ratio=0.1)
RNG = np.random.default_rng(0)
PARAMS = {"blocks": {"kernel": jnp.asarray(RNG.normal(size=(2, 3, 4)), jnp.float32)}, "head": {"bias": jnp.ones((2,))}, "hole": None}


def small_grads(scale=1e-2):
    """Gradients far below the clipping norm, so clipping leaves them alone."""
    return jax.tree.map(lambda x: jnp.asarray(scale * RNG.normal(size=x.shape), jnp.float32), PARAMS)


def factors(*layers):
    return {"blocks": {"kernel": jnp.asarray(layers, jnp.float32).reshape(2, 1, 1)}, "head": {"bias": jnp.ones(())}, "hole": None}


def optax_adamw(total):
    return optax.chain(optax.clip_by_global_norm(CFG.clip_norm),
                       optax.adamw(schedule(CFG, total), CFG.b1, CFG.b2, CFG.eps, weight_decay=CFG.weight_decay))


def test_all_trainable_matches_optax_adamw():
    ours, ref = make_optimizer(CFG, 50), optax_adamw(50)
    a, sa, b, sb = PARAMS, ours.init(PARAMS), PARAMS, ref.init(PARAMS)
    for _ in range(20):
        g = small_grads(1.0)  # clipped as well
        a, sa = masked_apply(ours, g, sa, a, factors(1, 1))
        b, sb = masked_apply(ref, g, sb, b, factors(1, 1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)


def test_layer_unfrozen_late_starts_like_a_fresh_adam():
    """Layer 0 trains from step 11 on: its first update is a fresh Adam's first step,
    lr_11 * (g / (|g| + eps) + wd * p), not optax's with its shared counter (0.48x that here:
    zero moments divided by step 11's bias corrections; at step 600 it would be 2.1x)."""
    ours, ref = make_optimizer(CFG, 50), optax_adamw(50)
    states = {"ours": (PARAMS, ours.init(PARAMS), ours), "optax": (PARAMS, ref.init(PARAMS), ref)}
    for _ in range(10):
        g = small_grads()
        states = {k: (*masked_apply(opt, g, s, p, factors(0, 1)), opt) for k, (p, s, opt) in states.items()}
    (p, _, _), g = states["ours"], small_grads()
    np.testing.assert_array_equal(np.asarray(p["blocks"]["kernel"][0]), np.asarray(PARAMS["blocks"]["kernel"][0]))  # frozen so far
    g0, p0 = np.asarray(g["blocks"]["kernel"][0]), np.asarray(p["blocks"]["kernel"][0])
    fresh = -float(schedule(CFG, 50)(10)) * (g0 / (np.abs(g0) + CFG.eps) + CFG.weight_decay * p0)
    moved = {}
    for k, (p, s, opt) in states.items():
        new, _ = masked_apply(opt, g, s, p, factors(1, 1))
        moved[k] = np.asarray(new["blocks"]["kernel"][0]) - p0
    np.testing.assert_allclose(moved["ours"], fresh, rtol=1e-3)  # the difference of two ~1 floats: float32 rounding
    np.testing.assert_allclose(moved["optax"] / fresh, 0.1 / (1 - 0.9**11) / np.sqrt(1e-3 / (1 - 0.999**11)), rtol=0.02)
