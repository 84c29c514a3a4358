"""Classification heads: mean pooling averages real tokens only; CLS pooling is Hugging Face's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ringjax.errors import RingjaxError
from ringjax.models.config import ModelConfig
from ringjax.models.heads import HeadConfig, apply_head, head_shapes

CFG = ModelConfig(arch="bert", vocab_size=10, hidden_size=4, num_layers=1, num_heads=1, intermediate_size=8,
                  max_position=16, norm_eps=1e-12, activation="gelu", type_vocab_size=2)


def _params(head):
    keys = iter(jax.random.split(jax.random.key(0), 8))
    return {name: {k: jax.random.normal(next(keys), s) for k, s in shapes.items()}
            for name, shapes in head_shapes(CFG, head).items()}


def test_mean_pooling_ignores_padding_and_cls_reads_the_first_token():
    h = jax.random.normal(jax.random.key(1), (2, 5, 4))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mean, cls = HeadConfig(pooling="mean"), HeadConfig(pooling="cls")
    p = _params(mean)
    logits = apply_head(CFG, mean, p, h, mask, {})
    garbage = h.at[0, 3:].set(1e3)  # padded positions must not matter
    np.testing.assert_allclose(apply_head(CFG, mean, p, garbage, mask, {}), logits, rtol=1e-6)
    expected = jnp.tanh(h[0, :3].mean(0) @ p["pooler"]["kernel"] + p["pooler"]["bias"]) @ p["classifier"]["kernel"]
    np.testing.assert_allclose(logits[0], expected + p["classifier"]["bias"], rtol=1e-5)
    first = jnp.tanh(h[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"]) @ p["classifier"]["kernel"]
    np.testing.assert_allclose(apply_head(CFG, cls, p, h, mask, {}), first + p["classifier"]["bias"], rtol=1e-5)


def test_unknown_pooling_is_a_one_line_error():
    with pytest.raises(RingjaxError, match="unknown pooling 'max'"):
        HeadConfig(pooling="max")
