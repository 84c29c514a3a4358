"""Device profiles: what the planner and simulator know about each device of a fleet.

A fleet file is YAML: `devices: [{name: a, preset: jetson-nano}, {name: b, peak_flops: 1.5e12,
memory: 8GiB, link_bandwidth: 1Gbit/s, link_latency: 0.2ms, spectral_efficiency: 5}]`. A device
names a preset from `presets.yaml` and may override any of its fields (an override replaces the
field), or gives every field itself. Quantities may be written with units ("8GiB", "1Gbit/s",
"0.2ms", "1.5T") because fleet files are written by hand; bits are spelled "bit" or "bps",
so "MB/s" is always bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import socket
import statistics
import time
from decimal import Decimal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ringjax.errors import RingjaxError

PRESETS_PATH = Path(__file__).with_name("presets.yaml")

_DTYPES = {
    "fp32": "fp32", "float32": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}
_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
         "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_RATES = {**{f"{unit}/s": scale for unit, scale in _BYTES.items() if unit},
          **{(f"{unit}/s" if unit.endswith("bit") else unit): scale / 8
             for unit, scale in _BITS.items()},
          "": 1}
_SECONDS = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_SI = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(\S*)\s*$")

_FIELDS = ("peak_flops", "memory", "link_bandwidth", "link_latency", "spectral_efficiency")
_KEYS = {"name", "preset", "notes", *_FIELDS}


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One device: compute peak per dtype, usable memory, network link and uplink radio."""

    name: str
    peak_flops: Mapping[str, float]  # "fp32" always present; "fp16"/"bf16" where the device has them
    memory_bytes: int
    link_bandwidth_bytes_per_s: float
    link_latency_s: float
    uplink_spectral_efficiency_bits_per_hz: float
    notes: str = ""

    def flops(self, dtype: str = "fp32") -> float:
        """Peak FLOP/s for `dtype`; a dtype the device lacks runs at its fp32 rate."""
        key = _DTYPES.get(dtype)
        if key is None:
            raise RingjaxError(f"unknown dtype {dtype!r}: use one of fp32, fp16, bf16")
        return self.peak_flops.get(key, self.peak_flops["fp32"])


def _quantity(value: Any, units: Mapping[str, float], what: str, where: str,
              case_sensitive: bool = False) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(value) if isinstance(value, str) else None
    unit = "" if match is None else match.group(2) if case_sensitive else match.group(2).lower()
    if match is None or unit not in units:
        examples = {"size": "'8GiB'", "rate": "'1Gbit/s' or '125MB/s'", "time": "'0.2ms'",
                    "number": "'1.5e12' or '1.5T'"}[what]
        raise RingjaxError(f"{where}: cannot read {value!r} as a {what}: write a number or e.g. {examples}")
    return float(Decimal(match.group(1)) * Decimal(repr(units[unit])))  # decimal: "10us" is exactly 1e-05


def parse_size(value: Any, where: str = "size") -> int:
    """Bytes from a number or a string such as '8GiB', '512MB', '1.5e9'."""
    return int(round(_quantity(value, _BYTES, "size", where)))


def format_size(num_bytes: float) -> str:
    """Bytes as a short human string ('1.5GiB'), for messages and tables."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if abs(num_bytes) >= _BYTES[unit.lower()]:
            return f"{num_bytes / _BYTES[unit.lower()]:.3g}{unit}"
    return f"{num_bytes:.0f}B"


def parse_rate(value: Any, where: str = "rate") -> float:
    """Bytes per second from a number or a string such as '1Gbit/s', '125MB/s', '600Mbps'."""
    return _quantity(value, _RATES, "rate", where)


def parse_seconds(value: Any, where: str = "time") -> float:
    """Seconds from a number or a string such as '0.2ms', '10us', '2e-3'."""
    return _quantity(value, _SECONDS, "time", where)


def parse_number(value: Any, where: str = "number") -> float:
    """A float from a number or a string such as '1.5e12' or '1.5T' (YAML reads 1.5e12 as text)."""
    return _quantity(value, _SI, "number", where, case_sensitive=True)


def _peak_flops(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {"fp32": parse_number(value, f"{where}.peak_flops")}
    peaks = {}
    for dtype, rate in value.items():
        if dtype not in ("fp32", "fp16", "bf16"):
            raise RingjaxError(f"{where}.peak_flops: unknown dtype {dtype!r}: use fp32, fp16 or bf16")
        peaks[dtype] = parse_number(rate, f"{where}.peak_flops.{dtype}")
    if "fp32" not in peaks:
        raise RingjaxError(f"{where}.peak_flops: fp32 is missing: give at least the fp32 rate")
    return peaks


def _profile(entry: Mapping[str, Any], name: str, where: str) -> DeviceProfile:
    missing = [field for field in _FIELDS if field not in entry]
    if missing:
        raise RingjaxError(f"{where}: missing {', '.join(missing)}: give them or name a preset "
                           f"(preset: jetson-nano)")
    return DeviceProfile(
        name=name,
        peak_flops=_peak_flops(entry["peak_flops"], where),
        memory_bytes=parse_size(entry["memory"], f"{where}.memory"),
        link_bandwidth_bytes_per_s=parse_rate(entry["link_bandwidth"], f"{where}.link_bandwidth"),
        link_latency_s=parse_seconds(entry["link_latency"], f"{where}.link_latency"),
        uplink_spectral_efficiency_bits_per_hz=parse_number(
            entry["spectral_efficiency"], f"{where}.spectral_efficiency"),
        notes=str(entry.get("notes", "")),
    )


@functools.cache
def _preset_entries() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(PRESETS_PATH.read_text())


def preset_names() -> tuple[str, ...]:
    """Names of the bundled presets, for help texts and error messages."""
    return tuple(_preset_entries())


def preset(name: str) -> DeviceProfile:
    """The bundled preset `name` as a profile named after it."""
    entries = _preset_entries()
    if name not in entries:
        raise RingjaxError(f"unknown device preset {name!r}: use one of {', '.join(entries)}")
    return _profile(entries[name], name, f"preset {name}")


def parse_fleet(data: Any, source: str = "fleet") -> tuple[DeviceProfile, ...]:
    """Profiles, in file order, from a parsed fleet document (`{devices: [...]}`)."""
    devices = data.get("devices") if isinstance(data, Mapping) else None
    if not isinstance(devices, list) or not devices:
        raise RingjaxError(f"{source}: expected a non-empty list under 'devices:', e.g. "
                           f"devices: [{{name: a, preset: jetson-nano}}]")
    entries = _preset_entries()
    profiles = []
    for index, device in enumerate(devices):
        where = f"{source}: device {index}"
        if not isinstance(device, Mapping):
            raise RingjaxError(f"{where}: expected a mapping such as {{name: a, preset: jetson-nano}}")
        unknown = sorted(set(device) - _KEYS)
        if unknown:
            raise RingjaxError(f"{where}: unknown field(s) {', '.join(unknown)}: "
                               f"use {', '.join(sorted(_KEYS))}")
        name = str(device.get("name", device.get("preset", f"device{index}")))
        where = f"{source}: device {name}"
        entry = dict(device)
        if "preset" in device:
            if device["preset"] not in entries:
                raise RingjaxError(f"{where}: unknown preset {device['preset']!r}: "
                                   f"use one of {', '.join(entries)}")
            entry = {**entries[device["preset"]], **device}
        profiles.append(_profile(entry, name, where))
    names = [profile.name for profile in profiles]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RingjaxError(f"{source}: device name(s) {', '.join(duplicates)} used twice: "
                           f"give every device its own name")
    return tuple(profiles)


def load_fleet(path: str | Path) -> tuple[DeviceProfile, ...]:
    """Profiles from a fleet YAML file, in ring order."""
    path = Path(path)
    if not path.is_file():
        raise RingjaxError(f"fleet file {path} not found: pass an existing YAML file to --fleet")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RingjaxError(f"{path}: not valid YAML ({str(error).splitlines()[0]}): fix the file") from None
    return parse_fleet(data, str(path))


def profile_entry(profile: DeviceProfile) -> dict[str, Any]:
    """The fleet-file entry of a profile, in plain units (bytes, bytes/s, seconds)."""
    return {
        "name": profile.name,
        "peak_flops": dict(profile.peak_flops),
        "memory": profile.memory_bytes,
        "link_bandwidth": profile.link_bandwidth_bytes_per_s,
        "link_latency": profile.link_latency_s,
        "spectral_efficiency": profile.uplink_spectral_efficiency_bits_per_hz,
        "notes": profile.notes,
    }


def write_profile(profile: DeviceProfile, path: str | Path) -> None:
    """Write `profile` as a one-device fleet file, so it can be passed to --fleet or merged."""
    Path(path).write_text(yaml.safe_dump({"devices": [profile_entry(profile)]}, sort_keys=False))


def _meminfo_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RingjaxError("/proc/meminfo has no MemTotal line: write the memory into the profile by hand")


def _median_matmul_seconds(size: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm up outside the timed runs
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def calibrate(name: str | None = None, size: int = 2048, repeats: int = 5) -> DeviceProfile:
    """Measure this machine's first JAX device: fp32 matmul FLOP/s (median of `repeats` runs) and memory.

    Accelerators report their memory limit; CPUs use MemTotal from /proc/meminfo. The link and
    radio fields are not measurable here and are copied from the `cpu-host` preset (see notes).
    """
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    memory = int(stats.get("bytes_limit") or _meminfo_bytes())
    fp32 = 2 * size**3 / _median_matmul_seconds(size, repeats)
    host = preset("cpu-host")
    return dataclasses.replace(
        host,
        name=name or f"{socket.gethostname()}-{device.platform}",
        peak_flops={"fp32": fp32},
        memory_bytes=memory,
        notes=(f"calibrated on {device.device_kind}: fp32 {size}^3 matmul, median of {repeats}; "
               f"link and spectral efficiency copied from the cpu-host preset"),
    )
