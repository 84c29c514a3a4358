"""Client budgets and the fleet file that gives them in tiers.

A client budget is (peak memory bytes, FLOPs per round, upload bytes per round). A fleet file
is YAML (or the same as a dict) with a list of tiers; each tier takes a `fraction` of the
clients (or an exact `count`):

    tiers:
      - {name: weak,   fraction: 0.4, memory: 200MB, flops_per_round: 2e11, upload: 10MB}
      - {name: medium, fraction: 0.4, memory: 400MB, flops_per_round: 4e11, upload: 25MB}
      - {name: strong, fraction: 0.2, memory: 1GB,   flops_per_round: 1e12, upload: 200MB}

Sizes take B, kB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024); FLOPs take a
plain number or an SI suffix (5e12, 5T, 500G, "5 TFLOP"). Clients are dealt to tiers by
largest remainder and shuffled by a seed, so the same file and seed give the same fleet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ringjax.errors import RingjaxError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SI = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")
_TIER_KEYS = {"name", "fraction", "count", "memory", "flops_per_round", "upload"}
EXAMPLE = "tiers: [{name: weak, fraction: 0.4, memory: 300MB, flops_per_round: 5e12, upload: 2MB}, ...]"


@dataclass(frozen=True)
class Budget:
    memory_bytes: float
    flops_per_round: float
    upload_bytes: float


@dataclass(frozen=True)
class Tier:
    name: str
    budget: Budget
    fraction: float | None = None
    count: int | None = None


@dataclass(frozen=True)
class Fleet:
    tiers: tuple[Tier, ...]

    def assign(self, num_clients: int, seed: int = 0) -> ClientBudgets:
        """Deal `num_clients` clients to the tiers (counts, or fractions by largest remainder)."""
        if num_clients < 1:
            raise RingjaxError(f"the number of clients must be at least 1, got {num_clients}")
        if all(t.count is not None for t in self.tiers):
            counts = [t.count for t in self.tiers]
            if sum(counts) != num_clients:
                raise RingjaxError(f"fleet tier counts add up to {sum(counts)} but the run has {num_clients} clients; fix the counts or use fractions")
        else:
            exact = np.array([t.fraction for t in self.tiers]) * num_clients
            counts = np.floor(exact).astype(int)
            for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
                counts[i] += 1
            counts = counts.tolist()
        tier_of = np.repeat(np.arange(len(self.tiers)), counts)
        tier_of = tier_of[np.random.default_rng(seed).permutation(num_clients)]
        return ClientBudgets(self, tier_of)


@dataclass(frozen=True)
class ClientBudgets:
    """Per-client budgets: `tier_of[i]` indexes `fleet.tiers`."""

    fleet: Fleet
    tier_of: np.ndarray

    def __len__(self) -> int:
        return len(self.tier_of)

    def __getitem__(self, client: int) -> Budget:
        return self.fleet.tiers[int(self.tier_of[client])].budget

    def tier_name(self, client: int) -> str:
        return self.fleet.tiers[int(self.tier_of[client])].name

    @classmethod
    def from_list(cls, budgets: list[Budget]) -> ClientBudgets:
        """One tier per client: for tests and hand-made fleets."""
        tiers = tuple(Tier(f"client{i}", b, count=1) for i, b in enumerate(budgets))
        return cls(Fleet(tiers), np.arange(len(budgets)))


def _quantity(value: Any, units: dict[str, float], what: str, where: str) -> float:
    if isinstance(value, bool):
        raise RingjaxError(f"{where}: {what} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = _NUMBER.match(str(value))
        unit = match.group(2).lower() if match else None
        if what == "flops_per_round" and unit is not None:
            unit = re.sub(r"flops?$", "", unit)
        if match is None or unit not in units:
            raise RingjaxError(f"{where}: cannot read {what} {value!r}; write e.g. {'5e12 or 5T' if what == 'flops_per_round' else '300MB or 2GiB'}")
        number = float(match.group(1)) * units[unit]
    if not number > 0:
        raise RingjaxError(f"{where}: {what} must be positive, got {value!r}")
    return number


def parse_fleet(data: Any, source: str = "fleet") -> Fleet:
    """A `Fleet` from parsed YAML (a dict with a `tiers` list)."""
    if not isinstance(data, dict) or "tiers" not in data:
        raise RingjaxError(f"{source}: expected a mapping with a 'tiers' list, e.g. {EXAMPLE}")
    tiers_in = data["tiers"]
    if not isinstance(tiers_in, list) or not tiers_in:
        raise RingjaxError(f"{source}: 'tiers' must be a non-empty list, e.g. {EXAMPLE}")
    tiers, names = [], set()
    for i, entry in enumerate(tiers_in):
        where = f"{source}: tier {i + 1}"
        if not isinstance(entry, dict):
            raise RingjaxError(f"{where}: expected a mapping, got {entry!r}")
        name = str(entry.get("name", f"tier{i + 1}"))
        where = f"{source}: tier {name!r}"
        unknown = set(entry) - _TIER_KEYS
        if unknown:
            raise RingjaxError(f"{where}: unknown key(s) {sorted(unknown)}; a tier has {sorted(_TIER_KEYS)}")
        missing = [k for k in ("memory", "flops_per_round", "upload") if k not in entry]
        if missing:
            raise RingjaxError(f"{where}: missing {missing}; every tier gives memory, flops_per_round and upload")
        if name in names:
            raise RingjaxError(f"{where}: duplicate tier name")
        names.add(name)
        if ("fraction" in entry) == ("count" in entry):
            raise RingjaxError(f"{where}: give exactly one of 'fraction' (0..1) or 'count'")
        fraction = count = None
        if "fraction" in entry:
            fraction = entry["fraction"]
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
                raise RingjaxError(f"{where}: fraction must be a number in [0, 1], got {fraction!r}")
            fraction = float(fraction)
        else:
            count = entry["count"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise RingjaxError(f"{where}: count must be a whole number >= 0, got {count!r}")
        budget = Budget(
            memory_bytes=_quantity(entry["memory"], _SIZE_UNITS, "memory", where),
            flops_per_round=_quantity(entry["flops_per_round"], _SI, "flops_per_round", where),
            upload_bytes=_quantity(entry["upload"], _SIZE_UNITS, "upload", where),
        )
        tiers.append(Tier(name, budget, fraction, count))
    kinds = {t.fraction is None for t in tiers}
    if len(kinds) > 1:
        raise RingjaxError(f"{source}: tiers mix 'fraction' and 'count'; use one of them for every tier")
    if tiers[0].fraction is not None:
        total = sum(t.fraction for t in tiers)
        if abs(total - 1.0) > 1e-6:
            raise RingjaxError(f"{source}: tier fractions add up to {total:g}, not 1; fix them")
    return Fleet(tuple(tiers))


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path).expanduser()
    if not path.is_file():
        raise RingjaxError(f"fleet file {path} not found; write one like: {EXAMPLE}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RingjaxError(f"fleet file {path} is not valid YAML: {err}".replace("\n", " ")) from None
    return parse_fleet(data, str(path))
