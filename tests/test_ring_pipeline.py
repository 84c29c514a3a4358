"""The ring pipeline equals the single-device computation; labels never leave their owner.

Each case compiles one ring program of a tiny 6-block BERT (8 examples x 8 tokens) on emulated
CPU devices, so the cases cover N in {2, 4}, M in {1, 4, 8}, depths {top block, middle, all},
uneven stages, cuts inside a stage and at a stage boundary, both schedules and both residual
modes without taking the full product.
"""

import functools
import re
from functools import partial

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

import ringjax
from ringjax.models.heads import HeadConfig
from ringjax.parallel import RingPipeline, make_stage_mesh, plan_stages
from ringjax.peft import leaf_mask, preset, split
from ringjax.train.step import loss_fn

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: compile time dominates
L = 6


@functools.cache
def tiny_model():
    """A tiny 6-block BERT with Houlsby adapters (built once per process, shared by the ring tests)."""
    cfg = ringjax.ModelConfig(arch="bert", vocab_size=100, hidden_size=32, num_layers=L, num_heads=4,
                              intermediate_size=64, max_position=64, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
    key = jax.random.key(0)
    spec, head = preset("houlsby"), HeadConfig("classification", 2)
    params = ringjax.models.assemble(cfg, ringjax.models.random_backbone(cfg, key), head, spec, key)
    # adapters away from their identity init, so every adapter has a real gradient
    rng = np.random.default_rng(1)
    params["peft"] = jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape, np.float32), params["peft"])
    trainable, frozen = split(params, leaf_mask(params, spec))
    return cfg, spec, head, params, trainable, frozen


@pytest.fixture
def tiny():
    return tiny_model()


def make_batch(with_mask: bool, B: int = 8, T: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    for i, n in enumerate(rng.integers(3, T + 1, B)):
        mask[i, n:] = 0
    batch = {"input_ids": rng.integers(1, 100, (B, T)).astype(np.int32), "attention_mask": mask,
             "token_type_ids": rng.integers(0, 2, (B, T)).astype(np.int32), "labels": rng.integers(0, 2, (B,)).astype(np.int32)}
    if with_mask:
        batch["example_mask"] = np.array([1, 1, 0, 1, 1, 1, 1, 0], np.float32)[:B]
    return batch


_references = {}


def reference(tiny, depth: int, batch: dict, trainable=None):
    """The single-device `jax.value_and_grad(loss_fn)` (one compiled function per depth and batch keys)."""
    cfg, spec, head, _, initial, frozen = tiny
    key = (depth, tuple(sorted(batch)))
    if key not in _references:
        fn = partial(loss_fn, cfg=cfg, spec=spec, head=head, depth=depth)
        _references[key] = jax.jit(jax.value_and_grad(fn), compiler_options=FAST)
    return _references[key](initial if trainable is None else trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})


CASES = [  # N, M, depth, stage sizes, schedule, residuals, example_mask
    (2, 1, 6, "equal", "gpipe", "keep", False),
    (2, 4, 1, (4, 2), "1f1b", "keep", True),  # top block inside a 2-block stage: the stage stops at its cut
    (2, 8, 4, (3, 3), "gpipe", "recompute", False),  # cut inside stage 0, stage 1 sends input gradients
    (4, 1, 3, (1, 2, 2, 1), "1f1b", "keep", False),  # cut on a stage boundary: stage 2 sends none
    (4, 4, 6, (2, 1, 2, 1), "1f1b", "keep", True),
    (4, 8, 1, "equal", "gpipe", "keep", False),
]


@functools.cache
def ring_result(N, M, depth, sizes, schedule, residuals, with_mask):
    """(loss, grads) of one case on N devices (emulated here, or N processes in test_multiprocess)."""
    cfg, spec, head, _, trainable, frozen = tiny_model()
    batch = make_batch(with_mask)
    pipe = RingPipeline(cfg, spec, head, make_stage_mesh(N), plan_stages(L, N, sizes), M, depth,
                        schedule=schedule, residuals=residuals, compiler_options=FAST)
    replicated = jax.sharding.NamedSharding(pipe.mesh, jax.sharding.PartitionSpec())
    step = jax.jit(pipe.loss_and_grads, out_shardings=replicated, compiler_options=FAST)
    loss, grads = step(trainable, pipe.place_frozen(frozen), pipe.shard_batch(batch))
    local = lambda x: np.asarray(x.addressable_data(0))  # noqa: E731 - replicated: any copy is the whole value
    return float(local(loss)), jax.tree.map(local, grads)


@pytest.mark.parametrize("N,M,depth,sizes,schedule,residuals,with_mask", CASES)
def test_ring_loss_and_gradients_equal_single_device(tiny, N, M, depth, sizes, schedule, residuals, with_mask):
    loss, grads = ring_result(N, M, depth, sizes, schedule, residuals, with_mask)
    ref_loss, ref_grads = reference(tiny, depth, make_batch(with_mask))

    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, atol=1e-6)
    cut = L - depth
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5, err_msg=name)
        if "peft" in name:
            assert not np.any(np.asarray(g)[:cut]), f"{name}: frozen layers got a gradient"
            assert np.all(np.abs(np.asarray(g)[cut:]).reshape(depth, -1).max(1) > 0), f"{name}: a trainable layer got none"


def test_frozen_stages_run_no_backward_and_keep_no_residuals(tiny):
    cfg, spec, head, *_ = tiny
    pipe = RingPipeline(cfg, spec, head, make_stage_mesh(4), plan_stages(L, 4, (2, 2, 1, 1)), 8, 1)
    kinds = {(a.stage, a.kind) for a in pipe.schedule.actions}
    assert {s for s, k in kinds if k == "bwd"} == {3}
    assert [p.trains for p in pipe.programs] == [False, False, False, True]
    assert pipe.schedule.slots == 2  # 1F1B: the top stage holds two microbatches' residuals, not M
    assert not any(p.dx for p in pipe.programs)  # nothing below the top block needs an input gradient


# ---- labels never leave their owner -------------------------------------------------------------

COLLECTIVES = ("ppermute", "psum", "all_gather", "all_to_all", "psum_scatter", "reduce_scatter", "pmax", "pmin")


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


def _taint(jaxpr, tainted_in, found):
    """Propagate "depends on labels" through a jaxpr; record collectives with a tainted operand."""
    tainted = {v for v, t in zip(jaxpr.invars, tainted_in) if t}
    is_t = lambda v: isinstance(v, jcore.Var) and v in tainted  # noqa: E731
    for eqn in jaxpr.eqns:
        ins = [is_t(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in COLLECTIVES:
            for v, t in zip(eqn.invars, ins):
                if t:
                    found.append((name, v.aval))
        subs = list(_subjaxprs(eqn))
        if name == "cond":
            outs = [False] * len(eqn.outvars)
            for sub in subs:
                sub_out = _taint(sub, ins[1:], found)
                outs = [a or b or ins[0] for a, b in zip(outs, sub_out)]
        elif name == "scan":
            nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
            carry = ins[nc:nc + ncarry]
            while True:  # fixed point over the loop-carried values
                out = _taint(subs[0], ins[:nc] + carry + ins[nc + ncarry:], [])
                new = [a or b for a, b in zip(carry, out[:ncarry])]
                if new == carry:
                    break
                carry = new
            outs = _taint(subs[0], ins[:nc] + carry + ins[nc + ncarry:], found)
        elif len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):
            outs = _taint(subs[0], ins, found)
        else:
            outs = [any(ins)] * len(eqn.outvars)
            for sub in subs:
                _taint(sub, [any(ins)] * len(sub.invars), found)
        tainted |= {o for o, t in zip(eqn.outvars, outs) if t}
    return [is_t(v) for v in jaxpr.outvars]


def test_labels_are_never_an_operand_of_a_collective(tiny):
    cfg, spec, head, _, trainable, frozen = tiny
    pipe = RingPipeline(cfg, spec, head, make_stage_mesh(2), plan_stages(L, 2), 4, 6)
    placed = pipe.place_frozen(frozen)
    batch = make_batch(False)

    def collectives(labels_dtype):
        data = pipe.shard_batch({**batch, "labels": batch["labels"].astype(labels_dtype)})
        text = jax.jit(pipe.loss_and_grads).lower(trainable, placed, data).as_text()
        ops = [line.split("=", 1)[1].strip() for line in text.splitlines()
               if any(f"stablehlo.{c}" in line for c in ("collective_permute", "all_gather", "all_reduce", "all_to_all", "reduce_scatter"))]
        return sorted(op.split("(")[0] + op.rsplit(":", 1)[-1] for op in ops)

    # 1. A collective that carried labels would change type with them: none does, none is int8.
    wide, narrow = collectives(np.int32), collectives(np.int8)
    assert wide and wide == narrow
    assert not any("i8" in op for op in narrow)

    # 2. Data flow: the only collectives fed by labels carry float loss values and gradients,
    #    and the token/mask all-gathers do not depend on labels at all.
    data = pipe.shard_batch(batch)
    closed = jax.make_jaxpr(pipe.loss_and_grads)(trainable, placed, data)
    flat_args = jax.tree.leaves((trainable, placed, data))
    label_leaf = data["labels"]
    found = []
    _taint(closed.jaxpr, [a is label_leaf for a in flat_args], found)
    assert found, "the loss gradient must flow back from the owners"
    assert all(jnp.issubdtype(aval.dtype, jnp.floating) for _, aval in found), found
    assert not any(name == "all_gather" for name, _ in found), found


def test_stash_is_written_in_place_never_copied_whole(tiny):
    """Four distinct training programs (stages 2, 1, 2, 1, all unfrozen; the top stage's block
    computes the [CLS] position only) each write their residuals into the stash; if one
    conditional had several writing branches, XLA would copy the whole (slots x residuals) stash
    in each of them on every tick."""
    cfg, spec, head, _, trainable, frozen = tiny
    pipe = RingPipeline(cfg, spec, head, make_stage_mesh(4), plan_stages(L, 4, (2, 1, 2, 1)), 4, 6, compiler_options=FAST)
    assert len({p for p in pipe.programs if p.trains}) == 4
    data = pipe.shard_batch(make_batch(False))
    text = jax.jit(pipe.loss_and_grads, compiler_options=FAST).lower(trainable, pipe.place_frozen(frozen), data).compile().as_text()
    stash_shaped = re.compile(rf"= f32\[{pipe.schedule.slots},\d{{4,}}\]\S* copy\(")
    assert "dynamic-update-slice" in text
    assert not [line for line in text.splitlines() if stash_shaped.search(line)]


def test_ring_with_mean_pooling_equals_single_device(tiny):
    """Mean pooling reads every position, so the top block runs whole there: that path matches too."""
    cfg, spec, _, _, trainable, frozen = tiny
    head = HeadConfig("classification", 2, pooling="mean")
    batch = make_batch(True)
    pipe = RingPipeline(cfg, spec, head, make_stage_mesh(2), plan_stages(L, 2, (4, 2)), 4, 3, compiler_options=FAST)
    assert not any(p.first_only for p in pipe.programs)
    loss, grads = jax.jit(pipe.loss_and_grads, compiler_options=FAST)(trainable, pipe.place_frozen(frozen), pipe.shard_batch(batch))
    fn = jax.value_and_grad(partial(loss_fn, cfg=cfg, spec=spec, head=head, depth=3))
    ref_loss, ref_grads = jax.jit(fn, compiler_options=FAST)(trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_a_stash_carried_across_steps_changes_nothing(tiny, schedule):
    """The stash a step returns (donated back next step) still holds the last batch's residuals;
    every row is written before it is read, so the next batch's loss and gradients equal a fresh
    zero-filled stash's."""
    cfg, spec, head, _, trainable, frozen = tiny
    pipe = RingPipeline(cfg, spec, head, make_stage_mesh(4), plan_stages(L, 4, (2, 1, 1, 2)), 4, L, schedule=schedule,
                        compiler_options=FAST)
    fresh = jax.jit(pipe.loss_and_grads, compiler_options=FAST)
    carried = jax.jit(pipe.loss_and_grads, donate_argnums=3, compiler_options=FAST)
    placed = pipe.place_frozen(frozen)
    stash = pipe.new_stash(trainable, frozen, pipe.shard_batch(make_batch(False)))
    assert stash and all(x.shape[0] == 4 * pipe.schedule.slots for x in stash.values())
    for with_mask in (False, True, False):  # a different batch each step
        data = pipe.shard_batch(make_batch(with_mask))
        loss, grads, stash = carried(trainable, placed, data, stash)
        ref_loss, ref_grads = fresh(trainable, placed, data)
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(ref_loss))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
