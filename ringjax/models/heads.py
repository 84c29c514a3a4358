"""Task heads: sequence classification / regression (pooled CLS, or the mean over real tokens,
for encoders; last real token for decoders) and causal LM."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from ringjax.errors import RingjaxError
from ringjax.models.config import ModelConfig

HEAD_KINDS = ("classification", "regression", "lm")
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "classification"
    num_labels: int = 2
    # encoders: "cls" feeds the [CLS] state to BERT's pooler, as Hugging Face does; "mean" feeds
    # the mean over real tokens, the pooling sentence-transformers checkpoints (MiniLM) were trained with
    pooling: str = "cls"

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise RingjaxError(f"unknown head {self.kind!r}; choose one of {HEAD_KINDS}")
        if self.pooling not in POOLINGS:
            raise RingjaxError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")

    @property
    def outputs(self) -> int:
        return 1 if self.kind == "regression" else self.num_labels


def reads_first_token(cfg: ModelConfig, head: HeadConfig | None) -> bool:
    """The head reads only the first position (an encoder's [CLS] pooling), so the top block needs
    to compute only that row; its keys and values still see every token."""
    return head is not None and cfg.is_encoder and head.kind != "lm" and head.pooling == "cls"


def head_shapes(cfg: ModelConfig, head: HeadConfig) -> dict:
    h = cfg.hidden_size
    if head.kind == "lm":
        return {} if cfg.tie_word_embeddings else {"lm": {"kernel": (h, cfg.vocab_size)}}
    if cfg.is_encoder:
        return {"pooler": {"kernel": (h, h), "bias": (h,)}, "classifier": {"kernel": (h, head.outputs), "bias": (head.outputs,)}}
    return {"classifier": {"kernel": (h, head.outputs)}}


def init_head(cfg: ModelConfig, head: HeadConfig, loaded: dict, key) -> dict:
    """Keep checkpoint head weights whose shapes fit; initialise the rest (std 0.02, zero bias)."""
    out = {}
    for name, shapes in head_shapes(cfg, head).items():
        got = loaded.get(name, {})
        if all(k in got and tuple(got[k].shape) == s for k, s in shapes.items()):
            out[name] = {k: jnp.asarray(v) for k, v in got.items() if k in shapes}
            continue
        key, sub = jax.random.split(key)
        out[name] = {
            k: (0.02 * jax.random.normal(sub, s) if k == "kernel" else jnp.zeros(s)) for k, s in shapes.items()
        }
    return out


def apply_head(cfg: ModelConfig, head: HeadConfig, p: dict, h, attention_mask, embed: dict):
    if head.kind == "lm":
        kernel = embed["word"].T if cfg.tie_word_embeddings else p["lm"]["kernel"]
        return h @ kernel
    if cfg.is_encoder:
        if head.pooling == "mean":
            real = attention_mask[..., None].astype(h.dtype)
            first = (h * real).sum(1) / jnp.maximum(real.sum(1), 1.0)
        else:
            first = h[:, 0]
        pooled = jnp.tanh(first @ p["pooler"]["kernel"] + p["pooler"]["bias"])
        return pooled @ p["classifier"]["kernel"] + p["classifier"]["bias"]
    last = jnp.maximum(attention_mask.sum(-1) - 1, 0)
    return h[jnp.arange(h.shape[0]), last] @ p["classifier"]["kernel"]


def example_losses(head: HeadConfig, logits, labels):
    """Per-example loss: cross-entropy, squared error, or mean next-token cross-entropy."""
    if head.kind == "regression":
        return jnp.square(logits[:, 0] - labels)
    if head.kind == "lm":
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels[:, 1:]).mean(-1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def predictions(head: HeadConfig, logits):
    return logits[:, 0] if head.kind == "regression" else jnp.argmax(logits, -1)
