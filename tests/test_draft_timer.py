"""drafter/timing.py: the draft's clock, on CPU (a wall clock) and CUDA (events read lazily)."""

import time

import torch

from lvspec_vllm.drafter import timing
from lvspec_vllm.drafter.timing import StepTimer


def test_cpu_timer_sums_the_time_inside_each_call():
    timer = StepTimer("cpu")
    for _ in range(3):
        with timer:
            time.sleep(0.01)
    time.sleep(0.05)  # outside the calls: not counted
    assert 30_000 <= timer.total_us() < 50_000 + 30_000


def test_cpu_timer_counts_a_call_that_raised():
    timer = StepTimer("cpu")
    try:
        with timer:
            time.sleep(0.01)
            raise ValueError
    except ValueError:
        pass
    assert timer.total_us() >= 10_000


class _FakeEvent:
    """A CUDA event whose completion the test controls; times are in ms as CUDA's are."""
    clock = 0.0
    done_until = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        _FakeEvent.clock += 1.0
        self.t = _FakeEvent.clock

    def query(self):
        return self.t <= _FakeEvent.done_until

    def elapsed_time(self, end):
        assert self.query() and end.query(), "read before the device finished"
        return end.t - self.t


def test_cuda_timer_reads_only_finished_calls_and_never_waits(monkeypatch):
    monkeypatch.setattr(timing.torch.cuda, "Event", _FakeEvent)
    _FakeEvent.clock, _FakeEvent.done_until = 0.0, 0.0
    timer = StepTimer(torch.device("cuda", 0))
    for _ in range(3):  # each call spans 1 ms of device time: events at 1-2, 3-4, 5-6
        with timer:
            pass
    assert timer.total_us() == 0  # nothing finished yet, and nothing was waited for
    _FakeEvent.done_until = 4.0
    assert timer.total_us() == 2_000
    assert len(timer._pending) == 1
    _FakeEvent.done_until = 6.0
    assert timer.total_us() == 3_000
    assert timer._pending == []
