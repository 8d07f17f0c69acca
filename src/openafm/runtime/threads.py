"""Choose the decode thread count by measuring it, so a busy machine never collapses decoding.

On an idle machine two threads decode faster than one; with another CPU-bound process on the
machine, a parallel region waits for whichever of its threads the scheduler has descheduled, and
two threads decode 3-4x slower than one, with now and then a step stalled for 100+ ms. No fixed
setting is right in both cases, and load changes while a user waits. `ThreadTuner` starts with
the fewest threads and times decode steps: it probes a larger count only when the machine has
idle cores for the extra threads (read from the kernel's CPU counters, so a busy machine costs no
slow probe step), probes again after an interval that doubles while the winner stays the same
(32 to 1,024 steps), and probes at once when the median of the last eight steps turns twice as
slow. A re-probe times one step of each other count against that median.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

FIRST_PROBE_STEPS = 2  # steps timed per candidate in the first probe; one in a re-probe
FIRST_INTERVAL = 32  # steps between probes, doubling while the winner repeats...
MAX_INTERVAL = 1024  # ...up to this
WINDOW = 8  # recent steps watched between probes (the first probe follows the first eight)
SLOWDOWN = 2.0  # their median this much slower than the winner's probe time: probe at once
ROOM = 0.5  # probe n more threads only when at least ROOM * n cores were idle
MIN_SPAN = 0.1  # seconds: shorter readings of the idle cores are too coarse to use...
MAX_SPAN = 1.0  # ...and longer ones too old


class IdleCores:
    """Cores the machine left idle, on average since `restart()` (Linux `/proc/stat`).

    A reading is None where the counters cannot be read (other systems); `span()` says how long
    the current reading has run, as the counters tick 100 times a second per core.
    """

    def __init__(self, stat_file: Path = Path("/proc/stat")) -> None:
        self.stat_file = stat_file
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._read()

    def _read(self) -> tuple[float, float] | None:
        try:
            fields = self.stat_file.read_text().split("\n", 1)[0].split()
            idle_ticks = int(fields[4]) + int(fields[5])  # idle + iowait, summed over cores
        except (OSError, IndexError, ValueError):
            return None
        return idle_ticks / self._ticks_per_s, time.monotonic()

    def restart(self) -> None:
        self._start = self._read()

    def span(self) -> float:
        """Seconds since `restart()` (infinite where there are no counters to wait for)."""
        return math.inf if self._start is None else time.monotonic() - self._start[1]

    def __call__(self) -> float | None:
        now, start = self._read(), self._start
        if now is None or start is None or now[1] <= start[1]:
            return None
        return (now[0] - start[0]) / (now[1] - start[1])


class ThreadTuner:
    """Per decode step: which thread count to use (`step()` context), learned from timings."""

    def __init__(
        self,
        candidates: tuple[int, ...] | None = None,
        idle_cores: IdleCores | None = None,
    ) -> None:
        most = torch.get_num_threads()
        self.candidates = candidates or tuple(sorted({1, most}))
        self.idle_cores = idle_cores or IdleCores()
        self.best = self.candidates[0]
        self.best_time = float("inf")
        self.interval = FIRST_INTERVAL
        self.probes = 0  # probes run (a probe skipped for want of idle cores is not one)
        self._plan: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._until_probe = WINDOW
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
        if not self._plan and self.idle_cores.span() > MAX_SPAN:
            self.idle_cores.restart()  # a stale reading: read the load over the coming step(s)
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
        if self._until_probe == WINDOW:
            self.idle_cores.restart()  # a recent reading for the coming probe
        self._until_probe -= 1
        self._recent = [*self._recent[-(WINDOW - 1) :], seconds]
        slower = (
            len(self._recent) == WINDOW
            and statistics.median(self._recent) > SLOWDOWN * self.best_time
        )
        if self._until_probe <= 0 or slower:
            self._start_probe()

    def _start_probe(self) -> None:
        if self.idle_cores.span() < MIN_SPAN:  # too short to read the load: a few more steps
            self._until_probe = WINDOW // 2
            return
        idle = self.idle_cores()
        others = [
            n
            for n in self.candidates
            if n < self.best or (n > self.best and (idle is None or idle >= ROOM * (n - self.best)))
        ]
        steps = FIRST_PROBE_STEPS if self.probes == 0 else 1
        self._plan = [n for _ in range(steps) for n in others]
        self._times = {self.best: self._recent}
        if not self._plan:  # no room for more threads: look again soon, at no cost
            self.best_time = statistics.median(self._recent)
            self._until_probe = FIRST_INTERVAL
            self._recent = []

    def _decide(self) -> None:
        self.probes += 1
        medians = {n: statistics.median(t) for n, t in self._times.items()}
        winner = min(medians, key=medians.__getitem__)
        self.interval = (
            min(self.interval * 2, MAX_INTERVAL) if winner == self.best else FIRST_INTERVAL
        )
        self.best, self.best_time = winner, medians[winner]
        self._until_probe = self.interval
        self._recent = []
