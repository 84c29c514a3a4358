"""Analytic per-client costs of a local job: peak memory, FLOPs per round, upload bytes per round.

(Written for CAFF because `ringjax/plan/costs.py` did not exist yet; the planner's cost model
can absorb it.) Everything is derived from the model config and the workload (batch B, padded
length T, local steps E), per transformer block:

FLOPs, N = B*T tokens, one step:
- forward of a block: 2*N*in*out for every projection kernel of the block (read from the
  architecture's parameter shapes), plus 4*B*T^2*heads*head_dim for scores and the weighted
  sum, plus elementwise work (activation, norms, biases, residuals, softmax) at XLA's
  per-element counts;
- backward of a trained block: to the input, the same again (the attention part twice); to
  the weights, the projection FLOPs once more. The lowest trained block needs no gradient
  of its own input, so the query/key/value input products are skipped there;
- a LoRA job backpropagates to the input through every block and adds the rank-r products;
- the optimizer adds about `OPT_FLOPS_PER_PARAM` per trainable parameter.

Memory of one client's compiled local step (fp32 unless the params say otherwise):
- every weight (frozen or not), Adam's two moments and a gradient per trainable weight;
- a forward working set: N*(2F + 2H) + 2*B*heads*T^2 elements (one block's widest intermediates);
- saved activations per block that backpropagates: N*(sum over projections of (in + out)
  + 2H + F) + 2*B*heads*T^2 elements: inputs and outputs of every projection, the two norm
  inputs, one more FFN-wide term (fitted: without it the model falls below XLA's measured peak
  for top-1), the attention scores and probabilities (under LoRA, inputs of projections
  without LoRA factors are not kept: they get no weight gradient; nor is the fitted term);
- a loop term when two or more blocks backpropagate through the layer scan: 4*N*F + 3*B*heads*T^2
  elements and two copies of a block's weights (the scan's stacked buffers);
- for full fine-tuning, the embedding backward: 7*N*H elements.
The coefficients were checked on XLA:CPU against `memory_analysis()` of the compiled step for
MiniLM (B in {8, 16, 32}, T in {32, 64}, every depth, full, LoRA) and against
`cost_analysis()` of the unrolled step (the analysis counts a loop body once): the memory model
stays above the measured peak by 0-20% (since the erf GELU keeps only its input for the
backward, `ringjax.peft.ops.exact_gelu`: 3-15% for top-t and full, 17-20% for LoRA at
B x T in {16x64, 32x32, 8x64}), FLOPs agree within 10% (tests/test_fl_costs.py).
A run still measures each distinct job's compiled step before trusting the model
(`ringjax.fl.selection.verify_memory`).

Upload: the trained parameters themselves (top-t: the top t blocks, final norm and head; full:
all; LoRA: the factors and the head), in their dtype, once per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ringjax.fl.clients import LocalJob
from ringjax.models import backbone
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, head_shapes
from ringjax.peft.config import PeftConfig

# XLA's FLOPs per element, as read off XLA (CPU) for each op alone (the same constants as
# ringjax.plan.costs): exact GELU expands erf into a rational polynomial.
OPT_FLOPS_PER_PARAM = 25  # global-norm clipping + AdamW + applying the update, per trainable scalar
ACTIVATION_FLOPS = {"gelu": (64, 79), "gelu_new": (8, 16), "gelu_pytorch_tanh": (8, 16), "relu": (1, 2), "swish": (4, 6), "silu": (4, 6)}
NORM_FLOPS = (8, 15, 5)  # layer norm: forward, backward to input, scale/bias gradients, per element
SOFTMAX_FLOPS = (6, 7)  # scale, mask, softmax; per attention score, forward and backward


@dataclass(frozen=True)
class Workload:
    """One client's local work per round: E steps of B examples padded to T tokens."""

    batch_size: int = 16
    seq_len: int = 64
    local_steps: int = 5
    bytes_per_param: int = 4
    bytes_per_activation: int = 4


@dataclass(frozen=True)
class ClientCost:
    memory_bytes: float
    flops_per_round: float
    upload_bytes: float

    def fits(self, budget) -> bool:
        return (
            self.memory_bytes <= budget.memory_bytes
            and self.flops_per_round <= budget.flops_per_round
            and self.upload_bytes <= budget.upload_bytes
        )

    def binding(self, budget) -> list[str]:
        """The budget dimensions this cost exceeds."""
        out = []
        if self.memory_bytes > budget.memory_bytes:
            out.append("memory")
        if self.flops_per_round > budget.flops_per_round:
            out.append("flops")
        if self.upload_bytes > budget.upload_bytes:
            out.append("upload")
        return out


def _count(shapes) -> int:
    if isinstance(shapes, tuple):
        return math.prod(shapes)
    return sum(_count(v) for v in shapes.values())


def _per_layer(shapes) -> int:
    if isinstance(shapes, tuple):
        return math.prod(shapes[1:])
    return sum(_per_layer(v) for v in shapes.values())


class CostModel:
    """Costs of local jobs for one model, head and workload."""

    def __init__(self, cfg: ModelConfig, head: HeadConfig, workload: Workload = Workload(), lora: PeftConfig = PeftConfig(kind="lora")):
        self.cfg, self.head, self.workload, self.lora = cfg, head, workload, lora
        shapes = backbone.arch(cfg).param_shapes(cfg)
        self.L = cfg.num_layers
        self.block_params = _per_layer(shapes["blocks"])
        self.embed_params = _count(shapes["embed"])
        self.final_params = _count(shapes.get("final", {}))
        self.head_params = _count(head_shapes(cfg, head))
        self.total_params = self.embed_params + self.L * self.block_params + self.final_params + self.head_params
        # projection kernels (in, out) of one block
        self.kernels = {name: sub["kernel"][1:] for name, sub in shapes["blocks"].items() if isinstance(sub, dict) and "kernel" in sub}
        targets = lora.lora_targets or backbone.arch(cfg).DEFAULT_LORA_TARGETS
        self.lora_kernels = {name: self.kernels[name] for name in targets if name in self.kernels}
        self.lora_params_per_block = sum(lora.lora_rank * (i + o) for i, o in self.lora_kernels.values())

    # --------------------------------------------------------------------- pieces

    @property
    def tokens(self) -> int:
        return self.workload.batch_size * self.workload.seq_len

    @property
    def scores(self) -> int:
        w = self.workload
        return w.batch_size * self.cfg.num_heads * w.seq_len * w.seq_len

    def block_flops(self) -> dict[str, float]:
        """One block, one step: forward, backward to its input, backward to its weights."""
        cfg, n = self.cfg, self.tokens
        h, f = cfg.hidden_size, cfg.intermediate_size
        act_f, act_b = ACTIVATION_FLOPS.get(cfg.activation, (8, 16))
        proj = sum(2 * n * i * o for i, o in self.kernels.values())
        attn = 2 * 2 * self.scores * cfg.head_dim
        biases = sum(o for _, o in self.kernels.values())
        # elementwise: activation, two norms, biases, two residual adds, softmax
        fwd_elem = n * (act_f * f + 2 * NORM_FLOPS[0] * h + biases + 2 * h) + SOFTMAX_FLOPS[0] * self.scores
        bwd_elem = n * (act_b * f + 2 * NORM_FLOPS[1] * h + 2 * h) + SOFTMAX_FLOPS[1] * self.scores
        weight_elem = n * (biases + 2 * NORM_FLOPS[2] * h)
        qkv_input = sum(2 * n * i * o for name, (i, o) in self.kernels.items() if name in ("query", "key", "value"))
        return {
            "forward": proj + attn + fwd_elem,
            "backward_input": proj + 2 * attn + bwd_elem,
            "backward_weights": proj + weight_elem,
            "qkv_input": qkv_input,
        }

    def embed_flops(self, trains: bool) -> float:
        """Table sums and the embedding norm; their backward (scatter-adds) when they train."""
        h = self.cfg.hidden_size
        fwd = self.tokens * h * (2 + NORM_FLOPS[0])
        return fwd + (self.tokens * h * (NORM_FLOPS[1] + NORM_FLOPS[2] + 3) if trains else 0.0)

    def head_flops(self) -> float:
        """Forward and backward of the head, one step (it reads one position per example)."""
        return 3 * 2 * self.workload.batch_size * sum(math.prod(s["kernel"]) for s in head_shapes(self.cfg, self.head).values())

    def activation_elements_per_block(self, lora: bool = False) -> float:
        """Saved for backward; under LoRA a frozen projection's input is not kept (no weight grad)."""
        cfg = self.cfg
        per_token = sum(i + o for i, o in self.kernels.values()) + 2 * cfg.hidden_size
        if lora:
            per_token -= sum(i for name, (i, _) in self.kernels.items() if name not in self.lora_kernels and name not in ("query", "key", "value"))
            per_token -= 0 if any(n in self.lora_kernels for n in ("query", "key", "value")) else self.cfg.hidden_size
        else:
            per_token += cfg.intermediate_size  # the fitted FFN-wide term (module docstring); LoRA's peaks do without it
        return self.tokens * per_token + 2 * self.scores

    def working_elements(self) -> float:
        cfg = self.cfg
        return self.tokens * (2 * cfg.intermediate_size + 2 * cfg.hidden_size) + 2 * self.scores

    def loop_elements(self) -> float:
        return 4 * self.tokens * self.cfg.intermediate_size + 3 * self.scores

    def trainable_params(self, job: LocalJob) -> int:
        if job.kind == "top-t":
            return job.depth * self.block_params + self.final_params + self.head_params
        if job.kind == "full":
            return self.total_params
        return self.L * self.lora_params_per_block + self.head_params

    # --------------------------------------------------------------------- totals

    def step_flops(self, job: LocalJob) -> float:
        b = self.block_flops()
        fwd = self.L * b["forward"] + self.head_flops() / 3 + self.embed_flops(job.kind == "full")
        if job.kind == "lora":
            lora_fwd = sum(2 * self.tokens * self.lora.lora_rank * (i + o) for i, o in self.lora_kernels.values())
            bwd = self.L * (b["backward_input"] + 3 * lora_fwd) - b["qkv_input"]
            fwd += self.L * lora_fwd
        else:
            t = self.L if job.kind == "full" else job.depth
            bwd = t * (b["backward_input"] + b["backward_weights"]) - (b["qkv_input"] if t > 0 else 0)
        bwd += 2 * self.head_flops() / 3
        return fwd + bwd + OPT_FLOPS_PER_PARAM * self.trainable_params(job)

    def memory_bytes(self, job: LocalJob) -> float:
        w = self.workload
        p_train = self.trainable_params(job)
        weights = self.total_params + (self.L * self.lora_params_per_block if job.kind == "lora" else 0)
        params = w.bytes_per_param * (weights + 3 * p_train)  # weights, Adam m and v, gradients
        backprop_blocks = self.L if job.kind in ("full", "lora") else job.depth
        acts = self.working_elements() + backprop_blocks * self.activation_elements_per_block(job.kind == "lora")
        if job.kind == "full":  # the embedding backward: gathered rows' gradients, norm residuals
            acts += 7 * self.tokens * self.cfg.hidden_size
        loop = 0.0
        if backprop_blocks >= 2:
            acts += self.loop_elements()
            loop = 2 * w.bytes_per_param * self.block_params
        batch = 4 * (3 * self.tokens + w.batch_size)
        return params + w.bytes_per_activation * acts + loop + batch

    def upload_bytes(self, job: LocalJob) -> float:
        return self.workload.bytes_per_param * self.trainable_params(job)

    def cost(self, job: LocalJob) -> ClientCost:
        return ClientCost(self.memory_bytes(job), self.workload.local_steps * self.step_flops(job), self.upload_bytes(job))

    def table(self) -> list[tuple[str, ClientCost]]:
        """Costs of every top-t depth, full fine-tuning and LoRA: for reports and fleet design."""
        rows = [(f"top-{t}", self.cost(LocalJob("top-t", t))) for t in range(self.L + 1)]
        return rows + [("full", self.cost(LocalJob("full", self.L))), ("lora", self.cost(LocalJob("lora", self.L)))]
