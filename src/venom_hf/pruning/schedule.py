"""The beta-step schedule of gradual V:N:M pruning: V:N0:M -> ... -> V:N:M between two optimizer steps.

Defaults versus the original VENOM recipes (venom-notes.md §4.4):

* the original starts at 64:5:8 (2:8, V=64) or 9:16 (2:16 pair-wise) and removes one kept weight per row
  and group every ``update_frequency = 4`` epochs, on a *linear* ramp, with hard-coded dicts per V:N:M;
* here any V:N:M comes from the spec. ``init_n`` defaults to M - 1 (the gentlest first step); pass
  ``init_n=5`` for M = 8 or ``init_n=9`` for M = 16 to reproduce the recipes' paths;
* by default each level N0, N0-1, ..., N is visited once and the ramp places the steps in time: ``"linear"``
  spaces them evenly between ``start_step`` and ``end_step``, ``"cubic"`` follows oBERT's cubic sparsity
  curve ``d(x) = d_f + (d_0 - d_f) (1 - x)^3`` (fast early, slow at the end); with ``num_steps`` given,
  the steps are evenly spaced and the ramp rounds the density at each into a level N instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..format import VNMSpec

__all__ = ["VNMSchedule"]


@dataclass(frozen=True)
class VNMSchedule:
    spec: VNMSpec
    start_step: int
    end_step: int
    init_n: int | None = None
    num_steps: int | None = None
    ramp: str = "cubic"

    def __post_init__(self):
        object.__setattr__(self, "spec", VNMSpec.parse(self.spec))
        if self.ramp not in ("cubic", "linear"):
            raise ValueError(f"ramp must be 'cubic' or 'linear', got {self.ramp!r}")
        if self.start_step < 0 or self.end_step < self.start_step:
            raise ValueError(f"need 0 <= start_step <= end_step, got {self.start_step}, {self.end_step}")
        n0 = self.first_n
        if not self.spec.n <= n0 < self.spec.m:
            raise ValueError(f"init_n must be in [N, M) = [{self.spec.n}, {self.spec.m}), got {n0}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        times = [t for t, _ in self.steps()]
        if len(set(times)) != len(times) or times[-1] > self.end_step:
            raise ValueError(
                f"{len(self.steps())} pruning steps do not fit between steps {self.start_step} and {self.end_step}; "
                "widen the range or lower num_steps"
            )

    @property
    def first_n(self) -> int:
        return self.spec.m - 1 if self.init_n is None else int(self.init_n)

    def _density(self, x: float) -> float:
        d0, df = self.first_n / self.spec.m, self.spec.n / self.spec.m
        return df + (d0 - df) * ((1.0 - x) ** 3 if self.ramp == "cubic" else (1.0 - x))

    def steps(self) -> list[tuple[int, VNMSpec]]:
        """[(global_step, spec)], ascending: at ``global_step`` (after that many optimizer steps) prune to spec."""
        v, m, n, n0 = self.spec.v, self.spec.m, self.spec.n, self.first_n
        span = self.end_step - self.start_step
        if self.num_steps is None:
            levels = list(range(n0, n - 1, -1))
            if len(levels) == 1:
                return [(self.end_step, VNMSpec(v, n, m))]
            out, last = [], None
            d0, df = n0 / m, n / m
            for lvl in levels:
                frac = (lvl / m - df) / (d0 - df)  # remaining fraction of the ramp's density drop
                x = 1.0 - (frac ** (1.0 / 3.0) if self.ramp == "cubic" else frac)
                t = self.start_step + round(x * span)
                if last is not None and t <= last:
                    t = last + 1
                out.append([t, lvl])
                last = t
            # keep the final step at end_step; push earlier collisions back if needed
            out[-1][0] = max(out[-1][0], self.end_step)
            return [(t, VNMSpec(v, lvl, m)) for t, lvl in out]
        k = self.num_steps
        out, prev = [], n0
        for i in range(k):
            x = i / (k - 1) if k > 1 else 1.0
            t = self.start_step + round(x * span)
            lvl = n if i == k - 1 else min(prev, max(n, round(self._density(x) * m)))
            out.append((t, VNMSpec(v, lvl, m)))
            prev = lvl
        return out

    def spec_at(self, global_step: int) -> VNMSpec | None:
        """The spec in force after ``global_step`` optimizer steps (None before the first pruning step)."""
        cur = None
        for t, s in self.steps():
            if t <= global_step:
                cur = s
        return cur

    def next_step(self, global_step: int) -> tuple[int, VNMSpec] | None:
        """The first pruning step strictly after ``global_step``."""
        for t, s in self.steps():
            if t > global_step:
                return t, s
        return None

    def to_dict(self) -> dict:
        return {"spec": str(self.spec), "start_step": self.start_step, "end_step": self.end_step,
                "init_n": self.init_n, "num_steps": self.num_steps, "ramp": self.ramp}

    def __len__(self) -> int:
        return len(self.steps())

    def describe(self) -> str:
        return " -> ".join(f"{s}@{t}" for t, s in self.steps())

