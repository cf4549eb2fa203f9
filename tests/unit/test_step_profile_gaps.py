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



def test_per_step_kernels_splits_the_trace_by_the_steps_gpu_annotations():
    from r1mega.bench.step_profile import per_step_kernels, slow_step_report

    def mark(name, start, end):
        e = _ev(name, start, end)
        e.is_user_annotation = True
        return e

    events = [
        mark("bench.step.000", 0, 1000), mark("bench.step.001", 1000, 3000),
        mark("other.range", 0, 3000),                      # not a step
        _ev("ampere_gemm", 0, 600), _ev("adam_kernel", 700, 1000),          # step 0: 100 µs idle
        _ev("ampere_gemm", 1000, 1600), _ev("adam_kernel", 1600, 1900),
        _ev("elementwise_add", 2500, 3000),                 # step 1: 600 µs idle before it
        _ev("aten::mm", 0, 5, DeviceType.CPU),
    ]
    steps = per_step_kernels(events, "bench.step.")
    assert [s["name"] for s in steps] == ["bench.step.000", "bench.step.001"]
    s0, s1 = steps
    assert (s0["span_ms"], s0["busy_ms"], s0["idle_ms"]) == (1.0, 0.9, 0.1)
    assert (s1["span_ms"], s1["busy_ms"]) == (2.0, 1.4)
    assert abs(s1["idle_ms"] - 0.6) < 1e-12
    assert s1["kinds"] == {"gemm": 0.6, "optimizer": 0.3, "elementwise": 0.5}
    lines = slow_step_report(steps)
    assert lines[0].startswith("slowest bench.step.001 2.00 ms (idle 0.60) vs fastest bench.step.000")
    assert "elementwise_add" in lines[2] and "+0.500" in lines[2]


def test_per_step_kernels_without_annotations_is_empty():
    from r1mega.bench.step_profile import per_step_kernels

    assert per_step_kernels([_ev("k", 0, 1)], "bench.step.") == []
