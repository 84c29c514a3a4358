"""Loading pretrained backbones, and the Flax NNX module users call.

The pure forward lives in `backbone`; `Model` wraps a parameter tree in NNX variables
(`nnx.Param` for what trains, `Frozen` for the rest) so NNX users get `nnx.state(model,
nnx.Param)`, `nnx.split` and friends, while the library's trainers work on the plain pytree.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringjax.errors import RingjaxError
from ringjax.models import backbone, hub
from ringjax.models.checkpoint_io import check_shapes, map_checkpoint, read_safetensors
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, init_head
from ringjax.peft.config import PeftConfig, preset
from ringjax.peft.modules import init_peft
from ringjax.peft.trainable import default_depth, leaf_mask


class Frozen(nnx.Variable):
    """A pretrained weight that does not train."""


def _shapes(tree):
    return jax.tree.map(lambda s: s, tree, is_leaf=lambda x: isinstance(x, tuple))


def load_backbone(directory: Path, cfg: ModelConfig) -> tuple[dict, dict]:
    """(backbone params {embed, blocks, final}, head weights found in the checkpoint)."""
    arch = backbone.arch(cfg)
    tree = map_checkpoint(read_safetensors(directory), arch.CHECKPOINT_RULES, cfg.num_layers)
    head = tree.pop("head", {})
    tree.setdefault("final", {})
    check_shapes(tree, _shapes(arch.param_shapes(cfg)), f"checkpoint {directory}")
    return jax.tree.map(jnp.asarray, tree), head


def random_backbone(cfg: ModelConfig, key, std: float = 0.02) -> dict:
    """Randomly initialised backbone of a config (tests, cost studies): norms at 1, biases at 0."""
    shapes = backbone.arch(cfg).param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    values = [
        jnp.ones(s) if "scale" in path else jnp.zeros(s) if "bias" in path else std * jax.random.normal(k, s)
        for path, s, k in zip(paths, leaves, keys)
    ]
    tree = jax.tree.unflatten(treedef, values)
    tree.setdefault("final", {})
    return tree


def assemble(cfg: ModelConfig, base: dict, head: HeadConfig | None, spec: PeftConfig, key, loaded_head=None) -> dict:
    """Full parameter tree: backbone + head + PEFT parameters."""
    k_head, k_peft = jax.random.split(key)
    arch = backbone.arch(cfg)
    return {
        **base,
        "head": {} if head is None else init_head(cfg, head, loaded_head or {}, k_head),
        "peft": init_peft(spec, base["blocks"], cfg.hidden_size, k_peft, arch.DEFAULT_LORA_TARGETS),
    }


class Model(nnx.Module):
    """A pretrained transformer with an optional head and PEFT modules.

    Call it like a Hugging Face model: `model(input_ids=..., attention_mask=...)` returns an
    object with `.last_hidden_state` and, with a head, `.logits`.
    """

    def __init__(self, config: ModelConfig, params: dict, head: HeadConfig | None, peft: PeftConfig, directory=None):
        self.config = config
        self.head_config = head
        self.peft_config = peft
        self.directory = directory
        mask = leaf_mask(params, peft)
        self.params = nnx.data(jax.tree.map(lambda m, p: nnx.Param(p) if m else Frozen(p), mask, params))

    @property
    def depth(self) -> int:
        return default_depth(self.peft_config, self.config.num_layers)

    def tree(self) -> dict:
        """The parameters as a plain pytree of arrays (what the functional core takes)."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> backbone.Output:
        input_ids = jnp.asarray(input_ids)
        batch = {
            "input_ids": input_ids,
            "attention_mask": jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask),
        }
        if token_type_ids is not None:
            batch["token_type_ids"] = jnp.asarray(token_type_ids)
        return backbone.forward(self.config, self.peft_config, self.head_config, self.tree(), batch)


def load_model(
    name_or_path: str,
    *,
    head: str | HeadConfig | None = None,
    num_labels: int = 2,
    peft: str | PeftConfig = "full",
    seed: int = 0,
) -> Model:
    """Load a pretrained model: 'minilm', a local Hugging Face directory, or a hub id.

    `head` is None (hidden states only), "classification", "regression" or "lm";
    `peft` is a preset name (full, houlsby, pfeiffer, lora, parallel, top-t) or a PeftConfig.
    """
    directory = hub.resolve(name_or_path)
    cfg = hub.load_config(directory)
    base, loaded_head = load_backbone(directory, cfg)
    head_cfg = HeadConfig(head, num_labels) if isinstance(head, str) else head
    spec = preset(peft) if isinstance(peft, str) else peft
    params = assemble(cfg, base, head_cfg, spec, jax.random.key(seed), loaded_head)
    return Model(cfg, params, head_cfg, spec, directory)


def check_max_length(cfg: ModelConfig, max_length: int) -> None:
    if max_length > cfg.max_length:
        raise RingjaxError(f"max length {max_length} exceeds the model's limit of {cfg.max_length} positions; lower --max-length")


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)
