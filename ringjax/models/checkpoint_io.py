"""Read Hugging Face safetensors checkpoints into ringjax's stacked parameter trees.

Each architecture owns a regex table (checkpoint name -> parameter path). Layer-indexed names
are gathered and stacked on a leading layer axis so a pipeline stage is a slice. Unknown and
missing names are errors that list them. Pickled weights are never read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ringjax.errors import RingjaxError


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise RingjaxError(f"no model.safetensors or model.safetensors.index.json in {directory}{hint}")
    tensors = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise RingjaxError(f"checkpoint shard {path} listed in the index is missing; re-download the model")
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def map_checkpoint(tensors: dict[str, np.ndarray], rules, num_layers: int) -> dict:
    """Apply a regex table; returns a nested dict with per-layer tensors stacked on axis 0."""
    compiled = [(re.compile(pattern), target, transform) for pattern, target, transform in rules]
    flat: dict[str, np.ndarray] = {}
    layered: dict[str, dict[int, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        for pattern, target, transform in compiled:
            m = pattern.fullmatch(key)
            if not m:
                continue
            if target is None:
                break
            if transform == "T":
                value = value.T
            path = target.format(*(None,) + m.groups()) if "{" in target else target
            if target.startswith("blocks/"):
                layered.setdefault(path, {})[int(m.group(1))] = value
            else:
                flat[path] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise RingjaxError(f"unknown checkpoint keys (no rule maps them): {', '.join(sorted(unknown)[:20])}")
    for path, layers in layered.items():
        missing = sorted(set(range(num_layers)) - set(layers))
        if missing:
            raise RingjaxError(f"checkpoint lacks layers {missing} of {path}; the checkpoint is incomplete")
        flat[path] = np.stack([layers[i] for i in range(num_layers)])
    return unflatten(flat)


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def check_shapes(params: dict, expected: dict, where: str) -> None:
    """Every expected parameter present with its shape; extra or missing ones listed."""
    got, want = flatten(params), flatten(expected)
    missing = sorted(set(want) - set(got))
    if missing:
        raise RingjaxError(f"{where} is missing parameters: {', '.join(missing[:20])}")
    wrong = [f"{k} {tuple(got[k].shape)} != {tuple(want[k])}" for k in want if tuple(got[k].shape) != tuple(want[k])]
    if wrong:
        raise RingjaxError(f"{where} has parameters of the wrong shape: {'; '.join(wrong[:10])}")
