"""Architecture-neutral model configuration, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ringjax.errors import RingjaxError

ENCODERS = ("bert", "roberta")
DECODERS = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """What the Flax ports need to know about a checkpoint; hashable so it can be static."""

    arch: str  # "bert" | "roberta" | "gpt2" | "llama" (the Llama family includes Qwen2, Mistral)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    norm_eps: float
    activation: str
    num_kv_heads: int = 0  # 0 means num_heads
    type_vocab_size: int = 0
    pad_token_id: int | None = None
    position_offset: int = 0  # RoBERTa numbers positions from padding_idx + 1
    rope_theta: float = 10000.0
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0 means hidden_size // num_heads
    model_type: str = ""

    def __post_init__(self):
        if self.arch not in ENCODERS + DECODERS:
            raise RingjaxError(f"unsupported architecture {self.arch!r}; ringjax ports {ENCODERS + DECODERS}")
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def causal(self) -> bool:
        return self.arch in DECODERS

    @property
    def is_encoder(self) -> bool:
        return self.arch in ENCODERS

    @property
    def max_length(self) -> int:
        """Longest sequence the position table allows."""
        return self.max_position - self.position_offset

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face config dict onto the neutral fields."""
        model_type = hf.get("model_type", "")
        if model_type in ("bert", "roberta", "xlm-roberta", "camembert"):
            roberta = model_type != "bert"
            pad = hf.get("pad_token_id", 1 if roberta else 0)
            return cls(
                arch="roberta" if roberta else "bert",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                max_position=hf["max_position_embeddings"],
                norm_eps=hf.get("layer_norm_eps", 1e-12),
                activation=hf.get("hidden_act", "gelu"),
                type_vocab_size=hf.get("type_vocab_size", 2),
                pad_token_id=pad,
                position_offset=pad + 1 if roberta else 0,
                model_type=model_type,
            )
        if model_type == "gpt2":
            return cls(
                arch="gpt2",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["n_embd"],
                num_layers=hf["n_layer"],
                num_heads=hf["n_head"],
                intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                max_position=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=hf.get("activation_function", "gelu_new"),
                pad_token_id=hf.get("pad_token_id"),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                model_type=model_type,
            )
        if model_type in ("llama", "qwen2", "mistral"):
            return cls(
                arch="llama",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                max_position=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                activation=hf.get("hidden_act", "silu"),
                pad_token_id=hf.get("pad_token_id"),
                rope_theta=_rope_theta(hf),
                qkv_bias=hf.get("attention_bias", False) or model_type == "qwen2",
                attn_out_bias=hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                head_dim=hf.get("head_dim") or 0,
                model_type=model_type,
            )
        raise RingjaxError(
            f"model_type {model_type!r} is not supported; ringjax ports bert, roberta, gpt2, llama, qwen2, mistral"
        )


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
