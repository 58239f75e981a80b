"""The draft's own clock: time spent in ``LVSpecDrafter.propose``, summed over steps.

On CPU the step is synchronous and a wall clock is exact. On CUDA the work is only queued when
``propose`` returns, so each call is bracketed by a pair of CUDA events and a pair is read once
the device has passed its end event (``Event.query``, which never blocks): the step never waits
for the timer, and the total trails the device by the steps still in flight.

With ``keep_samples`` a call that ``note``\\ s what it ran also yields one sample, that note plus
its seconds, for ``auto_k``'s price of the draft's prefill (``take_samples``).

The metrics publisher's thread reads ``total_us`` too (``metrics.py``): the calls in flight are
kept under a lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

_MAX_SAMPLES = 256  # if nobody takes them, the oldest go


class StepTimer:
    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._us = 0.0
        # (start, end, note) per call in flight
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, tuple | None]] = []
        self._t0 = 0.0
        self.keep_samples = False
        self._note: tuple | None = None
        self._samples: deque[tuple] = deque(maxlen=_MAX_SAMPLES)
        self._lock = threading.Lock()
        self._inside = False  # a call has started and not ended (its end event unrecorded)

    def __enter__(self):
        self._note = None
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            with self._lock:
                self._pending.append((start, torch.cuda.Event(enable_timing=True), None))
                self._inside = True
        else:
            self._t0 = time.perf_counter()
        return self

    def note(self, *what) -> None:
        """Inside the timed call: what it ran, the sample's fields before its seconds."""
        if self.keep_samples:
            self._note = what

    def __exit__(self, *exc) -> None:
        if self.cuda:
            with self._lock:
                start, end, _ = self._pending[-1]
                end.record()
                self._pending[-1] = (start, end, self._note)
                self._inside = False
            self._drain()
        else:
            seconds = time.perf_counter() - self._t0
            self._us += seconds * 1e6
            if self._note is not None:
                self._samples.append((*self._note, seconds))
        self._note = None

    def _drain(self) -> None:
        with self._lock:
            done = 0
            # recorded in stream order: stop at the first unfinished (or not yet ended)
            for start, end, note in self._pending[:-1] if self._inside else self._pending:
                if not end.query():
                    break
                ms = start.elapsed_time(end)
                self._us += ms * 1e3
                if note is not None:
                    self._samples.append((*note, ms * 1e-3))
                done += 1
            del self._pending[:done]

    def total_us(self) -> int:
        """Microseconds spent in ``propose`` so far (on CUDA: the calls the device finished)."""
        if self.cuda:
            self._drain()
        return int(self._us)

    def take_samples(self) -> list[tuple]:
        """The noted calls finished since the last take: (*note, seconds) each."""
        if self.cuda:
            self._drain()
        out = list(self._samples)
        self._samples.clear()
        return out
