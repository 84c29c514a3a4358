"""Llama family (Llama, Mistral, Qwen2): RMSNorm, rotary positions, SwiGLU, grouped-query attention."""

from __future__ import annotations

import jax.numpy as jnp

from ringjax.models.config import ModelConfig
from ringjax.models.layers import dot_product_attention, rms_norm, split_heads
from ringjax.peft.ops import activation, bottleneck, linear

_P = r"(?:model\.)?"
_PROJ = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attn_out"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_out"}
CHECKPOINT_RULES = [
    (_P + r"embed_tokens\.weight", "embed/word", None),
    *[(_P + rf"layers\.(\d+)\.self_attn\.{hf}\.weight", f"blocks/{ours}/kernel", "T") for hf, ours in _PROJ.items()],
    *[(_P + rf"layers\.(\d+)\.self_attn\.{hf}\.bias", f"blocks/{ours}/bias", None) for hf, ours in _PROJ.items()],
    *[(_P + rf"layers\.(\d+)\.mlp\.{hf}\.weight", f"blocks/{ours}/kernel", "T") for hf, ours in _MLP.items()],
    *[(_P + rf"layers\.(\d+)\.mlp\.{hf}\.bias", f"blocks/{ours}/bias", None) for hf, ours in _MLP.items()],
    (_P + r"layers\.(\d+)\.input_layernorm\.weight", "blocks/attn_norm/scale", None),
    (_P + r"layers\.(\d+)\.post_attention_layernorm\.weight", "blocks/ffn_norm/scale", None),
    (_P + r"norm\.weight", "final/norm/scale", None),
    (r"lm_head\.weight", "head/lm/kernel", "T"),
    (r"score\.weight", "head/classifier/kernel", "T"),
    (_P + r"(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", None, None),
]

LINEARS = ("query", "key", "value", "attn_out", "ffn_gate", "ffn_up", "ffn_out")
DEFAULT_LORA_TARGETS = ("query", "value")


def param_shapes(cfg: ModelConfig) -> dict:
    h, f, n, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.head_dim

    def dense(i, o, bias):
        return {"kernel": (n, i, o), **({"bias": (n, o)} if bias else {})}

    return {
        "embed": {"word": (cfg.vocab_size, h)},
        "blocks": {
            "attn_norm": {"scale": (n, h)},
            "query": dense(h, cfg.num_heads * d, cfg.qkv_bias),
            "key": dense(h, cfg.num_kv_heads * d, cfg.qkv_bias),
            "value": dense(h, cfg.num_kv_heads * d, cfg.qkv_bias),
            "attn_out": dense(cfg.num_heads * d, h, cfg.attn_out_bias),
            "ffn_norm": {"scale": (n, h)},
            "ffn_gate": dense(h, f, cfg.mlp_bias),
            "ffn_up": dense(h, f, cfg.mlp_bias),
            "ffn_out": dense(f, h, cfg.mlp_bias),
        },
        "final": {"norm": {"scale": (h,)}},
    }


def embed(cfg: ModelConfig, p, input_ids, attention_mask, token_type_ids=None):
    return p["word"][input_ids]


def rope(x, theta: float):
    """Rotary embedding with Hugging Face's rotate-half convention; x is (B, T, heads, D)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq[None]
    angles = jnp.concatenate([angles, angles], -1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], -1)
    return x * jnp.cos(angles) + rotated * jnp.sin(angles)


def block(cfg: ModelConfig, p, h, bias, peft, spec):
    lin = lambda x, name: linear(x, p[name], peft, name, spec.lora_scaling)
    a = rms_norm(h, p["attn_norm"], cfg.norm_eps)
    q = rope(split_heads(lin(a, "query"), cfg.num_heads), cfg.rope_theta)
    k = rope(split_heads(lin(a, "key"), cfg.num_kv_heads), cfg.rope_theta)
    v = split_heads(lin(a, "value"), cfg.num_kv_heads)
    o = lin(dot_product_attention(q, k, v, bias), "attn_out")
    h = h + bottleneck(o, peft, "attn", spec.non_linearity)
    m = rms_norm(h, p["ffn_norm"], cfg.norm_eps)
    f = lin(activation(cfg.activation)(lin(m, "ffn_gate")) * lin(m, "ffn_up"), "ffn_out")
    return h + bottleneck(f, peft, "ffn", spec.non_linearity)


def final(cfg: ModelConfig, p, h):
    return rms_norm(h, p["norm"], cfg.norm_eps)
