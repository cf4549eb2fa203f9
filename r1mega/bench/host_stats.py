"""Where a timed region's host time goes besides the code it runs: Python's cyclic garbage
collector (collections by generation and their seconds, from ``gc.callbacks``) and the CPU time of
each thread of the process alive at the region's end (Linux ``/proc/self/task``), so that another
thread contending for the core or the GIL shows, by its OS name and id."""
from __future__ import annotations

import gc
import os
import time


def _thread_cpu() -> dict:
    """{(tid, name): CPU seconds} of this process's threads; {} where /proc is missing."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[(int(tid), name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


class HostStats:
    """``with HostStats() as h: ...`` then ``h.result()``: the region's wall seconds, the
    process's CPU seconds, the garbage collector's work, and the threads that used CPU."""

    def __init__(self):
        self._gc_t0 = None
        self.gc = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}  # generation -> [collections, seconds]

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._gc_t0 is not None:
            row = self.gc[info["generation"]]
            row[0] += 1
            row[1] += time.perf_counter() - self._gc_t0
            self._gc_t0 = None

    def __enter__(self):
        self._threads0 = _thread_cpu()
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._on_gc)
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = time.process_time() - self._cpu0
        t1 = _thread_cpu()
        self.threads = {f"{name}[{tid}]": s - self._threads0.get((tid, name), 0.0)
                        for (tid, name), s in t1.items()}
        return False

    def result(self, min_thread_s: float = 0.005) -> dict:
        busy = sorted(((k, round(v, 3)) for k, v in self.threads.items() if v >= min_thread_s),
                      key=lambda kv: -kv[1])
        return {"wall_s": round(self.wall_s, 4), "process_cpu_s": round(self.cpu_s, 4),
                "gc": {f"gen{g}": {"collections": n, "s": round(s, 4)} for g, (n, s) in self.gc.items()},
                "gc_tracked_objects": len(gc.get_objects()),
                "threads_cpu_s": dict(busy)}
