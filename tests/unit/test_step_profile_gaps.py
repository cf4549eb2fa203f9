"""r1mega.bench.step_profile.device_idle_gaps: idle time between kernels and the host ops open at
each gap, on hand-made profiler events (times in µs)."""
from types import SimpleNamespace

import torch

from torch.autograd import DeviceType

from r1mega.bench.step_profile import device_idle_gaps


def _ev(name, start, end, device=DeviceType.CUDA):
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=False,
                           time_range=SimpleNamespace(start=start, end=end))


def test_gaps_are_the_uncovered_time_between_kernels_with_the_open_host_ops():
    events = [
        _ev("k1", 0, 100), _ev("k2", 50, 150),            # overlap: busy 0..150
        _ev("k3", 400, 500),                               # 250 µs gap before it
        _ev("k4", 510, 600),                               # 10 µs gap: below the threshold
        _ev("Optimizer.step", 300, 700, DeviceType.CPU),
        _ev("aten::add_", 390, 402, DeviceType.CPU),
        _ev("cudaLaunchKernel", 395, 399, DeviceType.CPU),
        _ev("aten::mul", 0, 10, DeviceType.CPU),           # closed long before the gap
    ]
    out = device_idle_gaps(events, min_gap_us=20)
    assert abs(out["busy_ms"] - (150 + 100 + 90) / 1e3) < 1e-12
    assert abs(out["idle_ms"] - (250 + 10) / 1e3) < 1e-12
    assert out["gaps"] == [(0.25, "Optimizer.step > aten::add_")]


def test_no_kernels_no_gaps():
    assert device_idle_gaps([_ev("aten::mm", 0, 5, DeviceType.CPU)]) == {"busy_ms": 0.0, "idle_ms": 0.0, "gaps": []}


def test_step_clock_reports_host_time_per_step_between_marks():
    from r1mega.bench.step_profile import StepClock

    clock = StepClock(torch.device("cpu"))
    for t in (10.0, 10.1, 10.35, 10.4):
        clock.mark(t)
    out = clock.summary()
    assert out["device_ms"] == []  # no events on CPU
    assert [round(x, 6) for x in out["host_ms"]] == [100.0, 250.0, 50.0]


def test_gc_clock_counts_collections_per_step():
    import gc

    from r1mega.bench.step_profile import GcClock

    clock = GcClock()
    with clock:
        gc.collect()          # a full collection
        clock.mark()
        clock.mark()          # a step without any
    assert gc.callbacks.count(clock._callback) == 0
    assert clock.full_per_step == [1, 0] and clock.per_step_ms[1] == 0.0
    assert clock.per_step_ms[0] > 0.0

