"""The shared step loop's exits: all steps, a time budget, a preemption signal without checkpoints;
and the time budget's prediction of the final evaluation (r1mega.train.budget)."""
import os
import signal
import time
from types import SimpleNamespace

import pytest

from r1mega.config import Config
from r1mega.train.budget import TimeBudget, final_eval_reserve
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
    end = time.perf_counter() + 0.25
    last, reason, logged = _run(step_fn, deadline=lambda metrics: end)
    assert reason == "time_budget" and last in (1, 2) and logged == list(range(1, last + 1))


def test_sigterm_without_a_checkpoint_dir_still_stops_at_the_step_boundary():
    def step_fn(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": 0.0}

    last, reason, logged = _run(step_fn)
    assert (last, reason) == (2, "preempted") and logged == [1, 2]


def test_final_eval_reserve_discounts_the_first_evaluations_captures():
    # 100 s first evaluation, 95 s of it capturing graphs (the decode compile): before any
    # training rollout the whole evaluation is reserved; once a phase's captures are seen to
    # cost 0.3 s, the reserve is 1.25 x (5 + 0.3) + 5.
    budget = TimeBudget(start=1000.0, budget_s=500.0,
                        first_eval={"eval/seconds": 100.0, "eval/capture_s": 95.0})
    assert budget.deadline() == pytest.approx(1500.0 - (1.25 * 100.0 + 5.0))
    assert budget.deadline({"loss": 0.0}) == pytest.approx(1500.0 - 130.0)  # no rollout stats
    assert budget.deadline({"rollout/capture_s": 0.3}) == pytest.approx(1500.0 - (1.25 * 5.3 + 5.0))
    assert budget.deadline({"rollout/capture_s": 2.0}) == pytest.approx(1500.0 - (1.25 * 7.0 + 5.0))
    assert final_eval_reserve(10.0, 0.0, 0.0) == pytest.approx(17.5)  # CPU: nothing captured


def test_without_an_evaluation_only_the_margin_is_kept():
    assert TimeBudget(0.0, 60.0, None).deadline({"rollout/capture_s": 3.0}) == pytest.approx(55.0)
    # An evaluation from an older checkpoint, saved without its time: nothing to discount.
    assert TimeBudget(0.0, 60.0, {"eval/accuracy": 0.5}).deadline() == pytest.approx(55.0)


def test_the_loop_rereads_the_deadline_after_every_step():
    # A 1 s first evaluation that was all capture, 5.6 s budget, 0.1 s steps: reserving the
    # whole evaluation (6.25 s) leaves no step after the first; steps that report their own
    # captures as free leave 0.6 s, several steps.
    def run(report_captures):
        def step_fn(step):
            time.sleep(0.1)
            return {"loss": 0.0, **({"rollout/capture_s": 0.0} if report_captures else {})}
        budget = TimeBudget(time.perf_counter(), 5.6, {"eval/seconds": 1.0, "eval/capture_s": 1.0})
        return _run(step_fn, deadline=budget.deadline)

    assert run(False)[:2] == (1, "time_budget")
    last, reason, _ = run(True)
    assert reason == "time_budget" and last >= 3
