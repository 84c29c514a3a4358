"""Analytic costs of a transformer training step under a fine-tuning method (no model code needed).

Each layer is a ladder of levels (bottom to top) holding ops: projections, the attention core,
norms, the activation, and the method's PEFT ops beside the projection they modify. Backward
work follows from where the trainable parameters are: every op above the lowest trainable op
passes gradients to its input; trainable ops also compute weight gradients; nothing at or below
the lowest trainable level goes backward. The same rule prices RingAda's top-down unfreezing
(train the top `depth` layers), DEFT's blocks (train one window of layers) and top-t.

FLOPs are counted as XLA's cost analysis counts them: 2 per multiply-add of every matrix product
(projections, attention core, PEFT modules), plus one per element of every elementwise op and
reduction (bias, residual, norm, softmax, activation). Exponentials, `tanh` and `rsqrt` count as
transcendentals, not FLOPs; XLA expands `erf` (exact GELU) into a rational polynomial, which is
why exact GELU costs 64 FLOPs per element forward and 79 backward. The per-element constants
below were read off XLA (CPU) for each op alone; at BERT shapes they add 3-6% to the matrix work.

Memory follows JAX's autodiff: an op whose backward runs keeps the tensors its derivative needs
(`saved_bytes`: q, k, v and the softmax for attention, two tensors per norm, the activation's
internals), and a trainable op keeps its input for the weight gradient (`input_bytes`, counted
once per tensor even when several ops read it, as q, k and v read the layer input).

`step_costs` adds what a whole single-device training step holds and does: embeddings, final
norm, head and loss, the optimizer (AdamW with gradient clipping over every parameter that can
train), and the step's peak bytes: parameters, optimizer state, batch, gradients, residuals and
XLA's working buffers. `compiled_step_costs` measures the same figures from XLA;
tests/test_plan_costs_xla.py keeps them within 10% (FLOPs) and 15% (peak bytes).

`model` is any object with arch ("bert" | "roberta" | "gpt2" | "llama"), hidden_size,
intermediate_size, num_layers, num_heads, num_kv_heads (optionally head_dim, activation,
vocab_size, max_position, type_vocab_size, tie_word_embeddings); `method` any object with kind
("full" | "adapter" | "lora" | "parallel" | "top-t"), adapter_sites, reduction_factor,
lora_rank, lora_targets (empty: the architecture's default), top_t, side_reduction and
non_linearity, as ringjax's model and PEFT configs have.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from ringjax.errors import RingjaxError

_DEFAULT_LORA_TARGETS = {"bert": ("query", "value"), "roberta": ("query", "value"),
                         "gpt2": ("qkv",), "llama": ("query", "value")}
_DEFAULT_ACTIVATION = {"bert": "gelu", "roberta": "gelu", "gpt2": "gelu_new", "llama": "silu"}

# XLA's FLOPs per element (forward, backward) and the float tensors JAX keeps for the backward.
_ACTIVATIONS = {
    "gelu": (64, 79, 3), "gelu_new": (8, 16, 2), "gelu_pytorch_tanh": (8, 16, 2),
    "relu": (1, 2, 1.25), "swish": (4, 6, 3), "silu": (4, 6, 3), "tanh": (0, 2, 1),
}
_LAYER_NORM = (8, 15, 5, 2)  # forward, backward to the input, scale + bias gradients, tensors kept
_RMS_NORM = (4, 9, 2, 1)
_SOFTMAX = (6, 7)  # per attention score: scaling, mask, softmax (max, subtract, sum, divide)
_OPTIMIZER = 25  # per trainable scalar: global-norm clipping, AdamW, masking, applying the update
_LOSS = 6  # per logit: log-softmax cross-entropy forward and backward


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
    saved_bytes: float  # forward tensors its input gradient (or a trainable op's) needs
    input_bytes: float = 0.0  # its input, kept when it trains (for the weight gradient)
    input_key: str = ""  # names the input tensor: ops reading the same tensor keep it once
    fwd_elementwise: float = 0.0
    bwd_elementwise: float = 0.0
    bwd_weight_elementwise: float = 0.0


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


def _linear(name, level, tokens, fan_in, fan_out, bias, trainable, dtype_bytes, input_key) -> Op:
    """x @ W (+ b): the input gradient needs only W, so the input is kept only for W's gradient."""
    flops = 2.0 * tokens * fan_in * fan_out
    return Op(name, level, flops, flops, flops, fan_in * fan_out + bias * fan_out, trainable, 0.0,
              tokens * fan_in * dtype_bytes, input_key, fwd_elementwise=bias * tokens * fan_out,
              bwd_weight_elementwise=bias * tokens * fan_out)


def _norm(name, level, tokens, h, arch, trainable, dtype_bytes) -> Op:
    fwd, bwd, bwd_params, kept = _RMS_NORM if arch == "llama" else _LAYER_NORM
    params = h if arch == "llama" else 2 * h
    return Op(name, level, 0.0, 0.0, 0.0, params, trainable, kept * tokens * h * dtype_bytes,
              tokens * h * dtype_bytes, name, fwd_elementwise=fwd * tokens * h, bwd_elementwise=bwd * tokens * h,
              bwd_weight_elementwise=bwd_params * tokens * h)


def _activation(model) -> tuple[float, float, float]:
    name = getattr(model, "activation", None) or _DEFAULT_ACTIVATION[model.arch]
    if name not in _ACTIVATIONS:
        raise RingjaxError(f"no cost model for activation {name!r}: use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _layer_ops(model, method, batch: int, seq_len: int, trained: bool, dtype_bytes: int,
               first_only: bool = False) -> list[Op]:
    """The ops of one backbone layer (with the method's PEFT ops), bottom-up. `first_only`: the
    model's top block under [CLS] pooling, where only the keys and values see every token."""
    arch, h, f = model.arch, model.hidden_size, model.intermediate_size
    heads, kv = model.num_heads, model.num_kv_heads or model.num_heads
    d = getattr(model, "head_dim", 0) or h // heads
    all_tokens, kind = batch * seq_len, method.kind
    tokens = batch if first_only else all_tokens  # the rows the layer's output is computed for
    rows = {"key": all_tokens, "value": all_tokens}  # projections that read every row regardless
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
    # the tensor each projection reads (q, k, v share one; so do the FFN's input projections)
    reads = {"query": "attn_in", "key": "attn_in", "value": "attn_in", "qkv": "attn_in", "attn_out": "context",
             "ffn_in": "ffn_in", "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_out": "hidden"}
    ops = [_linear(name, level[name], rows.get(name, tokens), fan_in, fan_out, bias, whole, dtype_bytes, reads[name])
           for name, fan_in, fan_out in linears]
    # the gradients reaching the attention input from q, k, v (and the residual) are summed there;
    # the attention input is kept whole when any projection reading it trains
    for i, op in enumerate(ops):
        if reads[op.name] == "attn_in":
            ops[i] = dataclasses.replace(op, bwd_elementwise=op.bwd_elementwise + all_tokens * h,
                                         input_bytes=all_tokens * shape[op.name][0] * dtype_bytes)
    scores = tokens * heads * seq_len
    core = 4.0 * scores * d  # scores and weighted values; GQA repeats k, v to all heads
    ops.append(Op("core", level["core"], core, 2 * core, 0.0, 0, False,
                  (tokens * heads * d + all_tokens * 2 * kv * d + 2 * scores) * dtype_bytes,
                  fwd_elementwise=_SOFTMAX[0] * scores, bwd_elementwise=_SOFTMAX[1] * scores))
    for name in ("norm1", "norm2"):
        ops.append(_norm(name, level[name], tokens, h, arch, whole, dtype_bytes))
    for site in ("attn", "ffn"):  # the residual add joining each sub-layer
        ops.append(Op(f"residual_{site}", level[f"adapter_{site}"], 0.0, 0.0, 0.0, 0, False, 0.0,
                      fwd_elementwise=tokens * h))
    act_fwd, act_bwd, act_kept = _activation(model)
    gated = arch == "llama"  # act(gate) * up: one more product, and both factors kept
    ops.append(Op("act", level["act"], 0.0, 0.0, 0.0, 0, False,
                  (act_kept + 2 * gated) * tokens * f * dtype_bytes,
                  fwd_elementwise=(act_fwd + gated) * tokens * f, bwd_elementwise=(act_bwd + 2 * gated) * tokens * f))
    if kind == "lora":
        targets = tuple(method.lora_targets) or _DEFAULT_LORA_TARGETS[arch]
        unknown = [t for t in targets if t not in shape]
        if unknown:
            raise RingjaxError(f"LoRA targets {unknown} are not projections of {arch}: choose from {sorted(shape)}")
        r = method.lora_rank
        for name in targets:
            fan_in, fan_out = shape[name]
            n = rows.get(name, tokens)
            flops = 2.0 * n * r * (fan_in + fan_out)
            kept = all_tokens if reads[name] == "attn_in" else n
            ops.append(Op(f"lora_{name}", level[name], flops, flops, flops, r * (fan_in + fan_out), trained,
                          n * r * dtype_bytes, kept * fan_in * dtype_bytes, reads[name],
                          fwd_elementwise=2 * n * fan_out, bwd_elementwise=n * (fan_in + fan_out)))
    if kind == "adapter":
        width = max(1, h // method.reduction_factor)
        a_fwd, a_bwd, a_kept = _ACTIVATIONS.get(getattr(method, "non_linearity", "relu"), _ACTIVATIONS["relu"])
        for site in method.adapter_sites:
            flops = 4.0 * tokens * h * width
            ops.append(Op(f"adapter_{site}", level[f"adapter_{site}"], flops, flops, flops,
                          2 * h * width + width + h, trained, a_kept * tokens * width * dtype_bytes,
                          tokens * (h + width) * dtype_bytes, f"adapter_{site}",
                          fwd_elementwise=tokens * (width * (1 + a_fwd) + h), bwd_elementwise=tokens * (width * a_bwd + h),
                          bwd_weight_elementwise=tokens * (width + h)))
    return ops


def _side_ops(model, method, batch: int, seq_len: int, dtype_bytes: int) -> list[Op]:
    """PAC's side network beside one tapped layer: tap and mix projections and a narrow attention.

    The tap reads a backbone state (a constant to the side network), so it passes no gradient
    back; everything else lies on the side network's own gradient path.
    """
    h, tokens = model.hidden_size, batch * seq_len
    w = max(1, h // method.side_reduction)
    heads = method.side_heads or max(1, w // 16)
    scores = batch * heads * seq_len**2
    act_fwd, act_bwd, act_kept = _ACTIVATIONS.get(getattr(method, "non_linearity", "relu"), _ACTIVATIONS["relu"])
    tap = _linear("side_tap", 0, tokens, h, w, True, True, dtype_bytes, "side_tap")
    core = 4.0 * batch * seq_len**2 * w
    fuse = [
        dataclasses.replace(tap, bwd_input_flops=0.0, input_bytes=0.0),  # the taps are stored anyway
        _linear("side_mix", 0, tokens, w, w, False, True, dtype_bytes, "side_state"),
        Op("side_act", 0, 0.0, 0.0, 0.0, 0, False, act_kept * tokens * w * dtype_bytes,
           fwd_elementwise=(act_fwd + 2) * tokens * w, bwd_elementwise=(act_bwd + 1) * tokens * w),
    ]
    if not method.side_attention:
        return fuse
    return fuse + [
        _norm("side_norm", 1, tokens, w, "bert", True, dtype_bytes),
        _linear("side_qkv", 2, tokens, w, 3 * w, False, True, dtype_bytes, "side_norm"),
        Op("side_core", 3, core, 2 * core, 0.0, 0, False, (3 * tokens * w + 2 * scores) * dtype_bytes,
           fwd_elementwise=_SOFTMAX[0] * scores, bwd_elementwise=_SOFTMAX[1] * scores),
        _linear("side_out", 4, tokens, w, w, False, True, dtype_bytes, "side_context"),
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


def _default_trained(model, method) -> range:
    L = model.num_layers
    return top_layers(L, min(method.top_t, L)) if method.kind == "top-t" else range(L)


def block_costs(model, method, batch: int, seq_len: int, trained: Iterable[int] | None = None,
                dtype_bytes: int = 4, *, elementwise: bool = True, input_trains: bool = False,
                first_only_top: bool = False) -> tuple[BlockCost, ...]:
    """Per-layer costs for one microbatch when the method's parameters train in layers `trained`.

    `trained` defaults to every layer (the top `top_t` for top-t). For the parallel method the
    backbone only runs forward and each layer's cost includes its slice of the side network.
    `elementwise=False` counts matrix products only; `input_trains` says something below the
    first layer trains (the embeddings, in full fine-tuning), so every layer passes gradients down.
    `first_only_top`: the top layer computes the first position only (`first_only_top_block`).
    """
    L = model.num_layers
    trained = set(_default_trained(model, method) if trained is None else trained)
    if not trained <= set(range(L)):
        raise RingjaxError(f"trained layers {sorted(trained - set(range(L)))} do not exist: the model has {L}")
    backbone = [_layer_ops(model, method, batch, seq_len, layer in trained, dtype_bytes, first_only_top and layer == L - 1)
                for layer in range(L)]
    chains = [(backbone, input_trains)]
    if method.kind == "parallel":
        tapped = set(side_tapped_layers(model, method))
        chains.append(([_side_ops(model, method, batch, seq_len, dtype_bytes) if layer in tapped else []
                        for layer in range(L)], False))
    ew = 1.0 if elementwise else 0.0
    totals = [dict(fwd=0.0, bwd_in=0.0, bwd_w=0.0, params=0, trainable=0, saved=0.0) for _ in range(L)]
    for chain, below in chains:
        positions = [(layer, op.level) for layer, ops in enumerate(chain) for op in ops if op.trainable]
        lowest = (-1, 0) if below else min(positions, default=(L, 0))  # nothing trains: no backward at all
        for layer, ops in enumerate(chain):
            total, kept = totals[layer], set()
            for op in ops:
                through = (layer, op.level) > lowest
                total["fwd"] += op.fwd_flops + ew * op.fwd_elementwise
                total["params"] += op.params
                if through:
                    total["bwd_in"] += op.bwd_input_flops + ew * op.bwd_elementwise
                if through or op.trainable:
                    total["saved"] += op.saved_bytes
                if op.trainable:
                    total["bwd_w"] += op.bwd_weight_flops + ew * op.bwd_weight_elementwise
                    total["trainable"] += op.params
                    if op.input_key not in kept:
                        total["saved"] += op.input_bytes
                        kept.add(op.input_key)
    return tuple(BlockCost(t["fwd"], t["bwd_in"], t["bwd_w"], t["params"], t["trainable"], t["saved"])
                 for t in totals)


def first_only_top_block(model, method, head_kind: str = "classification", pooling: str = "cls") -> bool:
    """Whether the step's top block computes the first position only, as the forward pass does
    for an encoder's [CLS]-pooled head (`ringjax.models.heads.reads_first_token`)."""
    return _family(model.arch) == "bert" and head_kind != "lm" and pooling == "cls" and method.kind != "parallel"


def hidden_state_bytes(model, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """Bytes of one microbatch's hidden state: what a stage sends up (and its gradient down)."""
    return batch * seq_len * model.hidden_size * dtype_bytes


# ---------------------------------------------------------------------------------------------
# A whole training step
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepCost:
    """One training step (or, with `optimizer=False`, one forward-backward) on one device."""

    blocks: tuple[BlockCost, ...]
    embed_flops: float  # embeddings (and the final norm), forward and, where they train, backward
    head_flops: float  # head and loss, forward and backward
    optimizer_flops: float
    param_bytes: float  # every parameter, frozen or not
    trainable_bytes: float  # parameters the optimizer updates (its state covers them)
    optimizer_bytes: float
    gradient_bytes: float
    residual_bytes: float  # activations kept from forward to backward
    workspace_bytes: float  # XLA's other buffers: transient activations, sliced weight copies, taps
    batch_bytes: float
    upload_bytes: float  # bytes of the parameters this step trains (what a DEFT device uploads)

    @property
    def flops(self) -> float:
        return math.fsum([*(b.train_flops for b in self.blocks), self.embed_flops, self.head_flops,
                          self.optimizer_flops])

    @property
    def peak_bytes(self) -> float:
        """Arguments + outputs - donated + temporaries, as XLA's memory analysis reports a step."""
        return math.fsum([self.param_bytes, self.optimizer_bytes, self.batch_bytes, self.gradient_bytes,
                          self.residual_bytes, self.workspace_bytes])


def embedding_params(model) -> int:
    """Token (and position, token-type) tables, embedding and final norms, an untied LM head excluded."""
    h, V = model.hidden_size, getattr(model, "vocab_size", 0)
    family = _family(model.arch)
    if family == "bert":
        return h * (V + getattr(model, "max_position", 0) + max(getattr(model, "type_vocab_size", 0), 1)) + 2 * h
    if family == "gpt2":
        return h * (V + getattr(model, "max_position", 0)) + 2 * h  # + the final norm
    return h * V + h


def head_params(model, num_labels: int, kind: str = "classification") -> int:
    h = model.hidden_size
    if kind == "lm":
        return 0 if getattr(model, "tie_word_embeddings", False) else h * model.vocab_size
    if _family(model.arch) == "bert":
        return h * h + h + h * num_labels + num_labels
    return h * num_labels


def side_tapped_layers(model, method) -> tuple[int, ...]:
    """0-based layers whose output PAC's side network reads (`ringjax.peft.parallel.tap_indices`)."""
    from ringjax.peft.parallel import tap_indices

    return tuple(t - 1 for t in tap_indices(method, model.num_layers)[1:])


def side_network_params(model, method) -> int:
    """PAC side network's parameters: the sizes of the shapes `ringjax.peft.parallel` builds."""
    import jax

    from ringjax.peft.parallel import side_shapes, side_width

    h = model.hidden_size
    shapes = side_shapes(h, len(side_tapped_layers(model, method)), side_width(method, h), method.side_attention)
    return sum(math.prod(shape) for shape in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


def step_costs(model, method, batch: int, seq_len: int, depth: int | None = None, *,
               trained: Iterable[int] | None = None, head_trains: bool = True, optimizer: bool = True,
               num_labels: int = 2, head_kind: str = "classification", dtype_bytes: int = 4,
               elementwise: bool = True, first_only_top: bool | None = None) -> StepCost:
    """Costs of one training step of `batch` x `seq_len` tokens, as `make_train_step` compiles it.

    The top `depth` layers train (default: all, or top_t for top-t); `trained` names the layers
    instead (a DEFT block). `head_trains=False` leaves the head's gradient out (a DEFT block
    below the top); `optimizer=False` prices the forward-backward alone. The optimizer covers
    every parameter that can train under the method (as `leaf_mask`), whatever the depth.
    `first_only_top` defaults to what `make_train_step` does with a [CLS]-pooled head
    (`first_only_top_block`); pass False for a forward that runs the top block whole (DEFT's).
    """
    L, h, kind = model.num_layers, model.hidden_size, method.kind
    if trained is None:
        trained = _default_trained(model, method) if depth is None else top_layers(L, depth)
    trained = sorted(set(trained))
    tokens = batch * seq_len
    embed_trains = kind == "full" and bool(trained) and trained[0] == 0
    if first_only_top is None:
        first_only_top = first_only_top_block(model, method, head_kind)
    blocks = block_costs(model, method, batch, seq_len, trained, dtype_bytes, elementwise=elementwise,
                         input_trains=embed_trains, first_only_top=first_only_top)
    ew = 1.0 if elementwise else 0.0
    family = _family(model.arch)
    tables = {"bert": 3, "gpt2": 2, "llama": 1}[family]
    norm_fwd, norm_bwd, norm_params_bwd, _ = _RMS_NORM if family == "llama" else _LAYER_NORM
    embed_flops = ew * tokens * h * ((tables - 1) + norm_fwd)  # the table sums and one norm
    if embed_trains:
        embed_flops += ew * tokens * h * (norm_bwd + norm_params_bwd + tables)  # norm, scatter-adds

    # head and loss
    outputs = model.vocab_size if head_kind == "lm" else num_labels
    rows = tokens if head_kind == "lm" else batch
    backbone_grads = any(b.bwd_input_flops + b.bwd_weight_flops for b in blocks) or embed_trains
    pooler = family == "bert" and head_kind != "lm"
    head_fwd = 2.0 * rows * h * outputs + ew * _LOSS / 2 * rows * outputs
    head_bwd = ew * _LOSS / 2 * rows * outputs if head_trains or backbone_grads else 0.0
    if pooler:
        head_fwd += 2.0 * batch * h * h + ew * batch * (h + outputs)
        if head_trains:
            head_bwd += 2.0 * batch * h * outputs * 2 + 2.0 * batch * h * h + ew * batch * (4 * h + outputs)
        if backbone_grads:
            head_bwd += 2.0 * batch * h * h + (0.0 if head_trains else 2.0 * batch * h * outputs + ew * 3 * batch * h)
    else:
        if head_trains:
            head_bwd += 2.0 * rows * h * outputs
        if backbone_grads:
            head_bwd += 2.0 * rows * h * outputs

    # parameters
    backbone_params = sum(b.params for b in blocks)  # PEFT and side-network parts come off below
    embed_p = embedding_params(model)
    head_p = head_params(model, num_labels, head_kind)
    peft_p, per_layer_peft = 0, [0] * L
    if kind in ("adapter", "lora"):
        # block_costs counts a layer's PEFT parameters only where it trains; count them everywhere
        every = block_costs(model, method, batch, seq_len, range(L), dtype_bytes, elementwise=False)
        peft_p = sum(b.trainable_params for b in every)
        per_layer_peft = [b.trainable_params for b in every]
        backbone_params -= peft_p
    elif kind == "parallel":
        peft_p = side_network_params(model, method)
        backbone_params -= sum(b.trainable_params for b in blocks)
    total_params = backbone_params + embed_p + head_p + peft_p
    layer_params = backbone_params // L
    if kind == "full":
        trainable_set = total_params
    elif kind == "top-t":
        trainable_set = backbone_params + head_p + (embed_p - _family_embed_tables(model))
    else:
        trainable_set = peft_p + head_p

    # what the step trains (DEFT uploads it)
    if kind in ("full", "top-t"):
        trained_params = layer_params * len(trained) + (embed_p if embed_trains else 0)
    elif kind == "parallel":
        trained_params = peft_p
    else:
        trained_params = sum(per_layer_peft[layer] for layer in trained)
    trained_params += head_p if head_trains else 0

    optimizer_flops = _OPTIMIZER * trainable_set if optimizer else 0.0
    optimizer_bytes = 2 * trainable_set * dtype_bytes if optimizer else 0.0
    per_layer = {"full": layer_params, "top-t": layer_params, "adapter": peft_p // L, "lora": peft_p // L}.get(kind, 0)
    gradient_bytes = _gradient_bytes(trainable_set, L - len(trained), per_layer, optimizer) * dtype_bytes
    residual = math.fsum(b.residual_bytes for b in blocks)
    layer_bytes = (layer_params + peft_p // L) * dtype_bytes
    through = block_costs(model, method, batch, seq_len, [L - 1], dtype_bytes, input_trains=True)[L - 1]
    workspace = _workspace_bytes(L, trained if kind != "parallel" else [], layer_bytes, through.residual_bytes)
    if kind == "parallel":  # the backbone's taps (embedding output and every block's) feed the side network
        workspace += (L + 1) * hidden_state_bytes(model, batch, seq_len, dtype_bytes)
    batch_bytes = (3 * tokens + 2 * batch) * 4
    return StepCost(blocks, embed_flops, head_fwd + head_bwd, optimizer_flops, total_params * dtype_bytes,
                    trainable_set * dtype_bytes, optimizer_bytes, gradient_bytes, residual, workspace, batch_bytes,
                    trained_params * dtype_bytes)


def _family_embed_tables(model) -> int:
    """The embedding parameters that are not the final norm (top-t trains the final norm only)."""
    family = _family(model.arch)
    if family == "bert":
        return embedding_params(model)
    return embedding_params(model) - (2 * model.hidden_size if family == "gpt2" else model.hidden_size)


def _gradient_bytes(trainable_set: int, frozen_layers: int, per_layer: int, optimizer: bool) -> float:
    """Scalars of the gradient buffers: one per parameter that can train, except the rows of
    stacked layers below the cut, whose zero gradient XLA folds into the optimizer update.
    Without the optimizer (a DEFT device) the zero-padded gradient tree is all materialised."""
    return trainable_set - (frozen_layers * per_layer if optimizer else 0)


def _segments(num_layers: int, trained: list[int]) -> list[range]:
    """The runs of layers the forward scans separately: frozen below, trained, frozen above."""
    if not trained:
        return [range(num_layers)]
    bounds = sorted({0, trained[0], trained[-1] + 1, num_layers})
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _workspace_bytes(num_layers: int, trained: list[int], layer_bytes: float, layer_working_set: float) -> float:
    """XLA's buffers beyond parameters, state, batch, gradients and residuals.

    - Copies of the stacked layer weights: a run of layers scanned on its own is a slice of the
      stack, which XLA copies unless it is the whole stack or one layer (a one-trip loop is
      inlined and reads the weights in place).
    - The working set of one layer (taken as the residuals a layer keeps when its whole backward
      runs): the backward loop body's buffers, or half of it when a single trained layer runs
      without a loop or nothing trains (the forward's transients).
    Calibrated on XLA's memory analysis of MiniLM and BERT-base steps.
    """
    runs = _segments(num_layers, trained)
    copies = sum(len(r) for r in runs if 1 < len(r) < num_layers) * layer_bytes
    return copies + layer_working_set * (1.0 if len(trained) > 1 else 0.5)

# ---------------------------------------------------------------------------------------------
# Checking the model against XLA
# ---------------------------------------------------------------------------------------------

def _source_fingerprint() -> str:
    """Hash of the code that shapes a training step, so cached XLA figures go stale with it."""
    import hashlib
    from pathlib import Path

    import jax

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(jax.__version__.encode())
    for sub in ("models", "peft", "train/step.py", "train/optim.py"):
        path = root / sub
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def compiled_step_costs(model, method, batch: int, seq_len: int, depth: int | None = None, *,
                        num_labels: int = 2, cache_dir=None) -> dict:
    """XLA's figures for one single-device training step (`ringjax.train.step.make_train_step`).

    Lowered from shapes only (nothing is materialised). Memory comes from the program as it
    runs (layers under `lax.scan`): peak = arguments + outputs + temporaries - aliased (donated)
    bytes. FLOPs come from the same step compiled with the scans unrolled, because XLA's cost
    analysis counts a while loop's body once, whatever its trip count. `model` is a
    `ModelConfig`, `method` a `PeftConfig`; results are cached in `cache_dir` (a JSON file per
    point, keyed by the step's source code and the JAX version) when given.
    """
    import functools
    import hashlib
    import json
    import unittest.mock
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    from ringjax.models.heads import HeadConfig
    from ringjax.models.model import assemble, random_backbone
    from ringjax.peft.trainable import default_depth, leaf_mask, split
    from ringjax.train.optim import OptimConfig, make_optimizer
    from ringjax.train.step import TrainState, make_train_step

    depth = default_depth(method, model.num_layers) if depth is None else depth
    key = json.dumps([_source_fingerprint(), repr(model), repr(method), batch, seq_len, depth, num_labels])
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        if path.exists():
            return json.loads(path.read_text())["result"]
    head = HeadConfig("classification", num_labels)
    params = jax.eval_shape(lambda k: assemble(model, random_backbone(model, k), head, method, k), jax.random.key(0))
    trainable, frozen = split(params, leaf_mask(params, method))
    optimizer = make_optimizer(OptimConfig(), 1000)
    state = TrainState(trainable, jax.eval_shape(optimizer.init, trainable), jax.ShapeDtypeStruct((), jnp.int32))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    data = {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
            "labels": jax.ShapeDtypeStruct((batch,), jnp.int32)}

    def compile_step(unroll=False):
        step = make_train_step(model, method, head, optimizer, params, depth, unroll=unroll)
        return step.lower(state, frozen, data).compile()

    compiled = compile_step()
    memory = compiled.memory_analysis()
    result = {
        "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes), "alias_bytes": int(memory.alias_size_in_bytes),
    }
    result["peak_bytes"] = (result["argument_bytes"] + result["output_bytes"] + result["temp_bytes"]
                            - result["alias_bytes"])
    result["flops_loop_bodies_once"] = _flops(compiled)
    # the layer scans unroll through the step's own flag; the patch catches any other scan (PAC's side network)
    with unittest.mock.patch.object(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True)):
        result["flops"] = _flops(compile_step(unroll=True))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "result": result}))
    return result


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0))
