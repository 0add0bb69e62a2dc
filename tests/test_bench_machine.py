"""The bandwidth probes of portinfer.bench.machine time with the clock they are given (bench/cpu_kernels.py's
per-core rows pass time.thread_time): on a fake clock the rate is an exact function of the bytes moved."""
import pytest

from portinfer.bench.machine import copy_bandwidth


class StepClock:
    """A clock that moves 1 ms at every read: every timed span (one read before, one after) is 1 ms."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1e-3
        return self.now


def test_copy_bandwidth_takes_its_times_from_the_given_clock():
    result = copy_bandwidth("cpu", 4096, repeats=3, timer=StepClock())
    # 1024 fp32 values read and written in 1 ms per copy
    assert result["bytes"] == 2 * 4096 and result["timing"]["repeats"] == 3
    assert result["bytes_s"] == pytest.approx(2 * 4096 / 1e-3, rel=1e-9)
