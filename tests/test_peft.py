"""The PEFT library: identity at init, what trains at each depth, export round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import ringjax
from ringjax.models import assemble, forward, random_backbone
from ringjax.peft import layer_mask, leaf_mask, preset, split
from ringjax.peft.export import export_hf_peft, load_trainable, save_trainable
from ringjax.train.config import PRESETS as TRAIN_PRESETS
from ringjax.train.optim import OptimConfig, make_optimizer
from ringjax.train.step import init_state, make_train_step

CFG = ringjax.ModelConfig(arch="bert", vocab_size=50, hidden_size=32, num_layers=4, num_heads=4,
                          intermediate_size=64, max_position=32, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
HEAD = ringjax.HeadConfig("classification", 2)
BATCH = {"input_ids": jnp.arange(24).reshape(3, 8) % 50, "attention_mask": jnp.ones((3, 8), jnp.int32),
         "labels": jnp.array([0, 1, 1])}


def _params(method, **overrides):
    spec = preset(method, **overrides)
    return spec, assemble(CFG, random_backbone(CFG, jax.random.key(0)), HEAD, spec, jax.random.key(1))


@pytest.mark.parametrize("method, overrides", [("houlsby", {}), ("houlsby", {"init_std": 0.1}), ("pfeiffer", {}),
                                               ("lora", {}), ("parallel", {})])
def test_fresh_peft_modules_leave_the_backbone_output_unchanged(method, overrides):
    spec, params = _params(method, **overrides)
    _, plain = _params("full")
    plain["head"] = params["head"]
    got = forward(CFG, spec, HEAD, params, BATCH).logits
    want = forward(CFG, preset("full"), HEAD, plain, BATCH).logits
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_adapter_init_std_scales_the_down_projection():
    """init_std sets the down projection's scale (the zero up projection keeps the identity: test above)."""
    down = lambda p: p["peft"]["blocks"]["adapter"]["ffn"]["down"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(down(_params("houlsby", init_std=0.1)[1]), 10.0 * down(_params("houlsby")[1]), rtol=1e-6)


def test_adapter_sites_and_sizes_follow_the_presets():
    _, houlsby = _params("houlsby")
    _, pfeiffer = _params("pfeiffer")
    assert set(houlsby["peft"]["blocks"]["adapter"]) == {"attn", "ffn"}
    assert set(pfeiffer["peft"]["blocks"]["adapter"]) == {"ffn"}
    assert houlsby["peft"]["blocks"]["adapter"]["ffn"]["down"]["kernel"].shape == (4, 32, 32 // 16)


def test_unknown_lora_target_is_a_clear_error():
    with pytest.raises(ringjax.RingjaxError, match="not projections of this model"):
        _params("lora", lora_targets=("q_proj",))


@pytest.mark.parametrize("method, depth", [("houlsby", 1), ("houlsby", 3), ("lora", 2), ("top-t", 2), ("full", 4)])
def test_only_the_top_depth_layers_change_after_a_step(method, depth):
    spec, params = _params(method, top_t=depth) if method == "top-t" else _params(method)
    trainable, frozen = split(params, leaf_mask(params, spec))
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    state = init_state(optimizer, trainable)
    step = make_train_step(CFG, spec, HEAD, optimizer, params, depth)
    before = jax.tree.map(np.asarray, trainable)
    for _ in range(3):  # adapter `down` gets a gradient once `up` has left zero
        state, _ = step(state, frozen, BATCH)
    stacked = state.trainable["peft"]["blocks"] if method not in ("top-t", "full") else state.trainable["blocks"]
    stacked_before = before["peft"]["blocks"] if method not in ("top-t", "full") else before["blocks"]
    for new, old in zip(jax.tree.leaves(stacked), jax.tree.leaves(stacked_before)):
        changed = np.abs(np.asarray(new) - old).reshape(CFG.num_layers, -1).max(1) > 0
        assert list(changed) == [i >= CFG.num_layers - depth for i in range(CFG.num_layers)]


def test_trainable_masks_keep_the_backbone_frozen_for_adapters():
    spec, params = _params("houlsby")
    mask = leaf_mask(params, spec)
    assert not any(jax.tree.leaves(mask["blocks"])) and all(jax.tree.leaves(mask["peft"]))
    factors = layer_mask(params, spec, 2, CFG.num_layers)
    assert np.asarray(factors["peft"]["blocks"]["adapter"]["ffn"]["up"]["bias"]).ravel().tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("method", ["houlsby", "lora"])
def test_train_norms_trains_the_top_blocks_layer_norms_and_nothing_else_of_the_backbone(method):
    spec, params = _params(method, train_norms=True)
    mask = leaf_mask(params, spec)
    trains = {"/".join(str(k.key) for k in path) for path, m in jax.tree_util.tree_leaves_with_path(mask["blocks"]) if m}
    assert trains == {"attn_norm/scale", "attn_norm/bias", "ffn_norm/scale", "ffn_norm/bias"}
    assert not any(jax.tree.leaves(mask["embed"]))
    trainable, frozen = split(params, mask)
    before = {name: np.asarray(params["blocks"][name]["scale"]) for name in ("attn_norm", "ffn_norm")}
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    state = init_state(optimizer, trainable)
    step = make_train_step(CFG, spec, HEAD, optimizer, params, 2)
    for _ in range(2):
        state, _ = step(state, frozen, BATCH)
    for name, old in before.items():
        changed = np.abs(np.asarray(state.trainable["blocks"][name]["scale"]) - old).max(1) > 0
        assert changed.tolist() == [False, False, True, True]


def test_trainable_export_round_trips(tmp_path):
    spec, params = _params("houlsby")
    params["peft"] = jax.tree.map(lambda x: x + 0.5, params["peft"])
    save_trainable(tmp_path, params, leaf_mask(params, spec), CFG, spec, HEAD)
    config = json.loads((tmp_path / "trainable_config.json").read_text())
    assert config["peft"]["kind"] == "adapter"
    assert all(k.startswith(("peft/", "head/")) for k in load_file(str(tmp_path / "trainable.safetensors")))
    _, fresh = _params("houlsby")
    restored = load_trainable(tmp_path, fresh)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_lora_exports_in_the_hugging_face_peft_layout(tmp_path):
    spec, params = _params("lora")
    export_hf_peft(tmp_path, params, CFG, spec, "minilm")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = tensors["base_model.model.bert.encoder.layer.3.attention.self.value.lora_A.weight"]
    b = tensors["base_model.model.bert.encoder.layer.3.attention.self.value.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (32, 8)
    np.testing.assert_array_equal(a, np.asarray(params["peft"]["blocks"]["lora"]["value"]["a"][3]).T)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["query", "value"]
    assert len(tensors) == 2 * 2 * CFG.num_layers


def test_run_config_knobs_reach_the_peft_config():
    """--lora-targets, --lora-rank, --adapter-init-std and --side-every become the run's PeftConfig (what `prepare` and `eval` build)."""
    from ringjax.train.config import TrainConfig
    from ringjax.train.trainer import peft_for

    lora = peft_for(TrainConfig(method="lora", lora_rank=4, lora_targets="query, ffn_in,ffn_out"))
    assert (lora.lora_targets, lora.lora_rank, lora.lora_alpha) == (("query", "ffn_in", "ffn_out"), 4, 8.0)
    assert peft_for(TrainConfig(method="pac", adapter="parallel", side_every=1)).side_every == 1
    assert peft_for(TrainConfig(method="houlsby", adapter_init_std=0.05)).init_std == 0.05
    assert peft_for(TrainConfig(method="houlsby")).init_std == 1e-2
    assert peft_for(TrainConfig(method="ringada", adapter_init_std=0.05)).init_std == 0.05  # the ring's adapters too
    assert peft_for(TrainConfig(method="pac", adapter="parallel")).side_every == 2


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_train_presets_build_valid_configs_that_yaml_and_flags_override(tmp_path, name):
    """Every named train preset is a valid run config; a YAML file overrides it, and flags the YAML."""
    from ringjax.train.config import build_config
    from ringjax.train.trainer import peft_for

    config = build_config(name)
    spec = peft_for(config)
    assert spec.kind == "adapter" and config.steps is not None
    if name == "sst2-houlsby":
        assert (spec.init_std, spec.train_norms, config.pooling) == (0.1, True, "mean")
    (tmp_path / "run.yaml").write_text("lr: 7e-4\nseed: 3\n")
    tuned = build_config(name, str(tmp_path / "run.yaml"), {"seed": "5"})
    assert (tuned.lr, tuned.seed, tuned.steps) == (7e-4, 5, config.steps)
