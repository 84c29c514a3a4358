"""The forward pass as pure functions over parameter pytrees.

params = {"embed", "blocks" (stacked, leading layer axis), "final", "head", "peft"}. Blocks run
under `lax.scan`, so any contiguous slice of layers (a pipeline stage) runs with the same code.
Layers below the trainable depth run under `stop_gradient`, so XLA drops their backward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ringjax.models import bert, gpt2, llama
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, apply_head
from ringjax.models.layers import attention_bias
from ringjax.peft.config import PeftConfig

ARCHS = {"bert": bert, "roberta": bert, "gpt2": gpt2, "llama": llama}


class Output(NamedTuple):
    last_hidden_state: jax.Array
    logits: jax.Array | None = None
    taps: jax.Array | None = None  # (L + 1, B, T, H): embedding output, then each block's output


def arch(cfg: ModelConfig):
    return ARCHS[cfg.arch]


def layer_slice(tree, start: int, stop: int):
    return jax.tree.map(lambda x: x[start:stop], tree)


def embed(cfg: ModelConfig, params, batch):
    return arch(cfg).embed(cfg, params["embed"], batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


def run_blocks(cfg: ModelConfig, spec: PeftConfig, blocks, peft_blocks, h, bias, keep_taps: bool = False,
               unroll: bool = False):
    """Apply a stack of layers (any contiguous slice) with `lax.scan`; optionally return every output.

    `unroll=True` traces every layer separately. It runs slower on CPU here, but XLA's
    `cost_analysis()` counts a loop body once, so FLOP accounting compiles the unrolled twin.
    """
    block = arch(cfg).block

    def step(h, layer):
        p, peft = layer
        h = block(cfg, p, h, bias, peft, spec)
        return h, (h if keep_taps else None)

    return jax.lax.scan(step, h, (blocks, peft_blocks), unroll=bool(unroll))


def peft_blocks(params) -> dict:
    return params.get("peft", {}).get("blocks", {})


def encode(cfg: ModelConfig, spec: PeftConfig, params, batch, depth: int | None = None, keep_taps: bool = False,
           unroll: bool = False):
    """Final hidden state (after the final norm). Only the top `depth` layers get gradients."""
    n = cfg.num_layers
    cut = n - (n if depth is None else depth)
    bias = attention_bias(batch["attention_mask"], cfg.causal)
    h = embed(cfg, params, batch)
    h0 = h
    taps = []
    for start, stop in ((0, cut), (cut, n)):
        if stop == start:
            continue
        h, ys = run_blocks(
            cfg, spec, layer_slice(params["blocks"], start, stop), layer_slice(peft_blocks(params), start, stop),
            h, bias, keep_taps, unroll,
        )
        if start == 0 and cut > 0:
            h = jax.lax.stop_gradient(h)
        taps.append(ys)
    h = arch(cfg).final(cfg, params["final"], h)
    all_taps = jnp.concatenate([h0[None], *taps]) if keep_taps else None
    return h, all_taps


def forward(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig | None, params, batch, depth: int | None = None,
            unroll: bool = False) -> Output:
    """Hidden states and head logits; the parallel side network joins before the head."""
    from ringjax.peft import parallel

    if spec.kind == "parallel":
        h, taps = encode(cfg, spec, params, batch, depth=0, keep_taps=True, unroll=unroll)
        h = parallel.side_output(spec, params["peft"]["side"], jax.lax.stop_gradient(taps), h)
    else:
        h, taps = encode(cfg, spec, params, batch, depth, unroll=unroll)
    logits = None if head is None else apply_head(cfg, head, params["head"], h, batch["attention_mask"], params["embed"])
    return Output(h, logits, taps)
