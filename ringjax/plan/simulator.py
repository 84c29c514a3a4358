"""Event-driven simulation of a pipeline schedule on a fleet of device profiles.

A `Schedule` is what a pipeline engine runs: a list of ticks, each a set of `Action`s (one per
busy device), plus the `Transfer`s that carry one action's output to another action on another
device. The ticks fix each device's order of work and are a valid order of the data flow; the
simulator then drops the lock-step and times every action as soon as its device is free and its
inputs have arrived, because real devices do not wait for a global tick. Work and sends overlap;
sends on one link queue behind each other.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from ringjax.errors import RingjaxError
from ringjax.plan.profiles import DeviceProfile

Costs = Mapping[tuple[str, int], float]
"""Seconds of each (kind, stage) on the device the schedule runs it on."""


@dataclasses.dataclass(frozen=True)
class Action:
    """One unit of work: `kind` ("fwd", "bwd", "grad", "upload", ...) of `microbatch` at `stage`."""

    device: int
    kind: str
    microbatch: int
    stage: int


@dataclasses.dataclass(frozen=True)
class Transfer:
    """`bytes` of `producer`'s output that `consumer` needs before it can start."""

    producer: Action
    consumer: Action
    bytes: float

    @property
    def src(self) -> int:
        return self.producer.device

    @property
    def dst(self) -> int:
        return self.consumer.device


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-tick actions and the transfers between them; producers come in earlier ticks than consumers."""

    ticks: tuple[tuple[Action, ...], ...]
    transfers: tuple[Transfer, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "ticks", tuple(tuple(tick) for tick in self.ticks))
        object.__setattr__(self, "transfers", tuple(self.transfers))

    @property
    def actions(self) -> tuple[Action, ...]:
        return tuple(action for tick in self.ticks for action in tick)


@dataclasses.dataclass(frozen=True)
class Span:
    """When a piece of work or a send ran: `item` is an `Action` or a `Transfer`."""

    item: Action | Transfer
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Timing of one simulated schedule; per-device tuples are indexed like the profiles."""

    makespan: float
    busy: tuple[float, ...]
    idle: tuple[float, ...]
    bubble_fraction: float  # idle share of the devices that have any work
    bytes_per_link: dict[tuple[int, int], float]
    spans: tuple[Span, ...]  # actions
    sends: tuple[Span, ...]  # transfers between different devices
    device_names: tuple[str, ...]

    @property
    def total_work(self) -> float:
        """Busy seconds summed over devices. Where the devices are emulated on one host and share its
        cores, this is what the step costs the host whatever the schedule's overlap: compare it with
        the step's CPU time."""
        return float(sum(self.busy))


def _check(schedule: Schedule, num_devices: int) -> dict[Action, int]:
    tick_of = {}
    for tick, actions in enumerate(schedule.ticks):
        devices = [action.device for action in actions]
        if len(set(devices)) != len(devices):
            raise ValueError(f"tick {tick} gives one device two actions: {actions}")
        for action in actions:
            if not 0 <= action.device < num_devices:
                raise ValueError(f"{action} names device {action.device} but there are {num_devices} profiles")
            if action in tick_of:
                raise ValueError(f"{action} appears twice in the schedule")
            tick_of[action] = tick
    for transfer in schedule.transfers:
        for end in (transfer.producer, transfer.consumer):
            if end not in tick_of:
                raise ValueError(f"{transfer} refers to {end}, which is not in the schedule")
        if tick_of[transfer.producer] >= tick_of[transfer.consumer]:
            raise ValueError(f"{transfer}: the producer must run in an earlier tick than the consumer")
    return tick_of


def simulate(schedule: Schedule, profiles: Sequence[DeviceProfile], costs: Costs) -> SimResult:
    """Time `schedule` on `profiles` (indexed by Action.device) with per-(kind, stage) `costs`.

    A send between two devices takes the slower link's bandwidth and the larger of their
    latencies; a send to the same device is free.
    """
    _check(schedule, len(profiles))
    outgoing = defaultdict(list)
    for transfer in schedule.transfers:
        outgoing[transfer.producer].append(transfer)
    device_free = [0.0] * len(profiles)
    busy = [0.0] * len(profiles)
    ready = defaultdict(float)
    link_free = defaultdict(float)
    bytes_per_link = defaultdict(float)
    spans, sends = [], []
    for action in schedule.actions:  # tick order respects every device's order and every transfer
        key = (action.kind, action.stage)
        if key not in costs:
            raise RingjaxError(f"no cost for {action.kind} of stage {action.stage}: "
                               f"add the key {key!r} to the costs")
        start = max(device_free[action.device], ready[action])
        end = start + costs[key]
        device_free[action.device] = end
        busy[action.device] += costs[key]
        spans.append(Span(action, start, end))
        for transfer in outgoing[action]:
            if transfer.src == transfer.dst:
                ready[transfer.consumer] = max(ready[transfer.consumer], end)
                continue
            src, dst = profiles[transfer.src], profiles[transfer.dst]
            link = (transfer.src, transfer.dst)
            bandwidth = min(src.link_bandwidth_bytes_per_s, dst.link_bandwidth_bytes_per_s)
            send_start = max(end, link_free[link])
            link_free[link] = send_start + transfer.bytes / bandwidth
            arrival = link_free[link] + max(src.link_latency_s, dst.link_latency_s)
            ready[transfer.consumer] = max(ready[transfer.consumer], arrival)
            bytes_per_link[link] += transfer.bytes
            sends.append(Span(transfer, send_start, arrival))
    makespan = max((span.end for span in spans), default=0.0)
    working = {action.device for action in schedule.actions}
    idle = tuple(makespan - b for b in busy)
    bubble = sum(idle[d] for d in working) / (len(working) * makespan) if makespan > 0 else 0.0
    return SimResult(makespan=makespan, busy=tuple(busy), idle=idle, bubble_fraction=bubble,
                     bytes_per_link=dict(bytes_per_link), spans=tuple(spans), sends=tuple(sends),
                     device_names=tuple(profile.name for profile in profiles))


def scale_costs(costs: Costs, schedule: Schedule, measured_on: DeviceProfile,
                profiles: Sequence[DeviceProfile], dtype: str = "fp32") -> dict[tuple[str, int], float]:
    """Costs measured on one device, rescaled by peak FLOP/s to the devices the schedule uses.

    This is how times measured on this machine predict an edge testbed: each (kind, stage) runs
    on one device, and its time scales with that device's speed relative to `measured_on`.
    """
    device_of = {}
    for action in schedule.actions:
        key = (action.kind, action.stage)
        if device_of.setdefault(key, action.device) != action.device:
            raise ValueError(f"{key} runs on devices {device_of[key]} and {action.device}: "
                             f"its cost cannot be scaled to one device")
    reference = measured_on.flops(dtype)
    return {key: seconds * reference / profiles[device_of[key]].flops(dtype)
            for key, seconds in costs.items() if key in device_of}


def _per_device(schedule: Schedule, kind: str, devices: Sequence[int] | None) -> tuple[dict[int, Action], tuple[Action, ...]]:
    last: dict[int, Action] = {}
    for action in schedule.actions:
        last[action.device] = action
    devices = sorted(last) if devices is None else list(devices)
    added = tuple(Action(d, kind, 0, d) for d in devices)
    if set(added) & set(schedule.actions):
        raise ValueError(f"the schedule already has {kind!r} actions with microbatch 0 on {devices}")
    return last, added


def first_on_every_device(schedule: Schedule, kind: str, devices: Sequence[int] | None = None) -> Schedule:
    """One `kind` action on each of `devices` (default: every device that has work; stage = that
    device, microbatch 0) before the device's first action: per-step work outside the schedule's
    actions, such as setting up the step's buffers."""
    _, head = _per_device(schedule, kind, devices)
    return Schedule(ticks=(head, *schedule.ticks), transfers=schedule.transfers)


def then_on_every_device(schedule: Schedule, kind: str, devices: Sequence[int] | None = None,
                         barrier_bytes: float = 0.0) -> Schedule:
    """`schedule` followed by one `kind` action on each of `devices` (default: every device that has
    work), stage = that device, microbatch 0, each waiting for every device's last action: a step's
    closing all-reduce and the update each device then runs on its replica (the ring engine's
    optimizer step). The barrier is a transfer of `barrier_bytes` from each device's last action."""
    last, tail = _per_device(schedule, kind, devices)
    barrier = tuple(Transfer(producer, consumer, barrier_bytes)
                    for producer in last.values() for consumer in tail)
    return Schedule(ticks=(*schedule.ticks, tail), transfers=(*schedule.transfers, *barrier))


def _tick_schedule(orders: Sequence[Sequence[Action]], transfers: Sequence[Transfer]) -> Schedule:
    """Give each action the earliest tick after its device's previous action and its producers."""
    producers = defaultdict(list)
    for transfer in transfers:
        producers[transfer.consumer].append(transfer.producer)
    tick_of: dict[Action, int] = {}
    heads = [0] * len(orders)
    remaining = sum(len(order) for order in orders)
    while remaining:
        progressed = False
        for device, order in enumerate(orders):
            while heads[device] < len(order):
                action = order[heads[device]]
                if any(p not in tick_of for p in producers[action]):
                    break
                previous = tick_of[order[heads[device] - 1]] + 1 if heads[device] else 0
                tick_of[action] = max([previous, *(tick_of[p] + 1 for p in producers[action])])
                heads[device] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("the per-device orders deadlock: some action waits for a later one")
    ticks = [[] for _ in range(max(tick_of.values(), default=-1) + 1)]
    for action, tick in tick_of.items():
        ticks[tick].append(action)
    return Schedule(ticks=tuple(tuple(sorted(t, key=lambda a: a.device)) for t in ticks),
                    transfers=tuple(transfers))


def _fwd(microbatch: int, stage: int) -> Action:
    return Action(stage, "fwd", microbatch, stage)


def _bwd(microbatch: int, stage: int) -> Action:
    return Action(stage, "bwd", microbatch, stage)


def _pipeline(num_stages: int, num_microbatches: int, backward_stages: int | None,
              activation_bytes: float, order) -> Schedule:
    """Stage s on device s; `order(s, trains)` lists stage s's actions; activations go up, gradients down."""
    backward_stages = num_stages if backward_stages is None else backward_stages
    if num_stages < 1 or num_microbatches < 1 or not 0 <= backward_stages <= num_stages:
        raise RingjaxError(f"a pipeline needs >= 1 stage and microbatch and 0 <= backward_stages <= "
                           f"stages; got {num_stages}, {num_microbatches}, {backward_stages}")
    first_bwd = num_stages - backward_stages
    microbatches = range(num_microbatches)
    transfers = [Transfer(_fwd(m, s), _fwd(m, s + 1), activation_bytes)
                 for m in microbatches for s in range(num_stages - 1)]
    transfers += [Transfer(_bwd(m, s), _bwd(m, s - 1), activation_bytes)
                  for m in microbatches for s in range(first_bwd + 1, num_stages)]
    orders = [order(s, s >= first_bwd) for s in range(num_stages)]
    return _tick_schedule(orders, transfers)


def gpipe_schedule(num_stages: int, num_microbatches: int, backward_stages: int | None = None,
                   activation_bytes: float = 0.0) -> Schedule:
    """GPipe on a ring: all forwards, then backwards over the top `backward_stages` stages only.

    Stage s runs on device s. Lower stages do no backward work (early-stopped backprop);
    `backward_stages=0` is a forward-only pass.
    """
    M = num_microbatches

    def order(s, trains):
        return [_fwd(m, s) for m in range(M)] + ([_bwd(m, s) for m in range(M)] if trains else [])

    return _pipeline(num_stages, M, backward_stages, activation_bytes, order)


def one_f_one_b_schedule(num_stages: int, num_microbatches: int, backward_stages: int | None = None,
                         activation_bytes: float = 0.0) -> Schedule:
    """1F1B (PipeDream-flush): stage s warms up with N-1-s forwards, then alternates one forward
    and one backward, so at most N-s microbatches' residuals are alive; frozen stages only forward."""
    N, M = num_stages, num_microbatches

    def order(s, trains):
        if not trains:
            return [_fwd(m, s) for m in range(M)]
        warmup = min(N - 1 - s, M)
        steady = [a for m in range(M - warmup) for a in (_fwd(m + warmup, s), _bwd(m, s))]
        return [_fwd(m, s) for m in range(warmup)] + steady + [_bwd(m, s) for m in range(M - warmup, M)]

    return _pipeline(N, M, backward_stages, activation_bytes, order)


def gantt_png(result: SimResult, path: str | Path, title: str | None = None, label: str = "microbatch") -> None:
    """Draw the timeline: one row per device, a bar per action coloured by kind and labelled with
    its `label` field ("microbatch" or "stage"), sends as thin grey bars under their sender."""
    if label not in ("microbatch", "stage"):
        raise ValueError(f"label must be 'microbatch' or 'stage', got {label!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    kinds = list(dict.fromkeys(span.item.kind for span in result.spans))  # in order of first use
    colours = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    rows = len(result.device_names)
    figure = Figure(figsize=(10, 1 + 0.45 * rows))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for span in result.spans:
        action = span.item
        axes.barh(action.device, span.end - span.start, left=span.start, height=0.6,
                  color=colours[action.kind], edgecolor="black", linewidth=0.4)
        if span.end - span.start > 0.02 * result.makespan:
            axes.text((span.start + span.end) / 2, action.device, str(getattr(action, label)),
                      ha="center", va="center", fontsize=7)
    for span in result.sends:
        axes.barh(span.item.src + 0.38, span.end - span.start, left=span.start, height=0.12,
                  color="grey")
    axes.set_yticks(range(rows), result.device_names)
    axes.invert_yaxis()
    axes.set_xlabel("seconds")
    axes.set_title(title or f"makespan {result.makespan:.4g} s, bubble {result.bubble_fraction:.1%}")
    handles = [Patch(color=colours[kind], label=kind) for kind in kinds]
    if result.sends:
        handles.append(Patch(color="grey", label="send"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
