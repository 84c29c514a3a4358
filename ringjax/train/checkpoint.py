"""Orbax checkpoints of everything needed to continue a run exactly.

A checkpoint holds the train state (trainable params, optimizer state, step) and a JSON
record (data position, RNG seed, unfreeze phase, the run's identity). Resuming checks the
identity so a checkpoint is never continued under another configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ringjax.errors import RingjaxError

# Fields that must match for a resumed run to be the same run.
IDENTITY_FIELDS = ("model", "task", "method", "adapter", "top_t", "batch_size", "max_length", "max_train_examples",
                   "seed", "devices", "microbatches", "unfreeze", "steps", "epochs", "learning_rate", "weight_decay",
                   "warmup_ratio", "compute_dtype")


def run_identity(config) -> dict:
    return {name: getattr(config, name) for name in IDENTITY_FIELDS}


class Checkpointer:
    def __init__(self, out: Path, max_to_keep: int = 2):
        self.directory = Path(out).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
        )
        self.manager.wait_until_finished()

    def restore(self, like_state, identity: dict):
        step = self.latest_step()
        if step is None:
            raise RingjaxError(f"--resume given but {self.directory} holds no checkpoint; drop --resume to start fresh")
        record = self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        saved = record.get("identity", {})
        changed = {k: (saved.get(k), v) for k, v in identity.items() if json.dumps(saved.get(k)) != json.dumps(v)}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in changed.items())
            raise RingjaxError(f"checkpoint in {self.directory} is from another configuration ({detail}); resume with the same flags or use a new --out")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return type(like_state)(*restored), record
