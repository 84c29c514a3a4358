"""BERT-family encoders (BERT, MiniLM, RoBERTa): post-norm blocks with learned positions."""

from __future__ import annotations

import jax.numpy as jnp

from ringjax.models.config import ModelConfig
from ringjax.models.layers import dot_product_attention, layer_norm, split_heads
from ringjax.peft.ops import activation, bottleneck, linear

# Checkpoint name -> parameter path. "{i}" marks the layer index of stacked blocks; "T" means
# the torch Linear weight (out, in) is transposed to a kernel (in, out).
_P = r"(?:bert\.|roberta\.|model\.)?"
CHECKPOINT_RULES = [
    (_P + r"embeddings\.word_embeddings\.weight", "embed/word", None),
    (_P + r"embeddings\.position_embeddings\.weight", "embed/position", None),
    (_P + r"embeddings\.token_type_embeddings\.weight", "embed/token_type", None),
    (_P + r"embeddings\.LayerNorm\.weight", "embed/norm/scale", None),
    (_P + r"embeddings\.LayerNorm\.bias", "embed/norm/bias", None),
    (_P + r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight", "blocks/{2}/kernel", "T"),
    (_P + r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.bias", "blocks/{2}/bias", None),
    (_P + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", "blocks/attn_out/kernel", "T"),
    (_P + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", "blocks/attn_out/bias", None),
    (_P + r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.weight", "blocks/attn_norm/scale", None),
    (_P + r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.bias", "blocks/attn_norm/bias", None),
    (_P + r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight", "blocks/ffn_in/kernel", "T"),
    (_P + r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias", "blocks/ffn_in/bias", None),
    (_P + r"encoder\.layer\.(\d+)\.output\.dense\.weight", "blocks/ffn_out/kernel", "T"),
    (_P + r"encoder\.layer\.(\d+)\.output\.dense\.bias", "blocks/ffn_out/bias", None),
    (_P + r"encoder\.layer\.(\d+)\.output\.LayerNorm\.weight", "blocks/ffn_norm/scale", None),
    (_P + r"encoder\.layer\.(\d+)\.output\.LayerNorm\.bias", "blocks/ffn_norm/bias", None),
    (_P + r"pooler\.dense\.weight", "head/pooler/kernel", "T"),
    (_P + r"pooler\.dense\.bias", "head/pooler/bias", None),
    (r"classifier\.dense\.weight", "head/pooler/kernel", "T"),  # RoBERTa's head: dense, tanh, out_proj
    (r"classifier\.dense\.bias", "head/pooler/bias", None),
    (r"classifier\.(?:out_proj\.)?weight", "head/classifier/kernel", "T"),
    (r"classifier\.(?:out_proj\.)?bias", "head/classifier/bias", None),
    (_P + r"embeddings\.(position_ids|token_type_ids)", None, None),  # buffers, not parameters
    (r"lm_head\..*|cls\..*", None, None),  # masked-LM heads are not used
]

LINEARS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def param_shapes(cfg: ModelConfig) -> dict:
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    dense = lambda i, o: {"kernel": (n, i, o), "bias": (n, o)}
    norm = lambda *lead: {"scale": (*lead, h), "bias": (*lead, h)}
    return {
        "embed": {
            "word": (cfg.vocab_size, h),
            "position": (cfg.max_position, h),
            "token_type": (max(cfg.type_vocab_size, 1), h),
            "norm": norm(),
        },
        "blocks": {
            **{name: dense(h, h) for name in ("query", "key", "value", "attn_out")},
            "attn_norm": norm(n),
            "ffn_in": dense(h, f),
            "ffn_out": dense(f, h),
            "ffn_norm": norm(n),
        },
        "final": {},
    }


def position_ids(cfg: ModelConfig, input_ids, attention_mask):
    if cfg.arch == "roberta":  # as HF: count real tokens, offset by padding_idx + 1
        mask = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(mask, axis=1) * mask + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)


def embed(cfg: ModelConfig, p, input_ids, attention_mask, token_type_ids=None):
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    x = (
        p["word"][input_ids]
        + p["position"][position_ids(cfg, input_ids, attention_mask)]
        + p["token_type"][token_type_ids]
    )
    return layer_norm(x, p["norm"], cfg.norm_eps)


def block(cfg: ModelConfig, p, h, bias, peft, spec, first_only: bool = False):
    """One post-norm encoder layer; Houlsby adapters sit before each residual LayerNorm.
    `first_only`: only the first position's output (its query attends to every key), (B, 1, H)."""
    lin = lambda x, name: linear(x, p[name], peft, name, spec.lora_scaling)
    x = h[:, :1] if first_only else h
    q = split_heads(lin(x, "query"), cfg.num_heads)
    k, v = (split_heads(lin(h, name), cfg.num_heads) for name in ("key", "value"))
    a = lin(dot_product_attention(q, k, v, bias), "attn_out")
    a = bottleneck(a, peft, "attn", spec.non_linearity)
    h = layer_norm(a + x, p["attn_norm"], cfg.norm_eps)
    f = lin(activation(cfg.activation)(lin(h, "ffn_in")), "ffn_out")
    f = bottleneck(f, peft, "ffn", spec.non_linearity)
    return layer_norm(f + h, p["ffn_norm"], cfg.norm_eps)


def final(cfg: ModelConfig, p, h):
    return h
DEFAULT_LORA_TARGETS = ("query", "value")
