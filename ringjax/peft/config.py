"""Typed PEFT configurations with named presets, in the manner of AdapterHub's configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ringjax.errors import RingjaxError

KINDS = ("full", "adapter", "lora", "parallel", "top-t")


@dataclass(frozen=True)
class PeftConfig:
    """Which parameters train and how the trainable modules look.

    `kind` picks the family; the other fields only matter for theirs. Hashable, so jitted steps
    can close over it.
    """

    kind: str = "adapter"
    # bottleneck adapters
    adapter_sites: tuple[str, ...] = ("attn", "ffn")
    reduction_factor: int = 16
    non_linearity: str = "swish"
    init_std: float = 1e-2
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # empty: the architecture's default (query, value for attention)
    # top-t layer fine-tuning
    top_t: int = 2
    # parallel adapters (PAC's side network, `ringjax.peft.parallel`): width hidden // side_reduction;
    # it reads the blocks in side_taps (1 = the first block's output), or, when empty, every
    # side_every-th block counted down from the top (every 2nd: MiniLM's 2, 4, 6); side_heads 0
    # means width // 16 attention heads; side_attention=False drops the token-mixing attention
    side_reduction: int = 8
    side_taps: tuple[int, ...] = ()
    side_every: int = 2
    side_attention: bool = True
    side_heads: int = 0
    # adapter and LoRA methods: also train the blocks' layer-norm scales and biases, as Houlsby et
    # al. (2019) do; a few thousand parameters that let the frozen blocks re-scale their features
    train_norms: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RingjaxError(f"unknown PEFT kind {self.kind!r}; choose one of {KINDS}")
        for name in ("reduction_factor", "lora_rank", "side_reduction", "side_every"):
            if getattr(self, name) < 1:
                raise RingjaxError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.init_std > 0:  # a zero down projection and a zero up projection never leave zero
            raise RingjaxError(f"adapter init std must be positive, got {self.init_std}")
        if self.side_heads < 0:
            raise RingjaxError(f"side_heads must be 0 (width // 16) or positive, got {self.side_heads}")
        if self.top_t < 0:  # 0: only the head trains (a federated client's smallest job)
            raise RingjaxError(f"top_t must be at least 0, got {self.top_t}")

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank if self.kind == "lora" else 1.0

    def replace(self, **changes) -> PeftConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, PeftConfig] = {
    "full": PeftConfig(kind="full"),
    # Houlsby et al. 2019: adapters after attention and after the FFN (AdapterHub DoubleSeqBn).
    "houlsby": PeftConfig(kind="adapter", adapter_sites=("attn", "ffn"), non_linearity="swish"),
    # Pfeiffer et al. 2021: one adapter after the FFN (AdapterHub SeqBn).
    "pfeiffer": PeftConfig(kind="adapter", adapter_sites=("ffn",), non_linearity="relu"),
    "lora": PeftConfig(kind="lora"),
    "parallel": PeftConfig(kind="parallel"),
    "top-t": PeftConfig(kind="top-t"),
}


def preset(name: str, **overrides) -> PeftConfig:
    if name not in PRESETS:
        raise RingjaxError(f"unknown PEFT method {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
