"""The draft's own clock: time spent in ``LVSpecDrafter.propose``, summed over steps.

On CPU the step is synchronous and a wall clock is exact. On CUDA the work is only queued when
``propose`` returns, so each call is bracketed by a pair of CUDA events and a pair is read once
the device has passed its end event (``Event.query``, which never blocks): the step never waits
for the timer, and the total trails the device by the steps still in flight.
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._us = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0

    def __enter__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._pending.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._pending[-1][1].record()
            self._drain()
        else:
            self._us += (time.perf_counter() - self._t0) * 1e6

    def _drain(self) -> None:
        done = 0
        for start, end in self._pending:  # recorded in stream order: stop at the first unfinished
            if not end.query():
                break
            self._us += start.elapsed_time(end) * 1e3
            done += 1
        del self._pending[:done]

    def total_us(self) -> int:
        """Microseconds spent in ``propose`` so far (on CUDA: the calls the device finished)."""
        if self.cuda:
            self._drain()
        return int(self._us)
