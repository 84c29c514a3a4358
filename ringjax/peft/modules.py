"""Create the trainable PEFT parameters for a backbone: stacked like the blocks they attach to."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ringjax.errors import RingjaxError
from ringjax.peft.config import PeftConfig
from ringjax.peft.parallel import init_side_for


def resolve_lora_targets(spec: PeftConfig, blocks: dict, default: tuple[str, ...]) -> tuple[str, ...]:
    targets = spec.lora_targets or default
    projections = sorted(k for k, v in blocks.items() if "kernel" in v)
    unknown = [t for t in targets if t not in projections]
    if unknown:
        raise RingjaxError(f"LoRA targets {unknown} are not projections of this model; choose from {projections}")
    return targets


def init_peft(spec: PeftConfig, blocks: dict, hidden: int, key, default_lora_targets=("query", "value")) -> dict:
    """{"blocks": per-layer adapters or LoRA (leading layer axis), "side": PAC side network}."""
    num_layers = next(iter(jax.tree.leaves(blocks))).shape[0]
    if spec.kind == "adapter":
        width = max(1, hidden // spec.reduction_factor)
        keys = jax.random.split(key, len(spec.adapter_sites))
        return {
            "blocks": {
                "adapter": {
                    site: {
                        "down": {
                            "kernel": spec.init_std * jax.random.normal(k, (num_layers, hidden, width)),
                            "bias": jnp.zeros((num_layers, width)),
                        },
                        "up": {"kernel": jnp.zeros((num_layers, width, hidden)), "bias": jnp.zeros((num_layers, hidden))},
                    }
                    for site, k in zip(spec.adapter_sites, keys)
                }
            }
        }
    if spec.kind == "lora":
        targets = resolve_lora_targets(spec, blocks, default_lora_targets)
        keys = jax.random.split(key, len(targets))
        lora = {}
        for name, k in zip(targets, keys):
            _, fan_in, fan_out = blocks[name]["kernel"].shape
            bound = 1.0 / fan_in**0.5  # kaiming-uniform A and zero B, as Hugging Face PEFT
            lora[name] = {
                "a": jax.random.uniform(k, (num_layers, fan_in, spec.lora_rank), minval=-bound, maxval=bound),
                "b": jnp.zeros((num_layers, spec.lora_rank, fan_out)),
            }
        return {"blocks": {"lora": lora}}
    if spec.kind == "parallel":
        return {"side": init_side_for(spec, key, hidden, num_layers)}
    return {}
