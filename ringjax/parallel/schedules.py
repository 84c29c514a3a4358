"""Pipeline schedules: which device does what at each tick of a ring step.

A schedule is a list of ticks; each tick holds `Action(device, kind, microbatch, stage)`s:
- "fwd": stage `stage` (on device `stage`) runs microbatch m forward;
- "bwd": it runs m backward (only stages at or above the unfreeze depth);
- "head": the microbatch's owner (device m % N) applies the head and the loss with its own
  labels. It runs on a side lane, so a device may have a "fwd"/"bwd" and a "head" in one tick;
  its `stage` field is the owner device.

Data moves at the end of a tick and is used at a later one: stage s-1's forward output feeds
stage s, the last stage's output feeds the owner's head, the head's gradient feeds the last
stage's backward, and stage s's input gradient feeds stage s-1's backward. Ticks are assigned
by list scheduling from per-device orders (GPipe: all forwards, then all backwards; 1F1B:
a warm-up of forwards, then one forward and one backward in turn), so every action runs at the
earliest tick its device and its inputs allow. The engine (`ring.py`) executes the tables of
`engine_tables()` under `lax.scan`, one tick per iteration, every device in lock-step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ringjax.errors import RingjaxError

SCHEDULES = ("gpipe", "1f1b")
IDLE, FWD, BWD = 0, 1, 2


@dataclass(frozen=True)
class Action:
    device: int
    kind: str  # "fwd" | "bwd" | "head"
    microbatch: int
    stage: int


@dataclass(frozen=True)
class PipelineSchedule:
    name: str
    num_stages: int
    num_microbatches: int
    train_stages: tuple[bool, ...]  # which stages run backward
    ticks: tuple[tuple[Action, ...], ...]
    slots: int  # residual slots a training stage needs (microbatches in flight)

    @property
    def num_ticks(self) -> int:
        return len(self.ticks)

    def owner(self, microbatch: int) -> int:
        return microbatch % self.num_stages

    @property
    def actions(self) -> tuple[Action, ...]:
        return tuple(a for tick in self.ticks for a in tick)

    def tick_of(self) -> dict[Action, int]:
        return {a: t for t, tick in enumerate(self.ticks) for a in tick}

    def engine_tables(self) -> dict[str, np.ndarray]:
        """Per-tick integer tables the engine scans over (see ring.py)."""
        N, M, T, S = self.num_stages, self.num_microbatches, self.num_ticks, self.slots
        kind = np.zeros((T, N), np.int32)
        mb = np.zeros((T, N), np.int32)
        slot = np.zeros((T, N), np.int32)  # residual slot of a training stage's microbatch
        head_mb = np.full((T,), -1, np.int32)
        for t, tick in enumerate(self.ticks):
            for a in tick:
                if a.kind == "head":
                    head_mb[t] = a.microbatch
                    continue
                kind[t, a.device] = FWD if a.kind == "fwd" else BWD
                mb[t, a.device] = a.microbatch
                if self.train_stages[a.stage]:
                    slot[t, a.device] = a.microbatch % S
        recv_act = np.full((T, N), M, np.int32)  # M is the scratch row
        recv_grad = np.full((T, N), M, np.int32)
        send_head = np.zeros((T,), np.int32)
        send_grad = np.zeros((T,), np.int32)
        fwd_any = np.zeros((T,), np.int32)
        bwd_any = np.zeros((T,), np.int32)
        for t in range(T):
            for d in range(N):
                if d > 0 and kind[t, d - 1] == FWD:
                    recv_act[t, d] = mb[t, d - 1]
                    fwd_any[t] = 1
                if d < N - 1 and kind[t, d + 1] == BWD and self.train_stages[d]:
                    recv_grad[t, d] = mb[t, d + 1]
                    bwd_any[t] = 1
            if kind[t, N - 1] == FWD:
                send_head[t] = (self.owner(int(mb[t, N - 1])) - (N - 1)) % N
            if head_mb[t] >= 0:
                send_grad[t] = ((N - 1) - self.owner(int(head_mb[t]))) % N
                if self.train_stages[N - 1]:
                    recv_grad[t, N - 1] = head_mb[t]
        head_owner = np.where(head_mb >= 0, head_mb % N, -1).astype(np.int32)
        head_local = np.where(head_mb >= 0, head_mb // N, 0).astype(np.int32)
        return dict(kind=kind, mb=mb, slot=slot, recv_act=recv_act, recv_grad=recv_grad, head_owner=head_owner,
                    head_local=head_local, send_head=send_head, send_grad=send_grad, fwd_any=fwd_any, bwd_any=bwd_any)

    def busy(self, costs: Mapping[tuple[str, int], float] | None = None) -> np.ndarray:
        """(ticks, devices) busy time per device per tick; default costs fwd 1, bwd 2, head 0."""
        cost = (lambda a: costs.get((a.kind, a.stage), 0.0)) if costs else (lambda a: {"fwd": 1.0, "bwd": 2.0}.get(a.kind, 0.0))
        busy = np.zeros((self.num_ticks, self.num_stages))
        for t, tick in enumerate(self.ticks):
            for a in tick:
                busy[t, a.device] += cost(a)
        return busy

    def bubble_fraction(self, costs: Mapping[tuple[str, int], float] | None = None) -> float:
        """Idle share of device time when every tick lasts as long as its busiest device (lock-step)."""
        busy = self.busy(costs)
        total = busy.max(axis=1).sum() * self.num_stages
        return float(1.0 - busy.sum() / total) if total > 0 else 0.0

    def to_simulator(self, activation_bytes: float = 0.0):
        """The same schedule as a `ringjax.plan.simulator.Schedule` (head actions in their own sub-tick)."""
        from ringjax.plan import simulator as sim

        ticks = []
        for tick in self.ticks:
            ticks.append(tuple(sim.Action(a.device, a.kind, a.microbatch, a.stage) for a in tick if a.kind != "head"))
            ticks.append(tuple(sim.Action(a.device, a.kind, a.microbatch, a.stage) for a in tick if a.kind == "head"))
        ticks = [t for t in ticks if t]
        N = self.num_stages
        present = set(self.actions)
        fwd = lambda m, s: sim.Action(s, "fwd", m, s)
        bwd = lambda m, s: sim.Action(s, "bwd", m, s)
        head = lambda m: sim.Action(self.owner(m), "head", m, self.owner(m))
        transfers = []
        for m in range(self.num_microbatches):
            transfers += [sim.Transfer(fwd(m, s), fwd(m, s + 1), activation_bytes) for s in range(N - 1)]
            transfers.append(sim.Transfer(fwd(m, N - 1), head(m), activation_bytes))
            if Action(N - 1, "bwd", m, N - 1) in present:
                transfers.append(sim.Transfer(head(m), bwd(m, N - 1), activation_bytes))
            transfers += [sim.Transfer(bwd(m, s), bwd(m, s - 1), activation_bytes)
                          for s in range(1, N) if Action(s - 1, "bwd", m, s - 1) in present]
        return sim.Schedule(ticks=tuple(ticks), transfers=tuple(transfers))


def _orders(name: str, N: int, M: int, train: Sequence[bool]) -> list[list[Action]]:
    fwd = lambda m, s: Action(s, "fwd", m, s)
    bwd = lambda m, s: Action(s, "bwd", m, s)
    orders = []
    for s in range(N):
        if not train[s]:
            orders.append([fwd(m, s) for m in range(M)])
        elif name == "gpipe":
            orders.append([fwd(m, s) for m in range(M)] + [bwd(m, s) for m in range(M)])
        else:  # 1f1b: the last stage's round trip through the owner's head takes two ticks
            warmup = min(M, N - s + 1)
            steady = [a for m in range(M - warmup) for a in (bwd(m, s), fwd(m + warmup, s))]
            orders.append([fwd(m, s) for m in range(warmup)] + steady + [bwd(m, s) for m in range(M - warmup, M)])
    return orders


def build_schedule(name: str, num_stages: int, num_microbatches: int, train_stages: Sequence[bool]) -> PipelineSchedule:
    """Tick-by-tick schedule of one step; `train_stages[s]` says whether stage s runs backward."""
    name = name.lower()
    if name not in SCHEDULES:
        raise RingjaxError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}")
    N, M = num_stages, num_microbatches
    if N < 1 or M < 1:
        raise RingjaxError(f"a pipeline needs at least one stage and one microbatch; got {N} and {M}")
    train = tuple(bool(x) for x in train_stages)
    if len(train) != N:
        raise ValueError(f"train_stages has {len(train)} entries for {N} stages")
    if any(train[s] and not train[s + 1] for s in range(N - 1)):
        raise ValueError(f"training stages must be the top ones: {train}")

    orders = _orders(name, N, M, train)
    tick: dict[Action, int] = {}

    def producers(a: Action) -> list[Action]:
        if a.kind == "fwd":
            return [Action(a.stage - 1, "fwd", a.microbatch, a.stage - 1)] if a.stage > 0 else []
        if a.stage == N - 1:
            owner = a.microbatch % N
            return [Action(owner, "head", a.microbatch, owner), Action(a.stage, "fwd", a.microbatch, a.stage)]
        return [Action(a.stage + 1, "bwd", a.microbatch, a.stage + 1), Action(a.stage, "fwd", a.microbatch, a.stage)]

    heads = [0] * N
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for d, order in enumerate(orders):
            while heads[d] < len(order):
                a = order[heads[d]]
                deps = producers(a)
                if any(p not in tick for p in deps):
                    break
                previous = tick[order[heads[d] - 1]] + 1 if heads[d] else 0
                tick[a] = max([previous] + [tick[p] + 1 for p in deps])
                if a.kind == "fwd" and a.stage == N - 1:
                    owner = a.microbatch % N
                    tick[Action(owner, "head", a.microbatch, owner)] = tick[a] + 1
                heads[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - the orders above never deadlock
            raise RuntimeError("pipeline orders deadlock")
    ticks: list[list[Action]] = [[] for _ in range(max(tick.values()) + 1)]
    for a, t in tick.items():
        ticks[t].append(a)
    ticks = [sorted(t, key=lambda a: (a.kind == "head", a.device)) for t in ticks]

    slots = 1
    for s in range(N):
        if not train[s]:
            continue
        events = sorted((tick[Action(s, k, m, s)], k, m) for m in range(M) for k in ("fwd", "bwd"))
        live, peak = 0, 0
        for _, k, _ in events:
            live += 1 if k == "fwd" else -1
            peak = max(peak, live)
        slots = max(slots, peak)
    return PipelineSchedule(name, N, M, train, tuple(tuple(t) for t in ticks), slots)
