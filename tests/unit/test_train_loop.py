"""The shared step loop's exits: all steps, a time budget, a preemption signal without checkpoints."""
import os
import signal
import time
from types import SimpleNamespace

from r1mega.config import Config
from r1mega.train.trainer import _loop


class _Logger:
    def __init__(self):
        self.steps = []

    def log(self, step, metrics, prefix=""):
        self.steps.append(step)

    def console(self, step, metrics, total=None):
        pass

    def text(self, step, tag, text):
        pass


def _run(step_fn, total=10, deadline=None):
    logger = _Logger()
    last, reason = _loop(Config(), SimpleNamespace(rank=0), logger, None, step_fn, start=0,
                         total=total, prefix="", state_fn=None, policy=None, deadline=deadline)
    return last, reason, logger.steps


def test_runs_every_step_without_a_deadline():
    assert _run(lambda step: {"loss": 0.0}, total=3) == (3, "done", [1, 2, 3])


def test_stops_before_a_step_that_would_overrun_the_deadline():
    def step_fn(step):
        time.sleep(0.1)
        return {"loss": 0.0}

    # 0.1 s steps and 0.25 s: two fit, a third would end past the deadline (a loaded machine
    # may make step 1 slow enough to stop after it).
    last, reason, logged = _run(step_fn, deadline=time.perf_counter() + 0.25)
    assert reason == "time_budget" and last in (1, 2) and logged == list(range(1, last + 1))


def test_sigterm_without_a_checkpoint_dir_still_stops_at_the_step_boundary():
    def step_fn(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": 0.0}

    last, reason, logged = _run(step_fn)
    assert (last, reason) == (2, "preempted") and logged == [1, 2]
