"""Where a training step's device time goes: CUDA kernels by kind (from a profiler trace) and
the optimizer part of each step (from CUDA events), for ``r1mega bench train-step``."""
from __future__ import annotations

import gc
import time

import torch

# Device kernels by kind, first match wins (lower-case substrings of the kernel name). The MoE
# dispatch kernels are csrc/moe_dispatch_kernel.cu's; torch._grouped_mm's CUTLASS kernels carry
# "group" (GroupProblemShape / grouped) in their names.
_KERNEL_KINDS = (
    ("moe dispatch", ("routing_metadata_kernel", "permute_kernel")),
    ("grouped gemm", ("group",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm")),
    ("copy / cast", ("copy", "cast", "convert", "fill")),
    ("softmax / loss / reduce", ("softmax", "nll", "cross_entropy", "reduce", "topk", "sort",
                                 "scan", "cumsum", "bincount", "histogram")),
    ("elementwise", ("elementwise", "vectorized", "silu", "swiglu", "mul", "add")),
)


def kernel_breakdown(events) -> dict:
    """{kind: ms} of the CUDA kernels in ``events`` (profiler key averages), plus "total"."""
    from torch.autograd import DeviceType

    out: dict = {}
    for e in events:
        # record_function ranges (Optimizer.step#...) also carry device time: the kernels
        # inside them, counted already.
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        name = e.key.lower()
        kind = next((k for k, subs in _KERNEL_KINDS if any(s in name for s in subs)), "other")
        out[kind] = out.get(kind, 0.0) + e.self_device_time_total / 1e3
    out["total"] = sum(out.values())
    return out


def top_kernels(events, top: int = 45) -> list[tuple[float, int, str]]:
    """The ``top`` CUDA kernels by self device time: [(ms, calls, name), ...] largest first."""
    from torch.autograd import DeviceType

    rows = [(e.self_device_time_total / 1e3, e.count, e.key) for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    return sorted(rows, reverse=True)[:top]


def kernel_owners(events) -> dict:
    """{kernel name: the host op that launched most of its time} (the profiler links each kernel
    to the innermost op open at its launch)."""
    from torch.autograd import DeviceType

    owners: dict = {}
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        for k in getattr(e, "kernels", ()):
            by_op = owners.setdefault(k.name, {})
            by_op[e.name] = by_op.get(e.name, 0.0) + k.duration
    return {k: max(v, key=v.get) for k, v in owners.items()}


def sync_sites(events) -> list[tuple[float, str]]:
    """Each host wait for the device (cuda*Synchronize) in a profiled step, with the host ops
    open around it (outermost first): [(ms waited, "outer > ... > inner"), ...]."""
    from torch.autograd import DeviceType

    host = [e for e in events if e.device_type == DeviceType.CPU]
    out = []
    for e in host:
        if "Synchronize" not in e.name:
            continue
        s, t = e.time_range.start, e.time_range.end
        around = sorted((o for o in host if o is not e and o.time_range.start <= s
                         and t <= o.time_range.end), key=lambda o: o.time_range.start)
        names = [o.name for o in around]
        out.append((e.time_range.elapsed_us() / 1e3, " > ".join(names[:3] + names[3:][-3:])))
    return out


def device_idle_gaps(events, min_gap_us: float = 20.0, top: int = 8) -> dict:
    """Where the device waits for the host within one profiled step: the gaps between CUDA
    kernels (``events``: the profiler's FunctionEvents, µs clock shared by host and device) of at
    least ``min_gap_us``, with the host ops open when the kernel after each gap started (the
    host was still launching it: the innermost names, outermost first).

    -> {"busy_ms", "idle_ms", "gaps": [(gap_ms, "outer > ... > inner"), ...] largest first}."""
    from torch.autograd import DeviceType

    kernels, host = [], []
    for e in events:
        if getattr(e, "is_user_annotation", False) and e.device_type != DeviceType.CPU:
            continue
        r = (e.time_range.start, e.time_range.end)
        (kernels if e.device_type == DeviceType.CUDA else host).append((r, e.name))
    if not kernels:
        return {"busy_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    kernels.sort()
    busy = idle = 0.0
    gaps = []
    (cur_start, cur_end), _ = kernels[0]
    for (start, end), _ in kernels[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gap = start - cur_end
            idle += gap
            if gap >= min_gap_us:
                gaps.append((gap, start))
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    gaps.sort(reverse=True)
    out = []
    for gap, t in gaps[:top]:
        open_ops = sorted((r for r in host if r[0][0] <= t <= r[0][1]), key=lambda r: r[0][0])
        names = [n for _, n in open_ops if not n.startswith(("cuda", "cuLaunch"))]
        out.append((gap / 1e3, " > ".join(names[:2] + (["..."] if len(names) > 4 else []) + names[2:][-2:])))
    return {"busy_ms": busy / 1e3, "idle_ms": idle / 1e3, "gaps": out}


class OptimizerClock:
    """Device time of the optimizer part of each step (clip, Adam, weight copies), from CUDA
    events around it: recording an event does not wait, so the timed loop stays sync-free. The
    share of the step the optimizer takes is what a model with many more total than active
    parameters pays for its fp32 optimizer state."""

    def __init__(self, device):
        self.on = device.type == "cuda"
        self.pairs: list = []
        self.result_ms = float("nan")  # mean over the timed steps, set by _timed

    def wrap(self, fn):
        if not self.on:
            return fn

        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.pairs.append((start, end))
            return out
        return timed

    def reset(self) -> None:
        self.pairs.clear()

    def per_step_ms(self) -> list:
        """Each timed step's optimizer device time: whether a slow step was slow there."""
        if not self.pairs:
            return []
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in self.pairs]

    def mean_ms(self) -> float:
        times = self.per_step_ms()
        return sum(times) / len(times) if times else float("nan")


class StepClock:
    """Each timed step's device interval and host time, for the spread behind a mean ms/step.

    An event is recorded after every step (recording does not wait): consecutive events bound one
    step's device time plus any idle time inside it. The host time is between the returns of
    consecutive steps: once the launch queue is full it is paced by the device and equals the
    interval, so the first steps' host times (queue not yet full) say what the host needs."""

    def __init__(self, device):
        self.on = device.type == "cuda"
        self.events: list = []
        self.host: list = []

    def mark(self, host_time: float) -> None:
        self.host.append(host_time)
        if self.on:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def summary(self) -> dict:
        """After a device sync: per-step device and host ms (``steps`` = marks - 1)."""
        host_ms = [(b - a) * 1e3 for a, b in zip(self.host, self.host[1:])]
        dev_ms = [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
        return {"device_ms": dev_ms, "host_ms": host_ms}


class GcClock:
    """Host time spent in Python's garbage collector per step (``gc.callbacks``), and how many of
    those collections were full (generation 2) ones: a host pause the GPU may feel."""

    def __init__(self):
        self.per_step_ms: list = []
        self.full_per_step: list = []
        self._ms, self._full, self._t0 = 0.0, 0, None

    def _callback(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self._ms += (time.perf_counter() - self._t0) * 1e3
            self._full += info.get("generation") == 2
            self._t0 = None

    def mark(self) -> None:
        self.per_step_ms.append(self._ms)
        self.full_per_step.append(self._full)
        self._ms, self._full = 0.0, 0

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


def _kind(name: str) -> str:
    name = name.lower()
    return next((k for k, subs in _KERNEL_KINDS if any(s in name for s in subs)), "other")


def per_step_kernels(events, prefix: str) -> list[dict]:
    """Several profiled steps, each inside ``record_function(f"{prefix}{i}")``, taken apart: the
    device range of each step (the profiler's GPU annotation of that range) and the kernels that
    ran in it. -> [{"name", "span_ms", "busy_ms", "idle_ms", "kinds": {kind: ms},
    "kernels": {name: ms}}, ...] in step order; [] when the trace has no GPU annotations."""
    from torch.autograd import DeviceType

    marks, kernels = [], []
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        r = (e.time_range.start, e.time_range.end)
        if getattr(e, "is_user_annotation", False):
            if e.name.startswith(prefix):
                marks.append((r, e.name))
        else:
            kernels.append((r, e.name))
    kernels.sort()
    out = []
    for (lo, hi), name in sorted(marks):
        inside = [(r, n) for r, n in kernels if lo <= r[0] < hi]
        busy, end, kinds, per_name = 0.0, lo, {}, {}
        for (s, t), n in inside:
            busy += max(0.0, t - max(s, end))
            end = max(end, t)
            kinds[_kind(n)] = kinds.get(_kind(n), 0.0) + (t - s) / 1e3
            per_name[n] = per_name.get(n, 0.0) + (t - s) / 1e3
        out.append({"name": name, "span_ms": (hi - lo) / 1e3, "busy_ms": busy / 1e3,
                    "idle_ms": (hi - lo - busy) / 1e3, "kinds": kinds, "kernels": per_name})
    return out


def slow_step_report(steps: list[dict], top: int = 10) -> list[str]:
    """Lines comparing the slowest profiled step with the fastest: span, idle and the kernels
    whose time grew most (what a slow step spends its extra milliseconds on)."""
    if len(steps) < 2:
        return []
    fast = min(steps, key=lambda s: s["span_ms"])
    slow = max(steps, key=lambda s: s["span_ms"])
    lines = [f"slowest {slow['name']} {slow['span_ms']:.2f} ms (idle {slow['idle_ms']:.2f}) vs "
             f"fastest {fast['name']} {fast['span_ms']:.2f} ms (idle {fast['idle_ms']:.2f})"]
    kinds = sorted(set(slow["kinds"]) | set(fast["kinds"]))
    lines.append("  by kind, slow - fast (ms): " + ", ".join(
        f"{k} {slow['kinds'].get(k, 0.0) - fast['kinds'].get(k, 0.0):+.2f}" for k in kinds))
    names = set(slow["kernels"]) | set(fast["kernels"])
    delta = sorted(((slow["kernels"].get(n, 0.0) - fast["kernels"].get(n, 0.0), n) for n in names),
                   reverse=True)
    for d, n in delta[:top]:
        lines.append(f"  {d:+8.3f} ms  {fast['kernels'].get(n, 0.0):8.3f} -> "
                     f"{slow['kernels'].get(n, 0.0):8.3f}  {n[:100]}")
    return lines


def print_step_profile(step_fn, label: str, rows: int = 25) -> dict | None:
    """Top device kernels of one step (``--profile``): where the milliseconds go; -> the
    kernel-kind breakdown ({kind: ms}), None if the profiler gave none."""
    from torch.profiler import ProfilerActivity, profile

    # Two steps queued back to back, the second recorded: a step started from an idle device
    # shows the host's launch latency as idle time that a training loop never sees.
    step_fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    print(f"---- profile: {label} (one step)")
    avg, events = prof.key_averages(), prof.events()
    print(avg.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
    # Host side: a step whose device time is below its wall time is waiting on these.
    print(f"---- profile: {label}, top host (self CPU) ops")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    try:
        for ms, where in sync_sites(events):
            print(f"---- profile: {label}, host waited {ms:.2f} ms for the device in: {where}")
    except Exception as exc:  # a diagnostic only
        print(f"---- profile: {label}: no sync sites ({type(exc).__name__}: {exc})")
    try:
        kinds = kernel_breakdown(avg)
    except Exception as exc:  # a profiler API change must not lose the timings above
        print(f"---- profile: {label}: no kernel breakdown ({type(exc).__name__}: {exc})")
        return None
    print(f"---- profile: {label}, device time by kernel kind (one step)")
    total = kinds["total"] or float("nan")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        if kind != "total":
            print(f"  {kind:<26}{ms:>10.2f} ms{ms / total:>8.1%}")
    print(f"  {'total':<26}{kinds['total']:>10.2f} ms")
    print(f"---- profile: {label}, top kernels by device time (ms, calls, name)")
    try:
        owners = kernel_owners(events)
    except Exception:  # a diagnostic only
        owners = {}
    for ms, calls, name in top_kernels(avg):
        print(f"  {ms:>8.2f} {calls:>5}  {owners.get(name, '?')[:40]:<40}  {name[:110]}")
    try:
        gaps = device_idle_gaps(events)
    except Exception as exc:  # a diagnostic only
        print(f"---- profile: {label}: no idle-gap analysis ({type(exc).__name__}: {exc})")
        return kinds
    print(f"---- profile: {label}, device busy {gaps['busy_ms']:.2f} ms, idle between kernels "
          f"{gaps['idle_ms']:.2f} ms; largest gaps and the host ops open when the next kernel started:")
    for ms, where in gaps["gaps"]:
        print(f"  {ms:>8.3f} ms  {where}")
    return kinds


def print_steps_profile(step_fn, label: str, n: int) -> None:
    """``--profile-steps N``: N steps queued back to back under the profiler, each taken apart
    (span, idle, kernels by kind), and the slowest set against the fastest: what a slow step of
    the timed loop spends its extra time on."""
    from torch.profiler import ProfilerActivity, profile, record_function

    step_fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            with record_function(f"bench.step.{i:03d}"):
                step_fn()
        torch.cuda.synchronize()
    steps = per_step_kernels(prof.events(), "bench.step.")
    if not steps:
        print(f"---- profile steps: {label}: the trace has no GPU annotations of the steps")
        return
    print(f"---- profile steps: {label}: span / busy / idle ms, then the largest kinds")
    for s in steps:
        kinds = sorted(s["kinds"].items(), key=lambda kv: -kv[1])[:5]
        print(f"  {s['name']}  {s['span_ms']:7.2f} {s['busy_ms']:7.2f} {s['idle_ms']:6.2f}  "
              + "  ".join(f"{k} {v:.2f}" for k, v in kinds))
    for line in slow_step_report(steps):
        print("  " + line)
