"""`--placement auto`: the bottleneck-optimal contiguous split of the analytic per-block costs at
each unfreeze depth, over equal devices or a fleet's profiles; `ringjax train` uses it per phase."""

import itertools
import json

import pytest

from ringjax.cli.main import main
from ringjax.errors import RingjaxError
from ringjax.models.config import ModelConfig
from ringjax.parallel.placement import auto_stages
from ringjax.peft import preset
from ringjax.plan.costs import block_costs, top_layers
from ringjax.plan.placement import evaluate_split
from ringjax.plan.profiles import load_fleet

BERT = ModelConfig(arch="bert", vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                   max_position=512, norm_eps=1e-12, activation="gelu", type_vocab_size=2)  # MiniLM's shape
SPEC = preset("houlsby")


def _splits(L, N):
    for cuts in itertools.combinations(range(1, L), N - 1):
        bounds = (0, *cuts, L)
        yield tuple(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]))


def _bottleneck(sizes, depth, speeds):
    work = [c.train_flops for c in block_costs(BERT, SPEC, 4, 64, top_layers(BERT.num_layers, depth))]
    return evaluate_split(sizes, work, [0.0] * len(work), speeds).bottleneck_seconds


def _fleet(tmp_path, fast_flops="400e9"):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n"
                    f"  - {{name: fast, preset: raspberry-pi-4, peak_flops: {fast_flops}}}\n"
                    "  - {name: slow, preset: raspberry-pi-4}\n")
    return path


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_auto_is_the_optimal_split_at_each_depth(depth):
    auto = auto_stages(BERT, SPEC, 4, 4, 64, microbatches=2)
    best = min(_bottleneck(s, depth, [1.0] * 4) for s in _splits(6, 4))
    assert sum(auto(depth)) == 6 and _bottleneck(auto(depth), depth, [1.0] * 4) == pytest.approx(best, rel=1e-12)


def test_auto_moves_blocks_to_frozen_stages_and_fast_devices(tmp_path):
    equal = auto_stages(BERT, SPEC, 2, 4, 64)
    assert equal(6) == (3, 3)
    assert equal(3) == (4, 2)  # the three frozen blocks run forward only: the bottom stage takes one more
    fleet = load_fleet(_fleet(tmp_path))
    fast_first = auto_stages(BERT, SPEC, 2, 4, 64, profiles=fleet)
    assert fast_first(6)[0] > fast_first(6)[1]  # the 8x faster device takes more blocks
    with pytest.raises(RingjaxError, match="fleet has 2 devices but the ring has 3"):
        auto_stages(BERT, SPEC, 3, 4, 64, profiles=fleet)


def test_train_with_placement_auto_uses_the_fleets_split(tmp_path, tiny_bert_dir):
    import ringjax

    out = tmp_path / "run"
    fleet = _fleet(tmp_path)
    code = main(["train", "--method", "ringada", "--model", str(tiny_bert_dir), "--devices", "2", "--microbatches", "2",
                 "--steps", "1", "--batch-size", "4", "--max-length", "16", "--unfreeze", "top:1",
                 "--placement", "auto", "--fleet", str(fleet), "--max-train-examples", "16",
                 "--max-eval-examples", "4", "--no-progress", "--out", str(out)])
    assert code == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [s["stages"] for s in steps if "loss" in s]
    m = ringjax.load_model(str(tiny_bert_dir), head="classification", peft="houlsby")
    auto = auto_stages(m.config, m.peft_config, 2, 2, 16, microbatches=2, profiles=load_fleet(fleet))
    assert stages == [list(auto(1))] and auto(1) != (2, 2)  # the fast device (first) holds more blocks
