"""RingAda training (`RingAda.train`, which `train_ringada` drives): the single-device step's
updates, exactly zero updates for frozen adapters, optimizer state kept across an unfreeze, and
checkpoints that resume in the same phase."""

import jax
import jax.numpy as jnp
import numpy as np
from test_ring_pipeline import FAST, L, make_batch, tiny  # noqa: F401 - the fixture

from ringjax.methods.ringada import RingAda
from ringjax.train.optim import OptimConfig, make_optimizer
from ringjax.train.step import init_state, make_train_step


def test_ringada_matches_single_device_updates_across_an_unfreeze(tiny):  # noqa: F811
    cfg, spec, head, params, trainable, frozen = tiny
    batch = make_batch(False)
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0, decay="constant"), 10)
    run = RingAda(cfg, spec, head, params, devices=2, microbatches=2, unfreeze="0:1,1:2", optimizer=optimizer,
                  stages=(4, 2), compiler_options=FAST)
    ref = init_state(optimizer, jax.tree.map(jnp.array, trainable))  # the step donates its state
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    metrics = list(run.train(iter([batch, batch, batch]), steps=2))
    assert [(m["step"], m["depth"], m["stages"]) for m in metrics] == [(1, 1, [4, 2]), (2, 2, [4, 2])]
    for depth, m in zip((1, 2), metrics):
        ref, ref_metrics = make_train_step(cfg, spec, head, optimizer, params, depth)(ref, frozen, device_batch)
        np.testing.assert_allclose(m["loss"], float(ref_metrics["loss"]), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(run.state.trainable), jax.tree.leaves(ref.trainable)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)

    # adapters below the deepest unfreeze never moved and have no optimizer moments
    start, now = params["peft"]["blocks"], run.params()["peft"]["blocks"]
    for before, after in zip(jax.tree.leaves(start), jax.tree.leaves(now)):
        np.testing.assert_array_equal(np.asarray(after)[: L - 2], np.asarray(before)[: L - 2])
        assert np.any(np.asarray(after)[L - 1] != np.asarray(before)[L - 1])
    mu = run.state.opt_state[1][0].mu["peft"]["blocks"]
    assert all(not np.any(np.asarray(m)[: L - 2]) for m in jax.tree.leaves(mu))

    # a checkpoint resumes in the same phase with the same parameters
    saved = run.state_dict()
    assert saved["unfreeze"]["depth"] == 2 and saved["unfreeze"]["step"] == 2
    again = RingAda(cfg, spec, head, params, devices=2, microbatches=2, unfreeze="all", optimizer=optimizer)
    again.load_state_dict(saved)
    assert again.step == 2 and again.depth() == 2 and again.unfreeze.spec() == "0:1,1:2"
    for a, b in zip(jax.tree.leaves(again.params()), jax.tree.leaves(run.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
