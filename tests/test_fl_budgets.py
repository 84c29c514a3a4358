"""Fleet files: units, tiers, deterministic assignment, clear errors."""

import numpy as np
import pytest
import yaml

from ringjax.errors import RingjaxError
from ringjax.fl.budgets import Budget, ClientBudgets, load_fleet, parse_fleet

FLEET = """
tiers:
  - {name: weak, fraction: 0.4, memory: 300MB, flops_per_round: 5e12, upload: 2MiB}
  - {name: medium, fraction: 0.4, memory: 1.5GiB, flops_per_round: 500G, upload: 25 MB}
  - {name: strong, fraction: 0.2, memory: 4GB, flops_per_round: 2 TFLOP, upload: 1GB}
"""


def test_units_and_assignment(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    fleet = load_fleet(path)
    weak, medium, strong = (t.budget for t in fleet.tiers)
    assert weak == Budget(300e6, 5e12, 2 * 2**20)
    assert medium == Budget(1.5 * 2**30, 500e9, 25e6)
    assert strong.flops_per_round == 2e12 and strong.memory_bytes == 4e9
    budgets = fleet.assign(10, seed=3)
    assert np.bincount(budgets.tier_of, minlength=3).tolist() == [4, 4, 2]
    assert np.array_equal(budgets.tier_of, fleet.assign(10, seed=3).tier_of)
    assert not np.array_equal(budgets.tier_of, fleet.assign(10, seed=4).tier_of)
    assert budgets[int(np.flatnonzero(budgets.tier_of == 2)[0])] == strong
    # largest remainder: 7 clients at 0.4/0.4/0.2 -> 3, 3, 1
    assert np.bincount(fleet.assign(7).tier_of, minlength=3).tolist() == [3, 3, 1]


def test_counts_and_from_list():
    fleet = parse_fleet({"tiers": [{"count": 2, "memory": 1, "flops_per_round": 1, "upload": 1}, {"count": 1, "memory": 2, "flops_per_round": 2, "upload": 2}]})
    assert sorted(fleet.assign(3).tier_of.tolist()) == [0, 0, 1]
    with pytest.raises(RingjaxError, match="add up to 3 but the run has 4"):
        fleet.assign(4)
    budgets = ClientBudgets.from_list([Budget(1, 2, 3), Budget(4, 5, 6)])
    assert len(budgets) == 2 and budgets[1] == Budget(4, 5, 6)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "mapping with a 'tiers' list"),
        ({"tiers": []}, "non-empty list"),
        ({"tiers": [{"fraction": 1, "memory": "1MB", "flops_per_round": 1}]}, r"missing \['upload'\]"),
        ({"tiers": [{"fraction": 1, "memory": "1 parsecs", "flops_per_round": 1, "upload": 1}]}, "cannot read memory"),
        ({"tiers": [{"fraction": 1, "memory": -5, "flops_per_round": 1, "upload": 1}]}, "must be positive"),
        ({"tiers": [{"fraction": 0.5, "memory": 1, "flops_per_round": 1, "upload": 1}]}, "add up to 0.5, not 1"),
        ({"tiers": [{"memory": 1, "flops_per_round": 1, "upload": 1}]}, "exactly one of 'fraction'"),
        ({"tiers": [{"fraction": 1, "memory": 1, "flops_per_round": 1, "upload": 1, "speed": 3}]}, r"unknown key\(s\) \['speed'\]"),
        ({"tiers": [{"name": "a", "fraction": 0.5, "memory": 1, "flops_per_round": 1, "upload": 1}, {"name": "a", "fraction": 0.5, "memory": 1, "flops_per_round": 1, "upload": 1}]}, "duplicate"),
        ({"tiers": [{"fraction": 1.0, "memory": 1, "flops_per_round": 1, "upload": 1}, {"count": 1, "memory": 1, "flops_per_round": 1, "upload": 1}]}, "mix 'fraction' and 'count'"),
        ({"tiers": [{"fraction": 1, "memory": 1, "flops_per_round": "lots", "upload": 1}]}, "5e12 or 5T"),
    ],
)
def test_errors_name_the_problem(data, message):
    with pytest.raises(RingjaxError, match=message):
        parse_fleet(data)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RingjaxError, match="not found"):
        load_fleet(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [{name: a")
    with pytest.raises(RingjaxError, match="not valid YAML"):
        load_fleet(bad)
    assert yaml.safe_load(FLEET)["tiers"][0]["name"] == "weak"
