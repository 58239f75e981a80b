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


def test_cuda_timer_read_during_a_call_leaves_that_call_alone(monkeypatch):
    # the metrics publisher's thread reads total_us while the step may be inside a call,
    # whose end event is not recorded yet
    monkeypatch.setattr(timing.torch.cuda, "Event", _FakeEvent)
    _FakeEvent.clock, _FakeEvent.done_until = 0.0, 100.0
    timer = StepTimer(torch.device("cuda", 0))
    with timer:  # events at 1-2
        pass
    with timer:  # start at 3; its end is recorded on exit
        assert timer.total_us() == 1_000
        assert len(timer._pending) == 1
    assert timer.total_us() == 2_000 and timer._pending == []


def test_noted_calls_become_samples_only_when_kept():
    timer = StepTimer("cpu")
    with timer:
        timer.note(4, 1, 256, 0)  # not kept: auto_k does not read them
    assert timer.take_samples() == []
    timer.keep_samples = True
    with timer:
        time.sleep(0.01)
        timer.note(4, 1, 256, 0)
    with timer:
        pass  # a call that ran no pass notes nothing: no sample
    with timer:
        timer.note(0, 2, 0, 3)
    (first, second) = timer.take_samples()
    assert first[:4] == (4, 1, 256, 0) and first[4] >= 0.01
    assert second[:4] == (0, 2, 0, 3) and 0 <= second[4] < 0.01
    assert timer.take_samples() == []  # taken once
    for i in range(timing._MAX_SAMPLES + 5):  # nobody takes them: bounded, the newest kept
        with timer:
            timer.note(i)
    samples = timer.take_samples()
    assert len(samples) == timing._MAX_SAMPLES and samples[-1][0] == timing._MAX_SAMPLES + 4


def test_cuda_samples_arrive_when_the_device_finished_them(monkeypatch):
    monkeypatch.setattr(timing.torch.cuda, "Event", _FakeEvent)
    _FakeEvent.clock, _FakeEvent.done_until = 0.0, 0.0
    timer = StepTimer(torch.device("cuda", 0))
    timer.keep_samples = True
    for k in (4, 2):
        with timer:
            timer.note(k, 1, 0, 1)
    assert timer.take_samples() == []
    _FakeEvent.done_until = 2.0
    assert timer.take_samples() == [(4, 1, 0, 1, 1e-3)]
    _FakeEvent.done_until = 4.0
    assert timer.take_samples() == [(2, 1, 0, 1, 1e-3)]
