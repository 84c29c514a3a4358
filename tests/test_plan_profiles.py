import dataclasses
import re

import pytest
import yaml

from ringjax.errors import RingjaxError
from ringjax.plan import profiles
from ringjax.plan.profiles import (
    DeviceProfile,
    calibrate,
    format_size,
    load_fleet,
    parse_fleet,
    parse_number,
    parse_rate,
    parse_seconds,
    parse_size,
    preset,
    preset_names,
    write_profile,
)

REQUIRED_PRESETS = {"jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-orin", "raspberry-pi-4",
                    "raspberry-pi-5", "phone-sd8gen2", "laptop-rtx3060", "cpu-host"}


def test_every_preset_loads_with_positive_values():
    assert REQUIRED_PRESETS <= set(preset_names())
    for name in preset_names():
        p = preset(name)
        assert p.name == name
        assert p.flops("fp32") > 0 and p.flops("bf16") >= p.flops("fp32") * 0.99
        assert p.memory_bytes >= 2**30
        assert p.link_bandwidth_bytes_per_s > 0 and p.link_latency_s > 0
        assert p.uplink_spectral_efficiency_bits_per_hz > 0


def test_every_preset_value_cites_a_source():
    """Each numeric line of presets.yaml carries a comment naming its source or 'estimate'."""
    for line in profiles.PRESETS_PATH.read_text().splitlines():
        if line.startswith(" ") and re.match(r"\s+\w+:\s*[0-9.]", line):
            assert "#" in line, f"no source comment: {line!r}"


def test_quantities():
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("1.5e9") == 1_500_000_000
    assert parse_size(4096) == 4096
    assert parse_size("512 MB") == 512_000_000
    assert parse_rate("1Gbit/s") == 125e6
    assert parse_rate("600Mbps") == 75e6
    assert parse_rate("125MB/s") == 125e6
    assert parse_seconds("0.2ms") == 2e-4
    assert parse_seconds("10us") == 1e-5
    assert parse_number("1.5e12") == 1.5e12
    assert parse_number("236e9") == 236e9
    assert parse_number("1.5T") == 1.5e12
    assert format_size(1.5 * 2**30) == "1.5GiB"
    for parse, bad in ((parse_size, "8 parsecs"), (parse_rate, "fast"), (parse_seconds, "1 fortnight"),
                       (parse_number, "lots"), (parse_size, True)):
        with pytest.raises(RingjaxError, match="cannot read"):
            parse(bad)


def test_dtype_fallback_and_unknown_dtype():
    nano = preset("jetson-nano")
    assert nano.flops("fp16") == 472e9
    assert nano.flops("bfloat16") == nano.flops("fp32")  # Maxwell has no bf16
    with pytest.raises(RingjaxError, match="unknown dtype"):
        nano.flops("int4")


def test_fleet_presets_overrides_and_custom_devices():
    fleet = parse_fleet(yaml.safe_load("""
devices:
  - {name: a, preset: jetson-nano}
  - {name: b, preset: jetson-nano, memory: 2GiB, peak_flops: 1e11}
  - {name: c, peak_flops: {fp32: 1.5e12, bf16: 3e12}, memory: "8GiB", link_bandwidth: 1Gbit/s,
     link_latency: 1ms, spectral_efficiency: 4}
"""))
    a, b, c = fleet
    assert a == dataclasses.replace(preset("jetson-nano"), name="a")
    assert b.memory_bytes == 2 * 2**30 and b.flops("fp16") == 1e11  # an override replaces the field
    assert b.link_latency_s == a.link_latency_s
    assert c.flops("bf16") == 3e12 and c.flops("fp16") == 1.5e12
    assert c.link_bandwidth_bytes_per_s == 125e6 and c.link_latency_s == 1e-3


@pytest.mark.parametrize("text, message", [
    ("devices: [{name: a, preset: jetson-nanoo}]", "unknown preset 'jetson-nanoo': use one of jetson-nano"),
    ("devices: [{name: a, peak_flops: 1e12, memory: 8GiB}]",
     "device a: missing link_bandwidth, link_latency, spectral_efficiency: give them or name a preset"),
    ("devices: [{name: a, preset: jetson-nano, memroy: 1GiB}]", "unknown field.*memroy"),
    ("devices: [{name: a, preset: jetson-nano}, {name: a, preset: jetson-tx2}]", "used twice"),
    ("devices: []", "non-empty list"),
    ("nodes: [{name: a}]", "non-empty list"),
    ("devices: [{name: a, preset: jetson-nano, peak_flops: {fp16: 1e12}}]", "fp32 is missing"),
    ("devices: [{name: a, preset: jetson-nano, memory: lots}]", "device a.memory: cannot read 'lots'"),
])
def test_fleet_errors_name_the_problem(text, message):
    with pytest.raises(RingjaxError, match=message):
        parse_fleet(yaml.safe_load(text), "fleet.yaml")


def test_load_fleet_errors(tmp_path):
    with pytest.raises(RingjaxError, match="not found"):
        load_fleet(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [{name: a")
    with pytest.raises(RingjaxError, match="not valid YAML"):
        load_fleet(bad)


def test_write_profile_round_trips(tmp_path):
    profile = DeviceProfile("x", {"fp32": 1.25e11, "bf16": 2.5e11}, 3 * 2**30, 1.25e8, 2e-4, 5.4, "test")
    write_profile(profile, tmp_path / "x.yaml")
    assert load_fleet(tmp_path / "x.yaml") == (profile,)


def test_calibrate_measures_this_machine(tmp_path):
    profile = calibrate(name="here", size=256, repeats=2)
    assert profile.name == "here"
    assert 1e8 < profile.flops("fp32") < 1e16
    assert profile.memory_bytes > 2**28
    write_profile(profile, tmp_path / "here.yaml")
    assert load_fleet(tmp_path / "here.yaml") == (profile,)
