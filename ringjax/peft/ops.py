"""The PEFT computations themselves: pure functions the model blocks call at fixed sites.

Blocks call `linear` for every projection (so LoRA can attach to any of them by name) and
`bottleneck` after attention and after the feed-forward network (Houlsby / Pfeiffer sites).
A block without PEFT parameters at a site runs the plain computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    return ACTIVATIONS[name]


def linear(x, p, peft=None, name: str = "", lora_scaling: float = 1.0):
    """x @ kernel + bias, plus a LoRA update when `peft["lora"]` has one for `name`.

    A kernel stored in a narrower dtype than x (bf16 frozen weights, `ringjax.models.precision`)
    multiplies x cast to that dtype and accumulates in x's dtype: the matmul runs at the narrow
    dtype's speed (forward and backward) while everything around it stays float32.
    """
    kernel = p["kernel"]
    y = x @ kernel if kernel.dtype == x.dtype else frozen_matmul(x, kernel)
    if "bias" in p:
        y = y + p["bias"]
    lora = (peft or {}).get("lora", {}).get(name)
    if lora is not None:
        y = y + ((x @ lora["a"]) @ lora["b"]) * lora_scaling
    return y


@jax.custom_vjp
def frozen_matmul(x, kernel):
    """x @ kernel for a frozen kernel stored narrower than x (bf16): multiplied in the kernel's
    dtype, accumulated in x's. The backward multiplies in the narrow dtype too (autodiff would
    upcast the kernel and multiply in float32) and gives the kernel no gradient: it never trains."""
    return jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=x.dtype)


def _frozen_matmul_fwd(x, kernel):
    return frozen_matmul(x, kernel), kernel


def _frozen_matmul_bwd(kernel, g):  # g has x's dtype, as the output does
    return jnp.dot(g.astype(kernel.dtype), kernel.T, preferred_element_type=g.dtype), jnp.zeros_like(kernel)


frozen_matmul.defvjp(_frozen_matmul_fwd, _frozen_matmul_bwd)


def bottleneck(x, peft=None, site: str = "", non_linearity: str = "relu"):
    """Bottleneck adapter with its own residual: x + up(act(down(x))); identity when absent."""
    p = (peft or {}).get("adapter", {}).get(site)
    if p is None:
        return x
    z = activation(non_linearity)(x @ p["down"]["kernel"] + p["down"]["bias"])
    return x + z @ p["up"]["kernel"] + p["up"]["bias"]
