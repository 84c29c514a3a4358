"""Analytic per-block costs of a transformer under a fine-tuning method (no model code needed).

Each layer is a ladder of levels (bottom to top) holding ops: projections, the attention core,
norms, the activation, and the method's PEFT ops beside the projection they modify. Backward
work follows from where the trainable parameters are: every op above the lowest trainable op
passes gradients to its input; trainable ops also compute weight gradients; nothing at or below
the lowest trainable level goes backward. The same rule prices RingAda's top-down unfreezing
(train the top `depth` layers), DEFT's blocks (train one window of layers) and top-t.

FLOPs count matrix products (2 per multiply-add) and the attention core; elementwise work (norms,
activations, softmax, biases) is a few percent at these shapes and is left out. Per-op saved
tensors give the residual bytes a layer keeps for its backward.

`model` is any object with arch ("bert" | "roberta" | "gpt2" | "llama"), hidden_size,
intermediate_size, num_layers, num_heads, num_kv_heads (and optionally head_dim); `method` any
object with kind ("full" | "adapter" | "lora" | "parallel" | "top-t"), adapter_sites,
reduction_factor, lora_rank, lora_targets (empty: the architecture's default), top_t and
side_reduction, as ringjax's model and PEFT configs have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ringjax.errors import RingjaxError

_DEFAULT_LORA_TARGETS = {"bert": ("query", "value"), "roberta": ("query", "value"),
                         "gpt2": ("qkv",), "llama": ("query", "value")}


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of a layer; `level` orders ops bottom-up, siblings (q, k, v) share a level."""

    name: str
    level: int
    fwd_flops: float
    bwd_input_flops: float  # gradient w.r.t. the op's input
    bwd_weight_flops: float  # gradient w.r.t. its parameters
    params: int
    trainable: bool
    saved_bytes: float  # forward tensors its backward needs


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """One layer's work and memory for one microbatch under a method and a set of trained layers."""

    fwd_flops: float
    bwd_input_flops: float
    bwd_weight_flops: float
    params: int
    trainable_params: int
    residual_bytes: float  # kept from forward to backward

    @property
    def train_flops(self) -> float:
        return self.fwd_flops + self.bwd_input_flops + self.bwd_weight_flops


def _linear(name, level, tokens, fan_in, fan_out, bias, trainable, dtype_bytes) -> Op:
    """x @ W (+ b): the input gradient needs only W, so the input is saved only for W's gradient."""
    flops = 2.0 * tokens * fan_in * fan_out
    return Op(name, level, flops, flops, flops, fan_in * fan_out + bias * fan_out, trainable,
              tokens * fan_in * dtype_bytes if trainable else 0.0)


def _layer_ops(model, method, batch: int, seq_len: int, trained: bool, dtype_bytes: int) -> list[Op]:
    """The ops of one backbone layer (with the method's PEFT ops), bottom-up."""
    arch, h, f = model.arch, model.hidden_size, model.intermediate_size
    heads, kv = model.num_heads, model.num_kv_heads or model.num_heads
    d = getattr(model, "head_dim", 0) or h // heads
    tokens, kind = batch * seq_len, method.kind
    bias = arch != "llama"
    whole = trained and kind in ("full", "top-t")  # every backbone weight of the layer trains
    linears = {
        "bert": [("query", h, heads * d), ("key", h, kv * d), ("value", h, kv * d), ("attn_out", heads * d, h),
                 ("ffn_in", h, f), ("ffn_out", f, h)],
        "gpt2": [("qkv", h, 3 * h), ("attn_out", h, h), ("ffn_in", h, f), ("ffn_out", f, h)],
        "llama": [("query", h, heads * d), ("key", h, kv * d), ("value", h, kv * d), ("attn_out", heads * d, h),
                  ("ffn_gate", h, f), ("ffn_up", h, f), ("ffn_out", f, h)],
    }[_family(arch)]
    shape = {name: (fan_in, fan_out) for name, fan_in, fan_out in linears}
    pre_norm = arch in ("gpt2", "llama")
    # level of each op name, bottom-up; norms sit before (pre-norm) or after (post-norm) their sub-layer
    ladder = ([["norm1"]] if pre_norm else []) + [
        [n for n in ("query", "key", "value", "qkv") if n in shape], ["core"], ["attn_out"], ["adapter_attn"],
        *([["norm2"]] if pre_norm else [["norm1"]]),
        [n for n in ("ffn_in", "ffn_gate", "ffn_up") if n in shape], ["act"], ["ffn_out"], ["adapter_ffn"],
        *([] if pre_norm else [["norm2"]]),
    ]
    level = {name: i for i, names in enumerate(ladder) for name in names}
    ops = [_linear(name, level[name], tokens, fan_in, fan_out, bias, whole, dtype_bytes)
           for name, fan_in, fan_out in linears]
    core = 4.0 * batch * heads * seq_len**2 * d  # scores and weighted values; GQA repeats k, v to all heads
    ops.append(Op("core", level["core"], core, 2 * core, 0.0, 0, False,
                  (tokens * (heads + 2 * kv) * d + batch * heads * seq_len**2) * dtype_bytes))
    norm_params = h if arch == "llama" else 2 * h
    for name in ("norm1", "norm2"):
        ops.append(Op(name, level[name], 0.0, 0.0, 0.0, norm_params, whole, tokens * h * dtype_bytes))
    ops.append(Op("act", level["act"], 0.0, 0.0, 0.0, 0, False,
                  tokens * f * (2 if arch == "llama" else 1) * dtype_bytes))
    if kind == "lora":
        targets = tuple(method.lora_targets) or _DEFAULT_LORA_TARGETS[arch]
        unknown = [t for t in targets if t not in shape]
        if unknown:
            raise RingjaxError(f"LoRA targets {unknown} are not projections of {arch}: choose from {sorted(shape)}")
        r = method.lora_rank
        for name in targets:
            fan_in, fan_out = shape[name]
            flops = 2.0 * tokens * r * (fan_in + fan_out)
            ops.append(Op(f"lora_{name}", level[name], flops, flops, flops, r * (fan_in + fan_out), trained,
                          tokens * (fan_in + r) * dtype_bytes))
    if kind == "adapter":
        width = max(1, h // method.reduction_factor)
        for site in method.adapter_sites:
            flops = 4.0 * tokens * h * width
            ops.append(Op(f"adapter_{site}", level[f"adapter_{site}"], flops, flops, flops,
                          2 * h * width + width + h, trained, tokens * (h + width) * dtype_bytes))
    return ops


def _side_ops(model, method, batch: int, seq_len: int, dtype_bytes: int) -> list[Op]:
    """PAC's side network beside one tapped layer: tap and mix projections and a narrow attention.

    The tap reads a backbone state (a constant to the side network), so it passes no gradient
    back; everything else lies on the side network's own gradient path.
    """
    h, tokens = model.hidden_size, batch * seq_len
    w = max(1, h // method.side_reduction)
    tap = _linear("side_tap", 0, tokens, h, w, True, True, dtype_bytes)
    core = 4.0 * batch * seq_len**2 * w
    return [
        dataclasses.replace(tap, bwd_input_flops=0.0),
        _linear("side_mix", 0, tokens, w, w, False, True, dtype_bytes),
        Op("side_norm", 1, 0.0, 0.0, 0.0, 2 * w, True, tokens * w * dtype_bytes),
        _linear("side_qkv", 2, tokens, w, 3 * w, False, True, dtype_bytes),
        Op("side_core", 3, core, 2 * core, 0.0, 0, False, (3 * tokens * w + batch * seq_len**2) * dtype_bytes),
        _linear("side_out", 4, tokens, w, w, False, True, dtype_bytes),
    ]


def _family(arch: str) -> str:
    if arch not in _DEFAULT_LORA_TARGETS:
        raise RingjaxError(f"no cost model for architecture {arch!r}: use one of {sorted(_DEFAULT_LORA_TARGETS)}")
    return "bert" if arch == "roberta" else arch


def top_layers(num_layers: int, depth: int) -> range:
    """The layers trained at unfreeze depth `depth` (the top ones)."""
    if not 0 <= depth <= num_layers:
        raise RingjaxError(f"unfreeze depth {depth} outside 0..{num_layers}: pick a depth within the model")
    return range(num_layers - depth, num_layers)


def block_costs(model, method, batch: int, seq_len: int, trained: Iterable[int] | None = None,
                dtype_bytes: int = 4) -> tuple[BlockCost, ...]:
    """Per-layer costs for one microbatch when the method's parameters train in layers `trained`.

    `trained` defaults to every layer (the top `top_t` for top-t). For the parallel method the
    backbone only runs forward and each layer's cost includes its slice of the side network.
    """
    L = model.num_layers
    if trained is None:
        trained = top_layers(L, method.top_t) if method.kind == "top-t" else range(L)
    trained = set(trained)
    if not trained <= set(range(L)):
        raise RingjaxError(f"trained layers {sorted(trained - set(range(L)))} do not exist: the model has {L}")
    backbone = [_layer_ops(model, method, batch, seq_len, layer in trained, dtype_bytes) for layer in range(L)]
    chains = [backbone]
    if method.kind == "parallel":
        chains.append([_side_ops(model, method, batch, seq_len, dtype_bytes) for _ in range(L)])
    totals = [dict(fwd=0.0, bwd_in=0.0, bwd_w=0.0, params=0, trainable=0, saved=0.0) for _ in range(L)]
    for chain in chains:
        positions = [(layer, op.level) for layer, ops in enumerate(chain) for op in ops if op.trainable]
        lowest = min(positions, default=(L, 0))  # nothing trains: no backward at all
        for layer, ops in enumerate(chain):
            for op in ops:
                through = (layer, op.level) > lowest
                total = totals[layer]
                total["fwd"] += op.fwd_flops
                total["bwd_in"] += op.bwd_input_flops if through else 0.0
                total["bwd_w"] += op.bwd_weight_flops if op.trainable else 0.0
                total["params"] += op.params
                total["trainable"] += op.params if op.trainable else 0
                total["saved"] += op.saved_bytes if through or op.trainable else 0.0
    return tuple(BlockCost(t["fwd"], t["bwd_in"], t["bwd_w"], t["params"], t["trainable"], t["saved"])
                 for t in totals)


def hidden_state_bytes(model, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """Bytes of one microbatch's hidden state: what a stage sends up (and its gradient down)."""
    return batch * seq_len * model.hidden_size * dtype_bytes
