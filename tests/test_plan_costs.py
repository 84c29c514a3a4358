import dataclasses

import pytest

from ringjax.errors import RingjaxError
from ringjax.plan.costs import block_costs, hidden_state_bytes, top_layers


@dataclasses.dataclass(frozen=True)
class Shape:
    arch: str = "bert"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 12
    vocab_size: int = 30522


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str = "adapter"
    adapter_sites: tuple = ("attn", "ffn")
    reduction_factor: int = 16
    lora_rank: int = 8
    lora_targets: tuple = ()
    top_t: int = 2
    side_reduction: int = 8
    side_taps: tuple = ()
    side_every: int = 2
    side_attention: bool = True
    side_heads: int = 0


BERT_BASE = Shape()
B, S = 4, 128
T = B * S
h, f = 768, 3072
LAYER_FWD = 24 * T * h * h + 4 * B * S * S * h  # projections (f = 4h) + attention core


def test_bert_base_layer_forward_and_parameters():
    for cost in block_costs(BERT_BASE, Method(kind="full"), B, S, elementwise=False):
        assert cost.fwd_flops == LAYER_FWD
        assert cost.params == 7_087_872  # a BERT-base encoder layer
    assert hidden_state_bytes(BERT_BASE, B, S) == T * h * 4


def test_full_fine_tuning_backward_is_twice_the_forward_above_the_bottom():
    costs = block_costs(BERT_BASE, Method(kind="full"), B, S, elementwise=False)
    assert all(c.trainable_params == c.params for c in costs)
    top = costs[-1]
    core = 4 * B * S * S * h
    assert top.bwd_input_flops == LAYER_FWD + core  # the attention core's backward is twice its forward
    assert top.bwd_weight_flops == LAYER_FWD - core
    # the bottom layer does not pass a gradient to its input: no q, k, v input gradients
    assert costs[0].bwd_input_flops == top.bwd_input_flops - 3 * 2 * T * h * h


def test_unfreezing_depth_stops_the_backward():
    method = Method(kind="adapter")
    costs = block_costs(BERT_BASE, method, B, S, trained=top_layers(12, 3), elementwise=False)
    assert [c.bwd_input_flops + c.bwd_weight_flops == 0 for c in costs] == [True] * 9 + [False] * 3
    assert [c.residual_bytes == 0 for c in costs] == [True] * 9 + [False] * 3
    width = h // 16
    assert costs[-1].trainable_params == 2 * (2 * h * width + width + h)
    assert costs[0].trainable_params == 0
    # Houlsby's lowest adapter sits after attention: the lowest trained layer backpropagates
    # through its FFN and the FFN adapter only
    assert costs[9].bwd_input_flops == 2 * 2 * T * h * f + 4 * T * h * width


def test_pfeiffer_lowest_layer_needs_no_input_gradient_and_lora_counts_its_targets():
    pfeiffer = block_costs(BERT_BASE, Method(kind="adapter", adapter_sites=("ffn",)), B, S, elementwise=False)
    assert pfeiffer[0].bwd_input_flops == 0 and pfeiffer[1].bwd_input_flops > 0
    lora = block_costs(BERT_BASE, Method(kind="lora"), B, S)
    assert lora[0].trainable_params == 2 * 8 * (h + h)  # query and value
    gpt2 = block_costs(Shape(arch="gpt2"), Method(kind="lora"), B, S)
    assert gpt2[0].trainable_params == 8 * (h + 3 * h)  # the fused qkv projection


def test_parallel_adapters_never_backpropagate_through_the_backbone():
    full = block_costs(BERT_BASE, Method(kind="full"), B, S, elementwise=False)
    side = block_costs(BERT_BASE, Method(kind="parallel"), B, S)
    width = h // 8
    for layer, (c, backbone) in enumerate(zip(side, full)):
        tapped = layer % 2 == 1  # every 2nd block from the top: blocks 2, 4, ..., 12
        assert c.trainable_params == tapped * (h * width + width + width * width + 2 * width + 4 * width * width)
        assert c.params == backbone.params + c.trainable_params
        assert c.bwd_input_flops + c.bwd_weight_flops < 0.1 * c.fwd_flops


def test_top_t_and_deft_blocks():
    costs = block_costs(BERT_BASE, Method(kind="top-t", top_t=2), B, S)
    assert [c.trainable_params > 0 for c in costs] == [False] * 10 + [True] * 2
    # DEFT: training only layer 5's adapters still backpropagates through layers 6..11
    deft = block_costs(BERT_BASE, Method(), B, S, trained=[5])
    assert all(c.bwd_weight_flops == 0 and c.bwd_input_flops > 0 for c in deft[6:])
    assert all(c.bwd_input_flops == c.bwd_weight_flops == 0 for c in deft[:5])
    assert deft[5].bwd_weight_flops > 0


def test_llama_grouped_query_attention():
    shape = Shape(arch="llama", hidden_size=512, intermediate_size=1376, num_layers=2, num_heads=8, num_kv_heads=2)
    cost = block_costs(shape, Method(kind="full"), B, S, elementwise=False)[0]
    d, kv = 64, 2 * 64
    projections = 512 * 512 * 2 + 2 * 512 * kv + 3 * 512 * 1376
    assert cost.params == projections + 2 * 512
    assert cost.fwd_flops == 2 * T * projections + 4 * B * 8 * S * S * d


def test_errors():
    with pytest.raises(RingjaxError, match="no cost model for architecture 't5'"):
        block_costs(Shape(arch="t5"), Method(), B, S)
    with pytest.raises(RingjaxError, match="LoRA targets"):
        block_costs(BERT_BASE, Method(kind="lora", lora_targets=("qkv",)), B, S)
    with pytest.raises(RingjaxError, match="do not exist"):
        block_costs(BERT_BASE, Method(), B, S, trained=[12])
    with pytest.raises(RingjaxError, match="unfreeze depth 13"):
        top_layers(12, 13)


# --- whole steps (step_costs): parameter and state accounting against real parameter trees ---------

def _tree_sizes(cfg, spec):
    import jax

    from ringjax.models import HeadConfig, assemble, random_backbone
    from ringjax.peft import leaf_mask, split

    params = jax.eval_shape(lambda k: assemble(cfg, random_backbone(cfg, k), HeadConfig("classification", 2), spec, k),
                            jax.random.key(0))
    trainable, _ = split(params, leaf_mask(params, spec))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    return size(params), size(trainable), params


@pytest.mark.parametrize("method", ["full", "houlsby", "pfeiffer", "lora", "parallel", "top-t"])
def test_step_costs_count_every_parameter_and_the_optimizer_state(method):
    import ringjax
    from ringjax.peft import preset
    from ringjax.plan.costs import step_costs

    cfg = ringjax.ModelConfig(arch="bert", vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4,
                              intermediate_size=256, max_position=128, norm_eps=1e-12, activation="gelu",
                              type_vocab_size=2)
    spec = preset(method)
    total, trainable, _ = _tree_sizes(cfg, spec)
    cost = step_costs(cfg, spec, 4, 32)
    assert cost.param_bytes == 4 * total
    assert cost.trainable_bytes == 4 * trainable
    assert cost.optimizer_bytes == 8 * trainable  # Adam's two moments
    assert cost.flops > sum(b.train_flops for b in block_costs(cfg, spec, 4, 32, elementwise=False, first_only_top=True))


def test_deft_block_costs_grow_with_depth_and_upload_only_the_block():
    from ringjax.peft import preset
    from ringjax.plan.costs import step_costs

    spec = preset("houlsby")
    per_layer = 2 * (2 * h * (h // 16) + h // 16 + h)
    head = h * h + h + 2 * h + 2
    costs = [step_costs(BERT_BASE, spec, B, S, trained=[layer], head_trains=layer == 11, optimizer=False)
             for layer in range(12)]
    assert all(a.flops > b.flops for a, b in zip(costs, costs[1:]))  # a deeper block backpropagates further
    assert all(a.peak_bytes > b.peak_bytes for a, b in zip(costs[1:], costs[2:]))
    assert [c.upload_bytes for c in costs] == [4 * per_layer] * 11 + [4 * (per_layer + head)]
    assert costs[0].optimizer_flops == 0 and step_costs(BERT_BASE, spec, B, S).optimizer_flops > 0


def test_a_first_position_top_block_costs_its_keys_and_values_and_one_row():
    """Under [CLS] pooling the top layer projects keys and values for every token and everything
    else for the first row: its forward matmuls drop from 24*T*h^2 + 4*T^2*h (FFN 4h) per example
    to 4*T*h^2 + 20*h^2 + 4*T*h."""
    whole = block_costs(BERT_BASE, Method(kind="full"), B, S, elementwise=False)
    top = block_costs(BERT_BASE, Method(kind="full"), B, S, elementwise=False, first_only_top=True)
    assert top[:-1] == whole[:-1]
    h = BERT_BASE.hidden_size
    assert whole[-1].fwd_flops == B * (24 * S * h * h + 4 * S * S * h)
    assert top[-1].fwd_flops == B * (4 * S * h * h + 20 * h * h + 4 * S * h)
    assert top[-1].residual_bytes < whole[-1].residual_bytes
