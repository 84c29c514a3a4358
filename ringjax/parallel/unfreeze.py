"""Top-down unfreezing schedules: how many top blocks train at each step.

Forms (the CLI's `--unfreeze`):
- `all`: every block trains from the start;
- `top:K`: the top K blocks, fixed;
- `STEP:DEPTH,STEP:DEPTH,...`: from each STEP on, DEPTH blocks (before the first STEP, its DEPTH);
- `every:STEPS`: one block at first, one more every STEPS steps;
- `plateau` or `plateau:P`: one block at first, one more whenever the dev loss has not improved
  for P evaluations in a row (default 2).

The depth is a pure function of the step and the dev-loss history, so a checkpoint only needs
the history (`state_dict`) to resume in the right phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ringjax.errors import RingjaxError

FORMS = "all, top:K, STEP:DEPTH,STEP:DEPTH,..., every:STEPS, plateau or plateau:P"


@dataclass(frozen=True)
class UnfreezeSchedule:
    kind: str  # "all" | "top" | "points" | "every" | "plateau"
    num_layers: int
    k: int = 0
    points: tuple[tuple[int, int], ...] = ()
    interval: int = 0
    patience: int = 2
    start: int = 1

    @classmethod
    def parse(cls, text: str, num_layers: int) -> UnfreezeSchedule:
        text = (text or "all").strip().lower()
        bad = lambda why: RingjaxError(f"cannot read --unfreeze {text!r}: {why}; use {FORMS}")  # noqa: E731
        try:
            if text == "all":
                return cls("all", num_layers)
            if text.startswith("top:"):
                k = int(text[4:])
                if not 0 <= k <= num_layers:
                    raise bad(f"depth {k} is outside 0..{num_layers}")
                return cls("top", num_layers, k=k)
            if text.startswith("every:"):
                n = int(text[6:])
                if n < 1:
                    raise bad("the interval must be at least 1 step")
                return cls("every", num_layers, interval=n, start=min(1, num_layers))
            if text == "plateau" or text.startswith("plateau:"):
                p = int(text[8:]) if text.startswith("plateau:") else 2
                if p < 1:
                    raise bad("the patience must be at least 1 evaluation")
                return cls("plateau", num_layers, patience=p, start=min(1, num_layers))
            points = tuple((int(a), int(b)) for a, b in (item.split(":") for item in text.split(",")))
        except ValueError:
            raise bad("not a known form") from None
        steps = [s for s, _ in points]
        depths = [d for _, d in points]
        if any(s < 0 for s in steps) or steps != sorted(set(steps)):
            raise bad("steps must be increasing and non-negative")
        if any(not 0 <= d <= num_layers for d in depths):
            raise bad(f"depths must be within 0..{num_layers}")
        if depths != sorted(depths):
            raise bad("unfreezing is top-down: depths must not decrease")
        return cls("points", num_layers, points=points)

    def depth(self, step: int, history: Sequence[float] = ()) -> int:
        """Trainable top blocks at `step`, given the dev losses evaluated so far (plateau only)."""
        L = self.num_layers
        if self.kind == "all":
            return L
        if self.kind == "top":
            return self.k
        if self.kind == "every":
            return min(L, self.start + step // self.interval)
        if self.kind == "points":
            depth = self.points[0][1]
            for s, d in self.points:
                if step >= s:
                    depth = d
            return depth
        depth, best, bad = self.start, float("inf"), 0
        for loss in history:
            if loss < best:
                best, bad = loss, 0
            else:
                bad += 1
                if bad >= self.patience:
                    depth, bad = min(L, depth + 1), 0
        return depth

    @property
    def depths(self) -> tuple[int, ...]:
        """Every depth the schedule can reach (each compiles one step)."""
        if self.kind == "all":
            return (self.num_layers,)
        if self.kind == "top":
            return (self.k,)
        if self.kind == "points":
            return tuple(dict.fromkeys(d for _, d in self.points))
        return tuple(range(self.start, self.num_layers + 1))

    def next_depth(self, step: int, end: int | None = None, history: Sequence[float] = ()) -> int | None:
        """The depth the schedule moves to after `step` (at a step before `end`), or None; under
        `plateau`, one block deeper, which comes only if the dev loss stalls."""
        now, L = self.depth(step, history), self.num_layers
        if self.kind == "points":
            return next((d for s, d in self.points if step < s and d > now and (end is None or s < end)), None)
        if self.kind == "every":
            change = (step // self.interval + 1) * self.interval
            return min(L, now + 1) if now < L and (end is None or change < end) else None
        if self.kind == "plateau":
            return now + 1 if now < L else None
        return None

    def spec(self) -> str:
        if self.kind in ("all",):
            return "all"
        if self.kind == "top":
            return f"top:{self.k}"
        if self.kind == "every":
            return f"every:{self.interval}"
        if self.kind == "plateau":
            return f"plateau:{self.patience}"
        return ",".join(f"{s}:{d}" for s, d in self.points)

    def state_dict(self, history: Sequence[float] = (), step: int = 0) -> dict:
        """What a checkpoint records: the schedule, the dev-loss history and the phase reached."""
        return {"unfreeze": self.spec(), "num_layers": self.num_layers, "history": [float(x) for x in history],
                "step": int(step), "depth": self.depth(step, history)}

    @classmethod
    def from_state_dict(cls, state: dict) -> tuple[UnfreezeSchedule, list[float]]:
        return cls.parse(state["unfreeze"], int(state["num_layers"])), [float(x) for x in state.get("history", [])]
