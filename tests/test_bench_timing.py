"""The timing core (portinfer.bench.timing.measure) on a fake clock: the figures it reports are
exact functions of what the timed function costs, so they are checked against hand-computed values."""
import pytest

from portinfer.bench.timing import Progress, TimingStats, measure


class FakeClock:
    """A host clock that only moves when the timed function says it spent time; logs reads and syncs."""

    def __init__(self):
        self.now = 0.0
        self.events = []

    def __call__(self):
        self.events.append("read")
        return self.now

    def sync(self):
        self.events.append("sync")

    def spend(self, seconds):
        self.events.append("call")
        self.now += seconds


def test_rotating_inputs_calls_per_repeat_and_median_are_exact():
    clock = FakeClock()
    used = []

    def fn(tag, cost_s):
        used.append(tag)
        clock.spend(cost_s)

    # two input sets alternating 1 ms and 3 ms; warm-up 3 calls (no time floor)
    stats = measure(fn, inputs=[("a", 1e-3), ("b", 3e-3)], warmup=3, warmup_s=0.0, repeats=4, min_time_s=0.04,
                    timer=clock, sync=clock.sync)
    # fastest warm-up call after the first: 1 ms -> 0.04 s / 4 repeats / 1 ms = 10 calls per repeat
    assert stats.warmup_calls == 3 and stats.calls_per_repeat == 10 and stats.repeats == 4
    assert used == ["a", "b"] * (43 // 2) + ["a"]  # 3 warm-up + 40 timed calls, strictly rotating
    # each repeat: 10 calls starting on "b" (call 3), 5 x 3 ms + 5 x 1 ms = 20 ms -> 2 ms per call
    for sample in stats.samples_s:
        assert sample == pytest.approx(2e-3, rel=1e-12)
    assert stats.median_s == pytest.approx(2e-3, rel=1e-12)


def test_every_clock_read_is_preceded_by_a_device_sync():
    clock = FakeClock()
    measure(lambda: clock.spend(1e-4), warmup=2, warmup_s=0.0, repeats=3, min_time_s=0.0, timer=clock,
            sync=clock.sync)
    reads = [i for i, e in enumerate(clock.events) if e == "read"]
    # the warm-up loop's own time check reads the clock without a sync; every read that starts or
    # ends a timed span follows a sync
    spans = [i for i in reads if clock.events[i - 1] == "sync"]
    assert len(spans) == 2 * (2 + 3)  # 2 warm-up calls and 3 repeats, each started and stopped
    calls = [i for i, e in enumerate(clock.events) if e == "call"]
    for c in calls:  # every call sits inside a synced span: a sync+read before it and a sync+read after
        assert any(s < c for s in spans) and any(s > c for s in spans)


def test_spread_from_samples_matches_hand_computed_quartiles():
    stats = TimingStats.from_samples([4.0, 1.0, 100.0, 3.0, 2.0], calls_per_repeat=7, warmup_calls=2)
    # sorted 1, 2, 3, 4, 100: inclusive quartiles sit at positions 1, 2, 3
    assert (stats.min_s, stats.q1_s, stats.median_s, stats.q3_s, stats.max_s) == (1.0, 2.0, 3.0, 4.0, 100.0)
    assert stats.iqr_s == 2.0 and stats.mean_s == 22.0 and stats.repeats == 5


def test_a_slow_first_call_does_not_set_the_calls_per_repeat():
    clock = FakeClock()
    costs = iter([0.5] + [1e-3] * 1000)  # a compile-like first call, then 1 ms calls
    stats = measure(lambda: clock.spend(next(costs)), warmup=2, warmup_s=0.0, repeats=2, min_time_s=0.02,
                    timer=clock, sync=clock.sync)
    assert stats.calls_per_repeat == 10 and stats.median_s == pytest.approx(1e-3)


@pytest.mark.parametrize("kwargs, match", [({"repeats": 0}, "repeats"), ({"warmup": 0}, "warmup"),
                                           ({"min_time_s": float("nan")}, "min_time_s"), ({"inputs": []}, "inputs")])
def test_bad_arguments_are_rejected_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure(lambda *a: None, **kwargs)


def test_progress_bar_draws_only_when_enabled(capsys):
    import io
    stream = io.StringIO()
    bar = Progress(4, stream=stream, enabled=True)
    bar.step("linear")
    bar.step("rope")
    assert "2/4" in stream.getvalue() and "rope" in stream.getvalue()
    quiet = io.StringIO()
    Progress(4, stream=quiet, enabled=False).step("x")
    assert quiet.getvalue() == ""
