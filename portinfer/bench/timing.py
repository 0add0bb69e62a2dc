"""The timing core every portinfer benchmark uses: `measure(fn, ...) -> TimingStats`.

How a figure is taken:
- warm-up: `fn` runs at least `warmup` times and at least `warmup_s` seconds, each call timed
  on its own (first-call allocation, kernel compilation and autotuning happen here);
- calls per repeat: from the fastest warm-up call after the first, enough calls that `repeats`
  repeats together last about `min_time_s`, so a microsecond op is not timed at clock resolution;
- each repeat is one timed batch of calls, bracketed by device synchronization (CUDA events
  on a GPU), giving one per-call time; the figure is the median over repeats, with the
  quartiles, min and max as its spread;
- rotating inputs: call i gets `inputs[i % len(inputs)]`, so with enough distinct input sets
  a small op reads from memory instead of from the cache the previous call warmed.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TimingStats:
    """Per-call times in seconds over `repeats` repeats of `calls_per_repeat` calls each."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    mean_s: float
    stdev_s: float
    repeats: int
    calls_per_repeat: int
    warmup_calls: int
    samples_s: tuple

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["samples_s"] = list(self.samples_s)
        return d

    @staticmethod
    def from_samples(samples_s, calls_per_repeat, warmup_calls) -> "TimingStats":
        s = sorted(samples_s)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return TimingStats(median_s=statistics.median(s), q1_s=q1, q3_s=q3, min_s=s[0], max_s=s[-1],
                           mean_s=statistics.fmean(s), stdev_s=statistics.stdev(s) if len(s) > 1 else 0.0,
                           repeats=len(s), calls_per_repeat=calls_per_repeat, warmup_calls=warmup_calls,
                           samples_s=tuple(samples_s))


def device_sync(device) -> callable:
    """The function that waits for `device` to finish queued work (None: nothing to wait for)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    module = getattr(torch, device.type, None)  # vendor devices (npu, xpu) follow torch.cuda's API
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        return module.synchronize
    return None


class _WallClock:
    """Times a batch with a host clock, synchronizing the device before each reading."""

    def __init__(self, sync, timer):
        self.sync, self.timer = sync, timer

    def start(self):
        if self.sync:
            self.sync()
        self.t0 = self.timer()

    def stop(self) -> float:
        if self.sync:
            self.sync()
        return self.timer() - self.t0


class _CudaEvents:
    """Times a batch with CUDA events (device time, without host launch jitter at the ends)."""

    def __init__(self, device):
        self.device = device
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def start(self):
        torch.cuda.synchronize(self.device)
        self.begin.record()

    def stop(self) -> float:
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3  # ms -> s


def measure(fn, *, inputs=None, warmup=2, warmup_s=0.02, repeats=10, min_time_s=0.1, max_calls_per_repeat=100_000,
            device=None, sync=None, timer=time.perf_counter) -> TimingStats:
    """Time `fn`: the per-call median (and spread) over `repeats` timed repeats after a warm-up.

    inputs: a sequence of argument tuples; call i runs fn(*inputs[i % len(inputs)])
        (rotating input sets). None: fn() with no arguments.
    device: where fn's work runs; "cuda" times with CUDA events, other devices with `timer`
        around a device synchronization (`sync`, derived from the device when not given).
    timer: the host clock (a parameter so the core can be tested with a fake clock); on a CPU,
        time.thread_time times the calling thread's CPU time instead of the wall.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected an integer >= 1, got {repeats}")
    if warmup < 1:
        raise ValueError(f"warmup: expected an integer >= 1 (the first call is never timed), got {warmup}")
    if not (min_time_s >= 0 and math.isfinite(min_time_s)):
        raise ValueError(f"min_time_s: expected a finite number >= 0, got {min_time_s}")
    sets = list(inputs) if inputs is not None else [()]
    if not sets:
        raise ValueError("inputs: expected at least one argument tuple, got an empty sequence")
    n_sets = len(sets)
    if sync is None and device is not None:
        sync = device_sync(device)
    use_events = device is not None and torch.device(device).type == "cuda" and timer is time.perf_counter
    clock = _CudaEvents(torch.device(device)) if use_events else _WallClock(sync, timer)
    host = _WallClock(sync, timer)

    # warm-up, each call timed on its own: the first call (allocation, compilation, autotuning)
    # is excluded from the estimate; the fastest later call sets the calls per repeat, so one
    # call slowed by preemption does not shrink the repeats to a single call each
    call, times = 0, []
    started = timer()
    while call < warmup or timer() - started < warmup_s:
        host.start()
        fn(*sets[call % n_sets])
        times.append(host.stop())
        call += 1
    warmup_calls = call
    per_call_s = min(times[1:]) if len(times) > 1 else times[0]

    target_s = min_time_s / repeats
    calls_per_repeat = max(1, min(max_calls_per_repeat, math.ceil(target_s / max(per_call_s, 1e-9))))

    samples = []
    for _ in range(repeats):
        clock.start()
        for _ in range(calls_per_repeat):
            fn(*sets[call % n_sets])
            call += 1
        samples.append(clock.stop() / calls_per_repeat)
    return TimingStats.from_samples(samples, calls_per_repeat, warmup_calls)


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total, stream=None, enabled=None, width=24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def step(self, label=""):
        self.done += 1
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        line = f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {elapsed:4.0f}s eta {eta:4.0f}s {label}"
        self.stream.write(line[:120].ljust(120))
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()
