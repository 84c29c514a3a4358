"""The fine-tuning methods, each a loop over the shared core; `run_method` dispatches by name."""

from __future__ import annotations

from ringjax.errors import RingjaxError
from ringjax.train.config import TrainConfig
from ringjax.train.trainer import SINGLE_DEVICE_METHODS, prepare, train_single_device


def run_method(config: TrainConfig) -> dict:
    if config.method in SINGLE_DEVICE_METHODS:
        return train_single_device(prepare(config))
    raise RingjaxError(f"unknown method {config.method!r}; choose one of {list(SINGLE_DEVICE_METHODS)}")
