"""r1mega/bench/host_stats.py against what the region does: a forced full collection shows as a
generation-2 collection, and a busy thread shows with about its CPU time."""
import gc
import sys
import threading
import time

import pytest

from r1mega.bench.host_stats import HostStats


def test_a_full_collection_is_counted_as_generation_2():
    with HostStats() as h:
        gc.collect()
    r = h.result()
    assert r["gc"]["gen2"]["collections"] == 1 and r["gc"]["gen2"]["s"] >= 0
    assert r["gc_tracked_objects"] > 0
    assert h._on_gc not in gc.callbacks  # removed on exit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task")
def test_a_busy_thread_shows_with_its_cpu_time():
    stop, done = time.perf_counter() + 0.3, threading.Event()

    def spin():
        while time.perf_counter() < stop:
            pass
        done.wait()  # alive at the region's end: /proc lists live threads only

    t = threading.Thread(target=spin)
    with HostStats() as h:
        t.start()
        while time.perf_counter() < stop + 0.05:
            time.sleep(0.01)
    done.set()
    t.join()
    busy = h.result()["threads_cpu_s"]
    spinner = [v for k, v in busy.items() if k.endswith(f"[{t.native_id}]")]
    assert spinner and 0.1 <= spinner[0] <= 0.5, busy
