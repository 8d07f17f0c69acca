"""Choose the decode thread count by measuring it, so a busy machine never collapses decoding.

On an idle machine two threads decode faster than one; with another CPU-bound process on the
machine, a parallel region waits for whichever of its threads the scheduler has descheduled, and
two threads decode 3-4x slower than one (measured here: 10 against 34 tokens/s). No fixed
setting is right in both cases, and load changes while a user waits. `ThreadTuner` times two
decode steps with each candidate count and uses the fastest. It probes again after an interval
that doubles while the winner stays the same (32 to 1,024 steps), and at once when the median
of the last eight steps turns twice as slow; such a re-probe times one step of each other count
against that median, so a probe costs little when the winner stays.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PROBE_STEPS = 2  # steps timed per candidate in a probe
FIRST_INTERVAL = 32  # steps between probes, doubling while the winner repeats...
MAX_INTERVAL = 1024  # ...up to this
WINDOW = 8  # recent steps watched between probes
SLOWDOWN = 2.0  # their median this much slower than the winner's probe time: probe at once


class ThreadTuner:
    """Per decode step: which thread count to use (`step()` context), learned from timings."""

    def __init__(self, candidates: tuple[int, ...] | None = None) -> None:
        most = torch.get_num_threads()
        self.candidates = candidates or tuple(sorted({1, most}))
        self.best = self.candidates[-1]
        self.best_time = float("inf")
        self.interval = FIRST_INTERVAL
        self._plan: list[int] = [n for _ in range(PROBE_STEPS) for n in self.candidates]
        self._times: dict[int, list[float]] = {}
        self._until_probe = 0
        self._recent: list[float] = []

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def _next_threads(self) -> int:
        return self._plan[0] if self._plan else self.best

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run one decode step with the chosen thread count, and learn from its time."""
        if not self.active:
            yield
            return
        threads = self._next_threads()
        before = torch.get_num_threads()
        if threads != before:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._record(threads, time.perf_counter() - start)
            if threads != before:
                torch.set_num_threads(before)

    def _record(self, threads: int, seconds: float) -> None:
        if self._plan:
            self._plan.pop(0)
            self._times.setdefault(threads, []).append(seconds)
            if not self._plan:
                self._decide()
            return
        self._until_probe -= 1
        self._recent = [*self._recent[-(WINDOW - 1) :], seconds]
        slower = (
            len(self._recent) == WINDOW
            and statistics.median(self._recent) > SLOWDOWN * self.best_time
        )
        if self._until_probe <= 0 or slower:
            self._plan = [n for n in self.candidates if n != self.best]
            self._times = {self.best: self._recent}

    def _decide(self) -> None:
        medians = {n: statistics.median(t) for n, t in self._times.items()}
        winner = min(medians, key=medians.__getitem__)
        self.interval = (
            min(self.interval * 2, MAX_INTERVAL) if winner == self.best else FIRST_INTERVAL
        )
        self.best, self.best_time = winner, medians[winner]
        self._until_probe = self.interval
        self._recent = []
