"""Mixed precision: the blocks' projection kernels multiplied in bfloat16.

On CPUs with AVX512-BF16 (this machine's EPYC) XLA runs bf16 matmuls about 2.8x faster than
float32 ones at MiniLM's shapes (292 vs 104 GFLOP/s for 2048x384 @ 384x1536). With compute
dtype bfloat16, `ringjax.peft.ops.linear` multiplies every block projection in bf16 with float32
accumulation, forward and backward; embeddings, norms, softmax, adapters, LoRA factors, the head
and the optimizer stay float32.

- Adapter and LoRA methods never update the backbone, so its kernels are stored in bf16 once
  (`cast_frozen_kernels`): half the memory, no per-step cast.
- Full and top-t fine-tuning keep float32 master kernels in the optimizer and narrow them inside
  the step (`narrow_block_kernels`); their gradients flow back through the cast, as under
  `torch.autocast`. Their evaluation multiplies the float32 master kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ringjax.errors import RingjaxError
from ringjax.peft.config import PeftConfig

COMPUTE_DTYPES = ("float32", "bfloat16")
NARROW_KINDS = ("adapter", "lora", "full", "top-t")  # methods whose step honours a bf16 compute dtype


def check_compute_dtype(name: str) -> None:
    if name not in COMPUTE_DTYPES:
        raise RingjaxError(f"unknown compute dtype {name!r}; choose one of {COMPUTE_DTYPES}")


def narrow_block_kernels(params: dict, dtype: str) -> dict:
    """`params` with every projection kernel of the stacked blocks in `dtype` (other leaves and
    None holes as they are). Differentiable: a kernel's gradient comes back in its own dtype."""
    check_compute_dtype(dtype)
    if dtype == "float32" or "blocks" not in params:
        return params

    def cast(path, leaf):
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        return leaf.astype(jnp.dtype(dtype)) if is_kernel and leaf is not None else leaf

    blocks = jax.tree_util.tree_map_with_path(cast, params["blocks"], is_leaf=lambda x: x is None)
    return {**params, "blocks": blocks}


def cast_frozen_kernels(frozen: dict, dtype: str, spec: PeftConfig) -> dict:
    """The frozen tree stored in the compute dtype (the kernels of full / top-t are trainable
    holes here, narrowed per step instead)."""
    check_compute_dtype(dtype)
    if dtype != "float32" and spec.kind not in NARROW_KINDS:
        raise RingjaxError(f"compute dtype {dtype} applies to {', '.join(NARROW_KINDS)} methods, not {spec.kind}")
    return narrow_block_kernels(frozen, dtype)
