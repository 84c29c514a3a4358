"""`ringjax plan` and `ringjax calibrate`: JSON that re-solves to the same optimum, placements, profiles."""

import json
from pathlib import Path

import pytest

from ringjax.cli.main import main
from ringjax.plan.allocation import AllocationProblem, allocate, optimal_bandwidth
from ringjax.plan.profiles import load_fleet

FLEETS = Path(__file__).resolve().parent.parent / "experiments" / "fleets"


def _plan(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_deft_plan_json_holds_inputs_and_a_rechecked_optimum(capsys):
    plan = _plan(capsys, "--model", "minilm", "--fleet", str(FLEETS / "tiers16.yaml"), "--method", "deft",
                 "--blocks", "6")
    for key in ("compute_seconds", "upload_bits", "rate_bits_per_hz", "bandwidth_hz", "assignment",
                "bandwidth_split", "round_latency", "baselines"):
        assert key in plan
    assert len(plan["compute_seconds"]) == 16 and len(plan["compute_seconds"][0]) == 6
    assert plan["bandwidth_hz"] == 10e6  # from the fleet file
    assert len(set(plan["assignment"])) == 6
    problem = AllocationProblem.from_dict(plan)
    assert allocate(problem).round_latency == pytest.approx(plan["round_latency"], rel=1e-6)
    assert optimal_bandwidth(problem, plan["assignment"]).round_latency == pytest.approx(plan["round_latency"])
    assert sum(plan["bandwidth_split"]) == pytest.approx(10e6)
    for name in ("random", "greedy", "equal_bandwidth"):
        assert plan["baselines"][name] >= plan["round_latency"] * (1 - 1e-9)
    # deeper blocks cost more compute on the same device
    for row in plan["compute_seconds"]:
        assert row == sorted(row, reverse=True)


def test_deft_plan_text_and_bandwidth_flag(capsys):
    assert main(["plan", "--model", "minilm", "--fleet", str(FLEETS / "edge4.yaml"), "--method", "deft",
                 "--bandwidth", "20MHz"]) == 0
    text = capsys.readouterr().out
    assert "band 20 MHz" in text and "round latency" in text and "equal_bandwidth" in text


def test_ringada_plan_places_every_layer_at_every_depth(capsys):
    plan = _plan(capsys, "--model", "minilm", "--fleet", str(FLEETS / "edge4.yaml"), "--method", "ringada")
    assert [row["depth"] for row in plan["depths"]] == list(range(1, 7))
    for row in plan["depths"]:
        assert sum(row["sizes"]) == 6 and len(row["sizes"]) == 4 and min(row["sizes"]) >= 1
        assert row["step_seconds"] >= row["bottleneck_seconds"] > 0
    steps = [row["step_seconds"] for row in plan["depths"]]
    assert steps[-1] > steps[0]  # unfreezing more layers costs more


def test_pac_plan(capsys):
    plan = _plan(capsys, "--model", "minilm", "--fleet", str(FLEETS / "edge4.yaml"), "--method", "pac")
    assert sum(plan["epoch1"]["sizes"]) == 6
    assert plan["cached_epochs"]["step_seconds"] < plan["epoch1"]["step_seconds"]


def test_plan_errors_are_one_line(capsys):
    assert main(["plan", "--model", "minilm", "--fleet", str(FLEETS / "edge4.yaml"), "--method", "deft",
                 "--blocks", "5"]) == 2
    assert "--blocks 5" in capsys.readouterr().err


def test_calibrate_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "me.yaml"
    assert main(["calibrate", "--out", str(out), "--name", "me", "--size", "128", "--repeats", "1"]) == 0
    (profile,) = load_fleet(out)
    assert profile.name == "me" and profile.flops("fp32") > 0 and profile.memory_bytes > 0
    assert "peak_flops" in capsys.readouterr().out


def test_caff_plan_selects_layers_per_tier(tmp_path, capsys):
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n"
                     "  - {name: weak, fraction: 0.5, memory: 300MB, flops_per_round: 5e12, upload: 2MB}\n"
                     "  - {name: strong, fraction: 0.5, memory: 2GB, flops_per_round: 1e14, upload: 200MB}\n")
    plan = _plan(capsys, "--model", "minilm", "--fleet", str(tiers), "--method", "caff", "--clients", "10")
    caff = plan["plans"]["caff"]
    assert caff["participating"] == 10
    assert max(caff["depth_by_tier"]["weak"]) < max(caff["depth_by_tier"]["strong"])
