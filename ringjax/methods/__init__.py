"""The fine-tuning methods, each a loop over the shared core; `run_method` dispatches by name."""

from __future__ import annotations

from ringjax.errors import RingjaxError
from ringjax.train.config import TrainConfig
from ringjax.train.trainer import FEDERATED_METHODS, SINGLE_DEVICE_METHODS, fit, optim_config, prepare, train_single_device

METHODS = (*SINGLE_DEVICE_METHODS, "ringada", "deft", "pac", *FEDERATED_METHODS)


def run_ringada(config: TrainConfig) -> dict:
    """RingAda on `config.devices` ring stages, through the shared loop (logs, eval, checkpoints)."""
    from ringjax.methods.ringada import RingAda, ring_stages
    from ringjax.parallel.mesh import maybe_initialize_distributed
    from ringjax.train.optim import make_optimizer

    maybe_initialize_distributed()
    run = prepare(config)
    m, total = run.model, run.total_steps()
    ring = RingAda(m.config, m.peft_config, m.head_config, m.tree(), devices=config.devices,
                   microbatches=config.microbatches, unfreeze=config.unfreeze,
                   optimizer=make_optimizer(optim_config(config), total),
                   stages=ring_stages(config, m), schedule=config.schedule)
    ring.end_step = total  # no phase after the run's last step is compiled ahead
    return fit(run, ring, total, {"devices": config.devices, "microbatches": config.microbatches,
                                  "unfreeze": config.unfreeze})


def run_method(config: TrainConfig) -> dict:
    if config.method in SINGLE_DEVICE_METHODS:
        return train_single_device(prepare(config))
    if config.method == "ringada":
        return run_ringada(config)
    if config.method == "pac":
        from ringjax.methods.pac import run_pac

        return run_pac(config)
    if config.method == "deft":
        from ringjax.methods.deft import train_deft

        return train_deft(prepare(config), config.fleet, config.blocks)
    if config.method in FEDERATED_METHODS:  # caff, fedavg-full, fedlora, uniform-t
        from ringjax.methods.caff import train_federated

        return train_federated(config)
    raise RingjaxError(f"unknown method {config.method!r}; choose one of {list(METHODS)}")
