import os
import signal

import pytest

from r1mega.train.failures import NonFiniteError, NonFiniteGuard, PreemptionHandler


def test_sigterm_and_sigusr1_only_set_a_flag():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        h = PreemptionHandler()
        try:
            assert not h.should_stop()
            os.kill(os.getpid(), sig)
            assert h.requested == sig
            assert h.should_stop()
        finally:
            h.restore()


def test_nonfinite_guard_skips_then_stops_after_k_in_a_row():
    g = NonFiniteGuard(max_consecutive=2)
    g.record(False, 1)
    g.record(True, 2)  # a good step resets the run of bad ones
    g.record(False, 3)
    with pytest.raises(NonFiniteError, match="max_consecutive_nonfinite=2"):
        g.record(False, 4)
    assert g.total_skipped == 3


def test_nonfinite_guard_zero_never_stops():
    g = NonFiniteGuard(0)
    for step in range(10):
        g.record(False, step)
    assert g.total_skipped == 10
