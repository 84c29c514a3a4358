"""The erf GELU with a hand-written backward: same values and gradients as jax.nn.gelu, fewer residuals."""

import jax
import jax.numpy as jnp
import numpy as np

from ringjax.peft.ops import activation, exact_gelu


def test_exact_gelu_matches_jax_gelu_values_and_gradients_into_the_tails():
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001), jax.random.normal(jax.random.key(0), (4096,)) * 3])
    assert activation("gelu") is exact_gelu
    np.testing.assert_allclose(exact_gelu(x), jax.nn.gelu(x, approximate=False), rtol=0, atol=1e-6)
    ours = jax.vmap(jax.grad(exact_gelu))(x)
    theirs = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
    assert float(jax.grad(exact_gelu)(0.0)) == 0.5


def test_exact_gelu_backward_keeps_less_than_autodiff():
    def temp_bytes(gelu):
        def layers(w, x):  # a scan of gelu layers: residuals are stacked per layer, as in the blocks
            return jax.lax.scan(lambda h, wi: (gelu(h @ wi), None), x, w)[0].sum()
        grad = jax.jit(jax.grad(layers, argnums=1))
        w, x = jnp.ones((6, 256, 256)) * 0.01, jnp.ones((512, 256))
        return grad.lower(w, x).compile().memory_analysis().temp_size_in_bytes

    ours, autodiff = temp_bytes(exact_gelu), temp_bytes(lambda v: jax.nn.gelu(v, approximate=False))
    assert ours < 0.8 * autodiff, (ours, autodiff)
