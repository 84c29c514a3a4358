"""GPT-2: pre-norm decoder blocks with a fused q/k/v projection and learned positions."""

from __future__ import annotations

import jax.numpy as jnp

from ringjax.models.config import ModelConfig
from ringjax.models.layers import dot_product_attention, layer_norm, split_heads
from ringjax.peft.ops import activation, bottleneck, linear

# GPT-2 stores Conv1D weights as (in, out): already kernels, no transpose.
_P = r"(?:transformer\.)?"
CHECKPOINT_RULES = [
    (_P + r"wte\.weight", "embed/word", None),
    (_P + r"wpe\.weight", "embed/position", None),
    (_P + r"h\.(\d+)\.ln_1\.weight", "blocks/attn_norm/scale", None),
    (_P + r"h\.(\d+)\.ln_1\.bias", "blocks/attn_norm/bias", None),
    (_P + r"h\.(\d+)\.attn\.c_attn\.weight", "blocks/qkv/kernel", None),
    (_P + r"h\.(\d+)\.attn\.c_attn\.bias", "blocks/qkv/bias", None),
    (_P + r"h\.(\d+)\.attn\.c_proj\.weight", "blocks/attn_out/kernel", None),
    (_P + r"h\.(\d+)\.attn\.c_proj\.bias", "blocks/attn_out/bias", None),
    (_P + r"h\.(\d+)\.ln_2\.weight", "blocks/ffn_norm/scale", None),
    (_P + r"h\.(\d+)\.ln_2\.bias", "blocks/ffn_norm/bias", None),
    (_P + r"h\.(\d+)\.mlp\.c_fc\.weight", "blocks/ffn_in/kernel", None),
    (_P + r"h\.(\d+)\.mlp\.c_fc\.bias", "blocks/ffn_in/bias", None),
    (_P + r"h\.(\d+)\.mlp\.c_proj\.weight", "blocks/ffn_out/kernel", None),
    (_P + r"h\.(\d+)\.mlp\.c_proj\.bias", "blocks/ffn_out/bias", None),
    (_P + r"ln_f\.weight", "final/norm/scale", None),
    (_P + r"ln_f\.bias", "final/norm/bias", None),
    (r"lm_head\.weight", "head/lm/kernel", "T"),
    (r"score\.weight", "head/classifier/kernel", "T"),
    (_P + r"h\.(\d+)\.attn\.(?:masked_)?bias", None, None),  # causal-mask buffers
]

LINEARS = ("qkv", "attn_out", "ffn_in", "ffn_out")
DEFAULT_LORA_TARGETS = ("qkv",)


def param_shapes(cfg: ModelConfig) -> dict:
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    dense = lambda i, o: {"kernel": (n, i, o), "bias": (n, o)}
    norm = lambda *lead: {"scale": (*lead, h), "bias": (*lead, h)}
    return {
        "embed": {"word": (cfg.vocab_size, h), "position": (cfg.max_position, h)},
        "blocks": {
            "attn_norm": norm(n),
            "qkv": dense(h, 3 * h),
            "attn_out": dense(h, h),
            "ffn_norm": norm(n),
            "ffn_in": dense(h, f),
            "ffn_out": dense(f, h),
        },
        "final": {"norm": norm()},
    }


def embed(cfg: ModelConfig, p, input_ids, attention_mask, token_type_ids=None):
    positions = jnp.arange(input_ids.shape[1])[None]
    return p["word"][input_ids] + p["position"][positions]


def block(cfg: ModelConfig, p, h, bias, peft, spec):
    lin = lambda x, name: linear(x, p[name], peft, name, spec.lora_scaling)
    q, k, v = jnp.split(lin(layer_norm(h, p["attn_norm"], cfg.norm_eps), "qkv"), 3, axis=-1)
    q, k, v = (split_heads(x, cfg.num_heads) for x in (q, k, v))
    a = lin(dot_product_attention(q, k, v, bias), "attn_out")
    h = h + bottleneck(a, peft, "attn", spec.non_linearity)
    f = lin(activation(cfg.activation)(lin(layer_norm(h, p["ffn_norm"], cfg.norm_eps), "ffn_in")), "ffn_out")
    return h + bottleneck(f, peft, "ffn", spec.non_linearity)


def final(cfg: ModelConfig, p, h):
    return layer_norm(h, p["norm"], cfg.norm_eps)
