"""Under [CLS] pooling the top block computes the first position only: the same loss and
gradients as the whole block, for less work."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringjax
from ringjax.bench import compiled_flops
from ringjax.models.backbone import forward
from ringjax.models.heads import HeadConfig, example_losses, reads_first_token
from ringjax.peft import leaf_mask, preset, split
from ringjax.peft.trainable import merge

L = 3
CFG = ringjax.ModelConfig(arch="bert", vocab_size=100, hidden_size=32, num_layers=L, num_heads=4, intermediate_size=64,
                          max_position=64, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
HEAD = HeadConfig("classification", 3)


def batch(B=4, T=8):
    rng = np.random.default_rng(0)
    mask = np.ones((B, T), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": jnp.asarray(rng.integers(1, 100, (B, T)), jnp.int32), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(rng.integers(0, 3, B), jnp.int32)}


def loss_and_grads(method: str, depth: int, first_only: bool):
    spec = preset(method)
    key = jax.random.key(0)
    params = ringjax.models.assemble(CFG, ringjax.models.random_backbone(CFG, key), HEAD, spec, key)
    rng = np.random.default_rng(1)  # adapters and LoRA factors off their identity init: every one has a gradient
    params["peft"] = jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape, np.float32), params.get("peft", {}))
    trainable, frozen = split(params, leaf_mask(params, spec))

    def loss(t, b):
        logits = forward(CFG, spec, HEAD, merge(t, frozen), b, depth, logits_only=first_only).logits
        return example_losses(HEAD, logits, b["labels"]).mean()

    return jax.jit(jax.value_and_grad(loss))(trainable, batch())


@pytest.mark.parametrize("method,depth", [("houlsby", 1), ("houlsby", L), ("lora", L), ("full", 2)])
def test_first_position_top_block_gives_the_same_loss_and_gradients(method, depth):
    loss, grads = loss_and_grads(method, depth, True)
    ref_loss, ref_grads = loss_and_grads(method, depth, False)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_first_position_top_block_does_less_work():
    """The top block is 1/L of the forward; at 8 tokens most of it (all but the keys, values and
    the first row) goes."""
    spec = preset("houlsby")
    key = jax.random.key(0)
    params = ringjax.models.assemble(CFG, ringjax.models.random_backbone(CFG, key), HEAD, spec, key)
    flops = {first: compiled_flops(jax.jit(partial(forward, CFG, spec, HEAD, unroll=True, logits_only=first)).lower(params, batch()).compile())
             for first in (False, True)}
    assert (flops[False] - flops[True]) / flops[False] > 0.5 / L, flops


def test_only_first_token_heads_read_the_first_position_alone():
    assert reads_first_token(CFG, HEAD)
    assert not reads_first_token(CFG, HeadConfig("classification", 2, pooling="mean"))
    assert not reads_first_token(CFG, None)
    gpt2 = ringjax.ModelConfig(arch="gpt2", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_position=64, norm_eps=1e-5, activation="gelu_new")
    assert not reads_first_token(gpt2, HEAD)  # a decoder reads each example's last real token
