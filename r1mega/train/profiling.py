"""Opt-in profile of one GRPO step (``logging.profile_step=N``): where the step's time goes.

Step N runs under ``torch.profiler`` (CPU activity, plus CUDA when present) with named ranges
around its phases::

    r1mega/step
      r1mega/rollout  r1mega/reward  r1mega/logprobs  r1mega/train  r1mega/metrics
                                     (model_forward)  micro_batches, forward_backward
                                                        (model_forward, loss, finalize_grads),
                                                      optimizer_step

Rank 0 writes ``<run_dir>/profile/step<N>.txt``:

(a) per range: calls, host wall time, device (kernel) time of the kernels launched inside it, the
    ops and kernels launched, blocking device syncs and host reads of tensor values;
(b) the top 40 ops by self CPU time; (c) the top 40 by self device time (CUDA only);
(d) device -> host synchronisations: the runtime's blocking calls (cudaStreamSynchronize,
    cudaDeviceSynchronize, cudaEventSynchronize, cudaMemcpy) and ``aten::_local_scalar_dense``
    (``.item()``, ``float(t)``, ``bool(t)``: a sync when ``t`` is on the GPU) per range, and on
    CUDA the Python call sites of every synchronising op, caught with
    ``torch.cuda.set_sync_debug_mode("warn")`` for the profiled step only;

and ``step<N>.json.gz``, the chrome trace (chrome://tracing or https://ui.perfetto.dev).

Ranges are attributed by time on the host: an op, kernel launch or sync belongs to every range
that was open when it started, on any thread (CUDA runs the backward on its own thread). The
numbers are inclusive: ``r1mega/train`` contains ``r1mega/forward_backward``.

When no step is being profiled, :func:`prange` returns one shared no-op context: the ranges cost
a function call and nothing is recorded.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import re
import time
import traceback
import warnings
from typing import Callable, Optional

import torch

_ON = False
_NULL = contextlib.nullcontext()
PREFIX = "r1mega/"
# Blocking runtime calls: the host waits for the device in each of them.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy")
# A tensor's value read back to the host (item/float/int/bool): a sync when it lives on the GPU.
HOST_READ = "aten::_local_scalar_dense"
SYNC_WARNING = "synchronizing CUDA operation"
TOP_ROWS = 40
_THIS = os.path.abspath(__file__)


def active() -> bool:
    """True while a step is being profiled (on this rank)."""
    return _ON


def prange(name: str):
    """``record_function("r1mega/<name>")`` while a step is being profiled, else a no-op."""
    return torch.profiler.record_function(PREFIX + name) if _ON else _NULL


# ----------------------------------------------------------------------------- the report


def _runtime_name(name: str) -> str:
    """CUDA runtime rows may carry an API version suffix (``cudaMemcpy_v3020``)."""
    return re.sub(r"_v\d+$", "", name)


def _is_device_event(e) -> bool:
    return getattr(e.device_type, "name", str(e.device_type)).upper() != "CPU"


def _enclosing(r, ranges) -> list:
    """The ranges (same thread) that contain ``r``, outermost first."""
    out = [o for o in ranges if o is not r and o.thread == r.thread
           and o.time_range.start <= r.time_range.start and r.time_range.end <= o.time_range.end]
    return sorted(out, key=lambda o: (o.time_range.start, -o.time_range.end))


def range_rows(events) -> list[dict]:
    """One row per chain of nested ``r1mega/*`` ranges (``step > train > forward_backward``), in
    order of first appearance; see the module doc for what each number counts."""
    host = [e for e in events if not _is_device_event(e)]
    host.sort(key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in host]
    ranges = [e for e in host if e.name.startswith(PREFIX)]
    paths = {id(r): tuple(o.name for o in _enclosing(r, ranges)) + (r.name,) for r in ranges}
    rows: dict = {}
    for r in ranges:
        path = paths[id(r)]
        row = rows.setdefault(path, {
            "name": r.name, "path": path, "depth": len(path) - 1, "calls": 0, "wall_ms": 0.0,
            "child_ms": 0.0, "device_ms": 0.0, "ops": 0, "kernels": 0, "syncs": 0,
            "sync_ms": 0.0, "host_reads": 0})
        row["calls"] += 1
        wall = (r.time_range.end - r.time_range.start) / 1e3
        row["wall_ms"] += wall
        if len(path) > 1 and path[:-1] in rows:
            rows[path[:-1]]["child_ms"] += wall
        lo = bisect.bisect_left(starts, r.time_range.start)
        hi = bisect.bisect_right(starts, r.time_range.end)
        for e in host[lo:hi]:
            if e is r:
                continue
            name = e.name
            kernels = getattr(e, "kernels", None) or ()
            row["kernels"] += len(kernels)
            row["device_ms"] += sum(k.duration for k in kernels) / 1e3
            if name.startswith("aten::"):
                parent = e.cpu_parent
                if parent is None or not parent.name.startswith("aten::"):
                    row["ops"] += 1
                if name == HOST_READ:
                    row["host_reads"] += 1
            elif _runtime_name(name) in SYNC_CALLS:
                row["syncs"] += 1
                row["sync_ms"] += (e.time_range.end - e.time_range.start) / 1e3
    return list(rows.values())


def format_range_table(rows: list[dict], device: bool) -> str:
    head = f"{'range':<32} {'calls':>5} {'wall ms':>10} {'self ms':>9}"
    if device:
        head += f" {'kernel ms':>10} {'kernels':>8}"
    head += f" {'ops':>7} {'reads':>6}"
    if device:
        head += f" {'syncs':>6} {'sync ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = "  " * r["depth"] + r["name"]
        line = (f"{name:<32} {r['calls']:>5} {r['wall_ms']:>10.2f} "
                f"{r['wall_ms'] - r['child_ms']:>9.2f}")
        if device:
            line += f" {r['device_ms']:>10.2f} {r['kernels']:>8}"
        line += f" {r['ops']:>7} {r['host_reads']:>6}"
        if device:
            line += f" {r['syncs']:>6} {r['sync_ms']:>9.2f}"
        lines.append(line)
    return "\n".join(lines)


def _table(averages, sort_by: str, fallback: Optional[str] = None) -> str:
    try:
        return averages.table(sort_by=sort_by, row_limit=TOP_ROWS, max_name_column_width=70)
    except (AttributeError, KeyError, ValueError):
        if fallback is None:
            raise
        return averages.table(sort_by=fallback, row_limit=TOP_ROWS, max_name_column_width=70)


def sync_summary(averages) -> list[tuple[str, int, float]]:
    """(name, calls, host ms) of every sync-like row of the whole step."""
    out = []
    for a in averages:
        name = _runtime_name(a.key)
        if name in SYNC_CALLS or name in (HOST_READ, "cudaMemcpyAsync") or "Memcpy DtoH" in name:
            out.append((a.key, int(a.count), a.cpu_time_total / 1e3))
    return sorted(out, key=lambda t: -t[1])


class SyncSites:
    """Python call sites of synchronising CUDA ops (``torch.cuda.set_sync_debug_mode("warn")``);
    the warnings are counted by site and not shown. Does nothing without CUDA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.sites: dict = {}
        self._catch = None
        self._mode = None

    def _hook(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        self.record(traceback.extract_stack()[:-1])

    def record(self, stack) -> None:
        frames = [f for f in stack
                  if f"{os.sep}torch{os.sep}" not in f.filename and "warnings" not in f.filename
                  and os.path.abspath(f.filename) != _THIS][-4:]
        key = " <- ".join(f"{_short(f.filename)}:{f.lineno}({f.name})" for f in reversed(frames))
        self.sites[key or "<no Python frame>"] = self.sites.get(key or "<no Python frame>", 0) + 1

    def __enter__(self):
        if not self.enabled:
            return self
        self._mode = torch.cuda.get_sync_debug_mode()
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        # Every occurrence of the sync warning reaches the hook; other warnings behave as usual.
        warnings.filterwarnings("always", message=".*" + SYNC_WARNING)
        self._show = warnings.showwarning
        warnings.showwarning = self._hook
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.set_sync_debug_mode(self._mode)
            self._catch.__exit__(*exc)
        return False


def _short(path: str) -> str:
    for marker in (f"{os.sep}site-packages{os.sep}", f"{os.sep}r1mega{os.sep}"):
        if marker in path:
            head = "r1mega/" if marker.endswith(f"r1mega{os.sep}") else ""
            return head + path.split(marker, 1)[1]
    return path


def write_report(prof, path: str, *, step: int, wall_s: float, device: bool,
                 sites: Optional[dict] = None) -> str:
    """Write the text report; returns the per-range table (for the console)."""
    events = prof.events()
    rows = range_rows(events)
    table = format_range_table(rows, device)
    averages = prof.key_averages()
    parts = [
        f"GRPO step {step}, profiled: {wall_s * 1e3:.1f} ms wall (profiler overhead included; "
        f"metrics.jsonl has time/*_s of the unprofiled steps around it)",
        "",
        "(a) ranges, nested as they ran; numbers are inclusive. wall = host time; self = wall "
        "minus the nested ranges",
        "    (forward_backward's self is the backward pass and megatron's schedule); kernel ms = "
        "device time of the kernels",
        "    launched inside; ops = top-level aten ops; reads = .item()/float()/bool() of tensors; "
        "syncs = blocking runtime calls",
        table,
        "",
        f"(b) top {TOP_ROWS} ops by self CPU time",
        _table(averages, "self_cpu_time_total"),
    ]
    if device:
        parts += ["", f"(c) top {TOP_ROWS} ops by self device time",
                  _table(averages, "self_device_time_total", "self_cuda_time_total")]
    else:
        parts += ["", "(c) no device time: CUDA is not available"]
    parts += ["", "(d) device -> host synchronisations, whole step (name, calls, host ms)"]
    syncs = sync_summary(averages)
    parts += [f"    {n:<40} {c:>7} {ms:>10.2f}" for n, c, ms in syncs] or ["    none recorded"]
    if not device:
        parts.append(f"    on CPU nothing waits for a device; {HOST_READ} rows are the reads that "
                     "would sync on a GPU")
    if sites is not None:
        parts += ["", "    synchronising ops by Python call site (torch.cuda.set_sync_debug_mode):"]
        ranked = sorted(sites.items(), key=lambda kv: -kv[1])
        parts += [f"    {n:>6}  {site}" for site, n in ranked] or ["    none"]
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return table


class StepProfiler:
    """Wraps a ``step_fn(step)``: step ``step`` runs under the profiler, the others untouched."""

    def __init__(self, step: int, run_dir: str, *, rank: int = 0,
                 log: Callable[[str], None] = print):
        self.step, self.rank, self.log = int(step), rank, log
        self.out_dir = os.path.join(run_dir, "profile")

    def wrap(self, step_fn: Callable) -> Callable:
        if self.step <= 0 or self.rank != 0:
            return step_fn

        def run(step: int):
            return self.run(step_fn, step) if step == self.step else step_fn(step)

        return run

    def run(self, step_fn: Callable, step: int):
        global _ON
        from torch.profiler import ProfilerActivity, profile, record_function

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sites = SyncSites(cuda)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            _ON = True
            try:
                with sites, record_function(PREFIX + "step"):
                    out = step_fn(step)
                if cuda:
                    torch.cuda.synchronize()
            finally:
                _ON = False
        wall = time.perf_counter() - t0
        os.makedirs(self.out_dir, exist_ok=True)
        txt = os.path.join(self.out_dir, f"step{step}.txt")
        trace = os.path.join(self.out_dir, f"step{step}.json.gz")
        table = write_report(prof, txt, step=step, wall_s=wall, device=cuda,
                             sites=sites.sites if cuda else None)
        prof.export_chrome_trace(trace)
        mb = os.path.getsize(trace) / 2**20
        self.log(f"profile of step {step} ({wall * 1e3:.0f} ms with the profiler): {txt}, "
                 f"chrome trace {trace} ({mb:.1f} MiB)\n{table}")
        return out
