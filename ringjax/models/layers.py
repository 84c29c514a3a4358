"""Building blocks shared by the architecture ports: norms, attention, masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e9  # finite, so fully masked rows stay NaN-free


def layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def rms_norm(x, p, eps):
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * p["scale"]


def attention_bias(attention_mask, causal: bool, dtype=jnp.float32):
    """Additive bias (B, 1, Tq, Tk): padding keys masked, plus the causal triangle for decoders."""
    keep = attention_mask[:, None, None, :].astype(bool)
    if causal:
        t = attention_mask.shape[-1]
        keep = keep & jnp.tril(jnp.ones((t, t), bool))[None, None]
    return jnp.where(keep, 0.0, NEG_INF).astype(dtype)


def dot_product_attention(q, k, v, bias):
    """q (B,T,H,D), k/v (B,T,KV,D) with H a multiple of KV (grouped-query attention)."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k = jnp.repeat(k, groups, axis=2)
        v = jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(*out.shape[:2], -1)


def split_heads(x, num_heads):
    return x.reshape(*x.shape[:2], num_heads, -1)
