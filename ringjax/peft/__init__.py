"""Parameter-efficient fine-tuning: adapters, LoRA, parallel adapters, top-t, full."""

from ringjax.peft.config import PRESETS, PeftConfig, preset
from ringjax.peft.modules import init_peft
from ringjax.peft.trainable import default_depth, layer_mask, leaf_mask, merge, split

__all__ = ["PRESETS", "PeftConfig", "default_depth", "init_peft", "layer_mask", "leaf_mask", "merge", "preset", "split"]
