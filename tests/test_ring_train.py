"""RingAda training (`RingAda.train`, which `train_ringada` drives): the single-device step's
updates, exactly zero updates for frozen adapters, optimizer state kept across an unfreeze, and
checkpoints that resume in the same phase."""

import threading
from functools import partial

import jax
import numpy as np
from test_ring_pipeline import FAST, L, make_batch, reference, tiny  # noqa: F401 - the fixture

from ringjax.methods.ringada import RingAda
from ringjax.peft import layer_mask, split
from ringjax.train.optim import OptimConfig, make_optimizer, masked_apply


def test_ringada_matches_single_device_updates_across_an_unfreeze(tiny):  # noqa: F811
    cfg, spec, head, params, trainable, frozen = tiny
    batch = make_batch(False)
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0, decay="constant"), 10)
    run = RingAda(cfg, spec, head, params, devices=2, microbatches=2, unfreeze="0:1,1:3", optimizer=optimizer,
                  stages=(4, 2), compiler_options=FAST)
    metrics = list(run.train(iter([batch, batch, batch]), steps=2))
    assert [(m["step"], m["depth"], m["stages"]) for m in metrics] == [(1, 1, [4, 2]), (2, 3, [4, 2])]

    # the single-device step (make_train_step's update: masked_apply with the depth's layer mask)
    ref, opt_state = trainable, optimizer.init(trainable)
    present = jax.tree.map(lambda x: x is not None, trainable, is_leaf=lambda x: x is None)
    update = jax.jit(partial(masked_apply, optimizer), compiler_options=FAST)
    for depth, m in zip((1, 3), metrics):
        ref_loss, grads = reference(tiny, depth, batch, ref)
        np.testing.assert_allclose(m["loss"], float(ref_loss), rtol=1e-6)
        ref, opt_state = update(grads, opt_state, ref, split(layer_mask(params, spec, depth, L), present)[0])
    for got, want in zip(jax.tree.leaves(run.state.trainable), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)

    # adapters below the deepest unfreeze never moved and have no optimizer moments
    start, now = params["peft"]["blocks"], run.params()["peft"]["blocks"]
    for before, after in zip(jax.tree.leaves(start), jax.tree.leaves(now)):
        np.testing.assert_array_equal(np.asarray(after)[: L - 3], np.asarray(before)[: L - 3])
        assert np.any(np.asarray(after)[L - 3] != np.asarray(before)[L - 3])
    mu = run.state.opt_state[1][0].mu["peft"]["blocks"]
    assert all(not np.any(np.asarray(m)[: L - 3]) for m in jax.tree.leaves(mu))

    # a checkpoint resumes in the same phase with the same parameters
    saved = run.state_dict()
    assert saved["unfreeze"]["depth"] == 3 and saved["unfreeze"]["step"] == 2
    again = RingAda(cfg, spec, head, params, devices=2, microbatches=2, unfreeze="all", optimizer=optimizer)
    again.load_state_dict(saved)
    assert again.step == 2 and again.depth() == 3 and again.unfreeze.spec() == "0:1,1:3"
    for a, b in zip(jax.tree.leaves(again.params()), jax.tree.leaves(run.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_next_phase_compiles_on_the_helper_thread_once(tiny):  # noqa: F811
    cfg, spec, head, params, trainable, frozen = tiny
    batch = make_batch(False)
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0, decay="constant"), 10)
    compiles = []

    def record(event, duration, fun_name=None, **_):
        if event == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(train_step)":
            compiles.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        losses = {}
        for ahead in (True, False):
            compiles.clear()
            run = RingAda(cfg, spec, head, params, devices=2, microbatches=2, unfreeze="0:1,2:2,9:3", optimizer=optimizer,
                          stages=(4, 2), compiler_options=FAST, compile_ahead=ahead)
            metrics = list(run.train(iter([batch] * 4), steps=4))
            assert [m["depth"] for m in metrics] == [1, 1, 2, 2]
            losses[ahead] = [m["loss"] for m in metrics]
            # one compile per depth; depth 2 ahead on the helper thread, and depth 3 (step 9) not at all
            helper = ["ringada-compile-ahead" in name for name in compiles]
            assert helper == ([False, True] if ahead else [False, False])
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert losses[True] == losses[False]
