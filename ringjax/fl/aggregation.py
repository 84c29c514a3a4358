"""Layer-wise weighted aggregation.

Each transformer block is averaged over the clients that trained it, weighted by their sample
counts; a block nobody trained keeps the server's value. Every other trained part (head, final
norm, embeddings of a full job, LoRA factors) is averaged over the clients whose job trains it.

Clients report weighted sums (sum_i w_i * theta_i over a group of equal jobs, from
`GroupRunner.run`) with the weight total; a single client is the sum of one. `Aggregator`
accumulates them layer by layer and `result` divides:

    block l = sum_{i : l in top t_i} w_i theta_i[l] / sum_{i : l in top t_i} w_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ringjax.fl.clients import LocalJob


@dataclass
class Aggregator:
    """Accumulates trained parameters of a round; `result()` is the new server parameter tree."""

    server: dict
    num_layers: int

    def __post_init__(self):
        self.block_sum = jax.tree.map(jnp.zeros_like, self.server["blocks"])
        self.block_weight = jnp.zeros((self.num_layers,), jnp.float32)
        self.part_sum: dict[str, object] = {}
        self.part_weight: dict[str, float] = {}

    def add(self, job: LocalJob, sums: dict, weight) -> None:
        """Add a group's weighted sums (a trainable tree from `split_params`, scaled by weights)."""
        weight = jnp.asarray(weight, jnp.float32)
        for key, value in sums.items():
            if key == "blocks" and job.kind in ("top-t", "full"):
                cut = self.num_layers - job.depth
                if job.depth == 0:
                    continue
                self.block_sum = jax.tree.map(lambda acc, s: acc.at[cut:].add(s), self.block_sum, value)
                self.block_weight = self.block_weight.at[cut:].add(weight)
            elif key in self.part_sum:
                self.part_sum[key] = jax.tree.map(jnp.add, self.part_sum[key], value)
                self.part_weight[key] = self.part_weight[key] + weight
            else:
                self.part_sum[key] = value
                self.part_weight[key] = weight

    def add_client(self, job: LocalJob, trained: dict, weight: float) -> None:
        """Add one client's trained parameters with its weight (its sample count)."""
        self.add(job, jax.tree.map(lambda x: x * jnp.asarray(weight, x.dtype), trained), weight)

    def result(self) -> dict:
        out = dict(self.server)
        w = self.block_weight

        def average(acc, old):
            shaped = w.reshape((-1,) + (1,) * (old.ndim - 1))
            return jnp.where(shaped > 0, acc / jnp.maximum(shaped, 1e-30).astype(acc.dtype), old)

        out["blocks"] = jax.tree.map(average, self.block_sum, self.server["blocks"])
        for key, total in self.part_sum.items():
            weight = self.part_weight[key]
            out[key] = jax.tree.map(lambda s, old: jnp.where(weight > 0, s / jnp.maximum(weight, 1e-30), old), total, self.server[key])
        return out


def server_momentum(old: dict, new: dict, velocity: dict | None, beta: float, lr: float = 1.0) -> tuple[dict, dict]:
    """FedAvgM (Hsu et al., 2019): the round's change `new - old` is a pseudo-gradient the server
    accumulates with momentum, v <- beta v + (new - old), and moves by, server <- old + lr v.

    Under label skew each round's ten clients pull the head toward their own labels; the running
    sum averages those pulls over rounds, and a server lr below 1 damps each round's pull. A block
    no client trained has a zero change, so only its past momentum moves it. beta = 0 with lr = 1
    is plain averaging. Returns (server, velocity).
    """
    delta = jax.tree.map(jnp.subtract, new, old)
    velocity = delta if velocity is None else jax.tree.map(lambda v, d: beta * v + d, velocity, delta)
    return jax.tree.map(lambda o, v: o + lr * v, old, velocity), velocity


def moving_average(average: dict, latest: dict, decay: float) -> dict:
    """decay x average + (1 - decay) x latest, leaf by leaf: the served model under `server_ema`.

    Under label skew the server model's decision threshold swings from round to round (the
    rounds' clients pull the logits one way, the next rounds' the other) while its features keep
    improving; averaging the iterates (Polyak) cancels much of the swing and keeps the features.
    """
    return jax.tree.map(lambda a, x: decay * a + (1.0 - decay) * x, average, latest)


def layerwise_average(server: dict, num_layers: int, updates: list[tuple[LocalJob, dict, float]]) -> dict:
    """New server params from per-client (job, trained params, sample count) triples."""
    agg = Aggregator(server, num_layers)
    for job, trained, weight in updates:
        agg.add_client(job, trained, weight)
    return agg.result()
