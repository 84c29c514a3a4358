"""Finished runs on disk: evaluate them again, export their trainable parameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ringjax.errors import RingjaxError
from ringjax.peft.export import CONFIG, WEIGHTS, export_hf_peft, load_trainable
from ringjax.train.config import build_config
from ringjax.train.trainer import evaluate, prepare


def _run_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RingjaxError(f"{path} not found; pass the --out directory of a ringjax training run")
    saved = json.loads(path.read_text())
    return build_config(overrides=saved | {"out": str(run_dir), "resume": True, "progress": False})


def evaluate_saved(run_dir) -> dict:
    run = prepare(_run_config(run_dir))
    return evaluate(run, load_trainable(run_dir, run.model.tree()))


def export_saved(run_dir, to, fmt: str) -> list[Path]:
    run_dir, to = Path(run_dir), Path(to)
    if not (run_dir / WEIGHTS).exists():
        raise RingjaxError(f"{run_dir / WEIGHTS} not found; the run has not finished training")
    if fmt == "ringjax":
        to.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(run_dir / name, to / name)) for name in (WEIGHTS, CONFIG)]
    config = _run_config(run_dir)
    run = prepare(config.__class__(**{**config.to_dict(), "max_train_examples": 1, "max_eval_examples": 1,
                                      "batch_size": 1}))
    params = load_trainable(run_dir, run.model.tree())
    return export_hf_peft(to, params, run.model.config, run.model.peft_config, config.model)
