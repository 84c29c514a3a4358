"""bf16 compute: the step follows the float32 one to bf16 accuracy; frozen kernels are stored narrow, trained ones stay float32."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringjax
from ringjax.models import assemble, random_backbone
from ringjax.models.precision import cast_frozen_kernels, narrow_block_kernels
from ringjax.peft import leaf_mask, preset, split
from ringjax.peft.ops import linear, narrow_matmul
from ringjax.train.step import loss_fn

CFG = ringjax.ModelConfig(arch="bert", vocab_size=50, hidden_size=32, num_layers=4, num_heads=4,
                          intermediate_size=64, max_position=32, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
HEAD = ringjax.HeadConfig("classification", 2)
BATCH = {"input_ids": jnp.arange(48).reshape(6, 8) % 50, "attention_mask": jnp.ones((6, 8), jnp.int32),
         "labels": jnp.array([0, 1, 1, 0, 1, 0])}


def test_narrow_matmul_multiplies_in_bf16_both_ways_with_float32_accumulation():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    w = jax.random.normal(jax.random.key(1), (16, 8))
    wb = w.astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(2), (2, 5, 8))
    y, pullback = jax.vjp(narrow_matmul, x, wb)
    dx, dw = pullback(g)
    assert y.dtype == dx.dtype == jnp.float32 and dw.dtype == jnp.bfloat16
    f64 = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)  # noqa: E731  (rounded to bf16, then exact)
    np.testing.assert_allclose(y, f64(x) @ f64(wb), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, f64(g) @ f64(wb).T, rtol=1e-5, atol=1e-5)
    exact_dw = np.einsum("bti,bto->io", f64(x), f64(g))
    np.testing.assert_allclose(np.asarray(dw, np.float64), exact_dw, rtol=1e-2, atol=1e-2)  # rounded once to bf16
    np.testing.assert_allclose(y, x @ w, rtol=0.05, atol=0.05)  # and near the float32 product
    # the blocks' `linear` takes this path for a bf16 kernel
    y_lin, pull_lin = jax.vjp(lambda x: linear(x, {"kernel": wb}), x)
    np.testing.assert_array_equal(y_lin, y)
    np.testing.assert_array_equal(pull_lin(g)[0], dx)


def test_cast_touches_only_the_blocks_kernels_and_keeps_holes():
    spec = preset("houlsby", train_norms=True)
    params = assemble(CFG, random_backbone(CFG, jax.random.key(0)), HEAD, spec, jax.random.key(1))
    _, frozen = split(params, leaf_mask(params, spec))
    cast = cast_frozen_kernels(frozen, "bfloat16", spec)
    assert cast["blocks"]["query"]["kernel"].dtype == jnp.bfloat16
    assert cast["blocks"]["query"]["bias"].dtype == jnp.float32
    assert cast["blocks"]["attn_norm"]["scale"] is None  # trainable here: a hole in the frozen tree
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(cast["embed"]))
    assert cast_frozen_kernels(frozen, "float32", spec) is frozen
    with pytest.raises(ringjax.RingjaxError, match="unknown compute dtype"):
        cast_frozen_kernels(frozen, "float8", spec)
    with pytest.raises(ringjax.RingjaxError, match="not parallel"):
        cast_frozen_kernels(frozen, "bfloat16", preset("parallel"))


@pytest.mark.parametrize("method", ["houlsby", "lora", "full"])
def test_bf16_step_loss_and_gradients_follow_float32(method):
    spec = preset(method)
    params = assemble(CFG, random_backbone(CFG, jax.random.key(0)), HEAD, spec, jax.random.key(1))
    params["peft"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), params["peft"])
    trainable, frozen = split(params, leaf_mask(params, spec))
    grad = jax.jit(jax.value_and_grad(
        lambda t, f, dtype: loss_fn(t, f, BATCH, cfg=CFG, spec=spec, head=HEAD, depth=CFG.num_layers, compute_dtype=dtype),
    ), static_argnums=2)
    loss32, g32 = grad(trainable, frozen, "float32")
    loss16, g16 = grad(trainable, cast_frozen_kernels(frozen, "bfloat16", spec), "bfloat16")
    assert abs(float(loss16) - float(loss32)) < 1e-2 * abs(float(loss32))
    flat32, flat16 = jax.tree.leaves(g32), jax.tree.leaves(g16)
    assert len(flat32) == len(flat16) > 0
    if method == "full":  # the trained kernels keep float32 gradients (through the cast) for the optimizer
        assert g16["blocks"]["ffn_in"]["kernel"].dtype == jnp.float32
    assert any(not np.array_equal(a, b) for a, b in zip(flat32, flat16))  # bf16 kernels were really used
    for a, b in zip(flat32, flat16):
        assert b.dtype == jnp.float32
        scale = max(float(jnp.abs(a).max()), 1e-6)  # floor: the key bias's gradient is zero up to rounding (softmax shift)
        assert float(jnp.abs(a - b).max()) / scale < 0.05  # bf16 keeps ~3 significant digits per product


def test_narrowing_keeps_holes_and_leaves_float32_alone():
    spec = preset("full")
    params = assemble(CFG, random_backbone(CFG, jax.random.key(0)), HEAD, spec, jax.random.key(1))
    trainable, frozen = split(params, leaf_mask(params, spec))
    narrow = narrow_block_kernels(trainable, "bfloat16")
    assert narrow["blocks"]["value"]["kernel"].dtype == jnp.bfloat16
    assert narrow["blocks"]["value"]["bias"].dtype == jnp.float32 and narrow["head"] is trainable["head"]
    assert narrow_block_kernels(trainable, "float32") is trainable
    assert cast_frozen_kernels(frozen, "bfloat16", spec)["blocks"]["value"]["kernel"] is None  # trained: a hole


@pytest.mark.parametrize("letters", ["btk", "kbt"])
def test_bf16_tap_projection_and_its_gradients_follow_float32(letters):
    from ringjax.peft.parallel import project_taps

    shape = {"btk": (3, 5, 4, 16), "kbt": (4, 3, 5, 16)}[letters]
    taps = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
    kernel = 0.1 * jax.random.normal(jax.random.key(1), (4, 16, 8))
    g = jax.random.normal(jax.random.key(2), (4, 3, 5, 8))
    y, pullback = jax.vjp(lambda t, k: project_taps(letters, t, k), taps, kernel)
    y32, pullback32 = jax.vjp(lambda t, k: project_taps(letters, t, k), taps.astype(jnp.float32), kernel)
    assert y.dtype == jnp.float32 and y.shape == (4, 3, 5, 8)
    # multiplied in bf16 (the kernel rounded to bf16), not through a float32 copy of the taps
    exact = np.einsum(f"{letters}h,khw->kbtw", np.asarray(taps, np.float64), np.asarray(kernel.astype(jnp.bfloat16), np.float64))
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, y32, rtol=0.05, atol=0.02)
    (d_taps, d_kernel), (d_taps32, d_kernel32) = pullback(g), pullback32(g)
    assert d_taps.dtype == jnp.bfloat16 and d_kernel.dtype == jnp.float32
    np.testing.assert_allclose(d_kernel, d_kernel32, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(np.asarray(d_taps, np.float32), d_taps32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("method", ["houlsby", "full"])
def test_bench_step_reports_mfu_against_the_peak_of_its_compute_dtype(capsys, tiny_bert_dir, method):
    from ringjax.cli.main import main

    capsys.readouterr()
    assert main(["bench", "step", "--model", str(tiny_bert_dir), "--method", method, "--batch", "4", "--seq", "8",
                 "--repeats", "2", "--compute-dtype", "bfloat16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compute_dtype"] == "bfloat16" and out["seconds_per_step"] > 0 and out["flops_per_step"] > 0
    assert out["gflops_per_second"] == pytest.approx(out["flops_per_step"] / out["seconds_per_step"] / 1e9)
    assert out["mfu"] == pytest.approx(out["gflops_per_second"] / out["matmul_peak_gflops_bfloat16"])
    assert out["mfu_vs_float32_peak"] == pytest.approx(out["gflops_per_second"] / out["matmul_peak_gflops"])
