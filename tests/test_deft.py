"""DEFT execution: the SPMD round equals per-block single-device gradients; skipped work is skipped."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringjax
from ringjax.errors import RingjaxError
from ringjax.methods import deft
from ringjax.models import HeadConfig, assemble, random_backbone
from ringjax.peft import leaf_mask, preset, split
from ringjax.train.optim import OptimConfig, make_optimizer
from ringjax.train.step import init_state, loss_fn

CFG = ringjax.ModelConfig(arch="bert", vocab_size=100, hidden_size=32, num_layers=4, num_heads=4,
                          intermediate_size=64, max_position=64, norm_eps=1e-12, activation="gelu",
                          type_vocab_size=2)
HEAD = HeadConfig("classification", 2)
N, PER_DEVICE, T = 4, 2, 8


def _params(spec, seed=0):
    key = jax.random.key(seed)
    params = assemble(CFG, random_backbone(CFG, key), HEAD, spec, jax.random.key(seed + 1))
    # non-zero adapter up-projections, so every block's gradient depends on the layers above it
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
        if "peft" in jax.tree_util.keystr(path) else x, params)


def _batch(rows, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, rows)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": jnp.asarray(rng.integers(1, CFG.vocab_size, (rows, T)) * mask, jnp.int32),
            "attention_mask": jnp.asarray(mask), "token_type_ids": jnp.zeros((rows, T), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, 2, rows), jnp.int32),
            "example_mask": jnp.ones((rows,), jnp.float32)}


def test_blocks_and_assignments():
    assert deft.block_sizes(6, 4) == (2, 2, 1, 1)
    assert deft.block_ranges((2, 2, 1, 1)) == (range(0, 2), range(2, 4), range(4, 5), range(5, 6))
    assert deft.device_blocks((2, 0, 3), 4).tolist() == [1, 3, 0, 2]  # device 1 idles (branch K = 3)
    assert deft.round_robin(3, 4, 2) == (2, 3, 0)
    with pytest.raises(RingjaxError, match="its own device"):
        deft.device_blocks((1, 1), 4)
    with pytest.raises(RingjaxError, match="--blocks 7"):
        deft.block_sizes(6, 7)
    with pytest.raises(RingjaxError, match="adapter houlsby"):
        deft.check_method(preset("full"))


def _shard(batch, device):
    return jax.tree.map(lambda x: x[device * PER_DEVICE:(device + 1) * PER_DEVICE], batch)


def _reference_grads(spec, trainable, frozen, batch, sizes, assignment):
    """Per block: jax.grad of the single-device loss on its device's shard, restricted to the block."""
    grad = jax.jit(jax.value_and_grad(
        lambda t, b: loss_fn(t, frozen, b, cfg=CFG, spec=spec, head=HEAD, depth=CFG.num_layers)))
    combined = jax.tree.map(jnp.zeros_like, trainable)
    losses = []
    for b, layers in enumerate(deft.block_ranges(sizes)):
        loss, want = grad(trainable, _shard(batch, assignment[b]))
        losses.append(loss)
        combined["peft"]["blocks"] = jax.tree.map(lambda c, w: c.at[layers.start:layers.stop].set(w[layers.start:layers.stop]),
                                                  combined["peft"]["blocks"], want["peft"]["blocks"])
        if b == len(sizes) - 1:  # the head belongs to the top block
            combined["head"] = want["head"]
    return float(np.mean(losses)), combined


def _close(got, want):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)


def test_spmd_round_equals_single_device_block_gradients():
    spec = preset("houlsby")
    params = _params(spec)
    trainable, frozen = split(params, leaf_mask(params, spec))
    sizes, assignment = (2, 1, 1), (2, 0, 3)  # 3 blocks on 4 devices: device 1 idles
    step = deft.DeftStep(CFG, spec, HEAD, sizes, deft.make_mesh(N))
    batch = _batch(N * PER_DEVICE)
    loss, grads = step.loss_and_grads()(trainable, frozen, deft.device_blocks(assignment, N), batch)
    want_loss, want = _reference_grads(spec, trainable, frozen, batch, sizes, assignment)
    _close(grads, want)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for layers in deft.block_ranges(sizes):  # every block's gradient is a real one
        assert max(float(jnp.abs(x[layers.start:layers.stop]).max()) for x in jax.tree.leaves(want["peft"])) > 0


def test_lora_round_is_one_server_update():
    spec = preset("lora")
    params = _params(spec)
    trainable, frozen = split(params, leaf_mask(params, spec))
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    sizes, assignment = (1, 1, 1, 1), (3, 2, 1, 0)
    step = deft.DeftStep(CFG, spec, HEAD, sizes, deft.make_mesh(N))
    batch = _batch(N * PER_DEVICE, seed=1)
    state = init_state(optimizer, trainable)
    want_loss, grads = _reference_grads(spec, trainable, frozen, batch, sizes, assignment)
    updates, _ = optimizer.update(grads, state.opt_state, trainable)
    want = jax.tree.map(lambda p, u: np.asarray(p + u), trainable, updates)
    new, metrics = step.train_step(optimizer, params)(state, frozen, deft.device_blocks(assignment, N), batch)
    _close(new.trainable, want)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    assert int(new.step) == 1


def test_branches_skip_the_backward_below_their_block():
    rows = deft.branch_flops(CFG, preset("houlsby"), HEAD, (2, 2), PER_DEVICE, T, assignment=(1, 2), num_devices=3)
    assert rows[0]["block"] is None and rows[0]["xla_flops"] == 0.0  # the idle device
    assert rows[1]["xla_flops"] > rows[2]["xla_flops"] > 0  # the lower block backpropagates further
    assert rows[1]["model_flops"] > rows[2]["model_flops"] > 0


def _encoded(n, seed):
    from ringjax.data.tokenize import Encoded

    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 12, n)
    ids = rng.integers(5, CFG.vocab_size, lengths.sum()).astype(np.int32)
    labels = rng.integers(0, 2, n).astype(np.int32)
    return Encoded(ids, np.zeros_like(ids), np.concatenate([[0], np.cumsum(lengths)]), labels, 16, 0)


def test_train_deft_end_to_end(tmp_path, tiny_bert_dir):
    from ringjax.train.config import TrainConfig
    from ringjax.train.trainer import prepare

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("bandwidth_hz: 5MHz\ndevices:\n" + "".join(
        f"  - {{name: d{i}, preset: {p}}}\n" for i, p in enumerate(["jetson-nano", "jetson-tx2", "raspberry-pi-4",
                                                                   "jetson-agx-orin"])))
    config = TrainConfig(model=str(tiny_bert_dir), task="synthetic", method="deft", adapter="houlsby", steps=3,
                         batch_size=2, max_length=16, max_train_examples=40, max_eval_examples=12, blocks=3,
                         fleet=str(fleet), out=str(tmp_path / "run"), progress=False)
    summary = deft.train_deft(prepare(config))
    assert summary["steps"] == summary["rounds"] == 3 and summary["blocks"] == 3 and summary["devices"] == 4
    assert 0.0 <= summary["dev_metric"] <= 1.0 and summary["dev_metric_name"] == "accuracy"
    allocation = summary["allocation"]
    assert allocation["policy"] == "optimal" and len(allocation["assignment"]) == 3
    assert allocation["inputs"]["bandwidth_hz"] == 5e6
    assert allocation["round_latency"] <= min(v for k, v in allocation["baselines"].items()
                                              if v is not None and not k.endswith("error")) + 1e-12
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["assignment"] for r in logged if "loss" in r] == [allocation["assignment"]] * 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "deft"


def test_device_batches_are_padded_to_a_common_width_and_shards_keep_their_examples():
    a = {"input_ids": np.ones((2, 16), np.int32), "attention_mask": np.ones((2, 16), np.int32),
         "token_type_ids": np.zeros((2, 16), np.int32), "labels": np.array([0, 1]), "example_mask": np.ones(2)}
    b = {k: (v[:, :32] if v.ndim == 2 else v) for k, v in a.items()}
    b = {**b, "input_ids": np.full((2, 32), 7, np.int32), "attention_mask": np.ones((2, 32), np.int32),
         "token_type_ids": np.zeros((2, 32), np.int32)}
    out = deft.stack_batches([a, b], pad_id=3)
    assert out["input_ids"].shape == (4, 32) and (out["input_ids"][:2, 16:] == 3).all()
    assert (out["attention_mask"][:2, 16:] == 0).all() and out["labels"].tolist() == [0, 1, 0, 1]
    encoded = _encoded(10, 0)
    part = deft._subset(encoded, np.array([2, 5, 7]))
    assert len(part) == 3 and part.labels.tolist() == encoded.labels[[2, 5, 7]].tolist()
    for i, j in enumerate([2, 5, 7]):
        np.testing.assert_array_equal(part.example(i)[0], encoded.example(j)[0])
