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
from ringjax.models.heads import HeadConfig, apply_head, reads_first_token
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


def top_block(cfg: ModelConfig, p, h, bias, peft, spec):
    """The top block when the head reads only the first position (`reads_first_token`): that row
    is computed and the others are zeros, so shapes downstream (pipeline messages, the head)
    do not change."""
    out = arch(cfg).block(cfg, p, h, bias, peft, spec, first_only=True)
    return jnp.pad(out, ((0, 0), (0, h.shape[1] - out.shape[1]), (0, 0)))


def run_blocks(cfg: ModelConfig, spec: PeftConfig, blocks, peft_blocks, h, bias, keep_taps: bool = False,
               unroll: bool = False, first_only_top: bool = False):
    """Apply a stack of layers (any contiguous slice) with `lax.scan`; optionally return every output.

    `unroll=True` traces every layer separately. It runs slower on CPU here, but XLA's
    `cost_analysis()` counts a loop body once, so FLOP accounting compiles the unrolled twin.
    `first_only_top`: the slice's last layer is the model's top and runs as `top_block`.
    """
    if first_only_top:
        if keep_taps:
            raise ValueError("first_only_top leaves the top block's output rows past the first at zero: no taps")
        n = jax.tree.leaves(blocks)[0].shape[0]
        h, _ = run_blocks(cfg, spec, layer_slice(blocks, 0, n - 1), layer_slice(peft_blocks, 0, n - 1), h, bias,
                          unroll=unroll)
        top = jax.tree.map(lambda x: x[n - 1], (blocks, peft_blocks))
        return top_block(cfg, top[0], h, bias, top[1], spec), None
    block = arch(cfg).block

    def step(h, layer):
        p, peft = layer
        h = block(cfg, p, h, bias, peft, spec)
        return h, (h if keep_taps else None)

    return jax.lax.scan(step, h, (blocks, peft_blocks), unroll=bool(unroll))


def peft_blocks(params) -> dict:
    return params.get("peft", {}).get("blocks", {})


def encode(cfg: ModelConfig, spec: PeftConfig, params, batch, depth: int | None = None, keep_taps: bool = False,
           unroll: bool = False, first_only: bool = False):
    """Final hidden state (after the final norm). Only the top `depth` layers get gradients.
    `first_only`: the top block computes the first position only (the other rows are zeros)."""
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
            h, bias, keep_taps, unroll, first_only and stop == n,
        )
        if start == 0 and cut > 0:
            h = jax.lax.stop_gradient(h)
        taps.append(ys)
    h = arch(cfg).final(cfg, params["final"], h)
    all_taps = jnp.concatenate([h0[None], *taps]) if keep_taps else None
    return h, all_taps


def forward(cfg: ModelConfig, spec: PeftConfig, head: HeadConfig | None, params, batch, depth: int | None = None,
            unroll: bool = False, logits_only: bool = False) -> Output:
    """Hidden states and head logits; the parallel side network joins before the head.

    `logits_only`: the caller needs the logits alone, so under [CLS] pooling the top block
    computes the first position only (`last_hidden_state` is zero past it): 1/T of that
    block's queries, attention output and FFN."""
    from ringjax.peft import parallel

    if spec.kind == "parallel":
        h, taps = encode(cfg, spec, params, batch, depth=0, keep_taps=True, unroll=unroll)
        h = parallel.side_output(spec, params["peft"]["side"], jax.lax.stop_gradient(taps), h)
    else:
        h, taps = encode(cfg, spec, params, batch, depth, unroll=unroll,
                         first_only=logits_only and reads_first_token(cfg, head))
    logits = None if head is None else apply_head(cfg, head, params["head"], h, batch["attention_mask"], params["embed"])
    return Output(h, logits, taps)
