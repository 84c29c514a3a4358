"""Parallel adapters (PAC): a narrow side network beside the frozen backbone.

It reads the backbone's hidden states (taps: the embedding output and every block's output)
and adds its result to the backbone's final hidden state before the head. The taps are
constants to it, so no gradient ever enters the backbone, and cached taps can replace the
backbone entirely after the first epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ringjax.peft.ops import activation


def side_shapes(hidden: int, num_layers: int, width: int) -> dict:
    return {
        "in": {"kernel": (hidden, width), "bias": (width,)},
        "blocks": {
            "tap": {"kernel": (num_layers, hidden, width), "bias": (num_layers, width)},
            "mix": {"kernel": (num_layers, width, width)},
        },
        "out": {"kernel": (width, hidden), "bias": (hidden,)},
    }


def side_output(spec, side, taps, h_final):
    """h_final + side network(taps); taps is (L + 1, B, T, H). Zero-initialised `out` => identity."""
    act = activation(spec.non_linearity)
    s = taps[0] @ side["in"]["kernel"] + side["in"]["bias"]

    def step(s, layer):
        p, tap = layer
        return s + act(tap @ p["tap"]["kernel"] + p["tap"]["bias"] + s @ p["mix"]["kernel"]), None

    s, _ = jax.lax.scan(step, s, (side["blocks"], taps[1:]))
    return h_final + (s @ side["out"]["kernel"] + side["out"]["bias"]).astype(h_final.dtype)


def init_side(key, hidden: int, num_layers: int, width: int, std: float) -> dict:
    shapes = side_shapes(hidden, num_layers, width)
    keys = iter(jax.random.split(key, 8))
    return jax.tree.map(
        lambda s: std * jax.random.normal(next(keys), s) if len(s) > 1 else jnp.zeros(s),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    ) | {"out": {"kernel": jnp.zeros(shapes["out"]["kernel"]), "bias": jnp.zeros(shapes["out"]["bias"])}}
