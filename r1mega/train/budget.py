"""``train.time_budget_s``: when GRPO must stop so that the final evaluation still fits.

The final evaluation is predicted from the first one: its wall time, less what it spent capturing
CUDA graphs, plus what one rollout phase's captures cost now (the final evaluation captures
again), with 25 % slack and 5 s. The discount matters on a cold GPU machine: the first capture of
a decode shape also compiles the decode step, which a later phase of the same process does not pay
again, so a first evaluation can be mostly capture time and a final one a tiny fraction of it
(r1mega/bench/RECORDS.md has the figures).
Until a training rollout reports its capture time, the first evaluation's is assumed, i.e. the
whole first evaluation is reserved. Other one-time costs of the first evaluation (Triton kernels
of the prefill, cuBLAS heuristics, the reward pool's imports) stay in the estimate: it errs late.

On CPU nothing is captured and the reserve is 1.25 x the first evaluation + 5 s.
"""
from __future__ import annotations

from typing import Optional

SLACK = 1.25
MARGIN_S = 5.0


def final_eval_reserve(eval_s: float, eval_capture_s: float, phase_capture_s: float) -> float:
    """Seconds to keep for the final evaluation (module docstring)."""
    return SLACK * (max(0.0, eval_s - eval_capture_s) + phase_capture_s) + MARGIN_S


class TimeBudget:
    """The deadline for :func:`r1mega.train.trainer._loop`: ``deadline(metrics)`` after each step.

    ``start``: ``time.perf_counter()`` when the run began; ``first_eval``: the held-out
    evaluation's metrics (``eval/seconds``, ``eval/capture_s``; also when they were read back from
    a checkpoint), or None when the run evaluates nothing."""

    def __init__(self, start: float, budget_s: float, first_eval: Optional[dict]):
        self.end = start + budget_s
        ev = first_eval or {}
        self.eval_s = float(ev.get("eval/seconds", 0.0))
        self.eval_capture_s = float(ev.get("eval/capture_s", 0.0))
        self.phase_capture_s = self.eval_capture_s
        self.evaluates = first_eval is not None

    def reserve(self) -> float:
        if not self.evaluates:
            return MARGIN_S
        return final_eval_reserve(self.eval_s, self.eval_capture_s, self.phase_capture_s)

    def deadline(self, metrics: Optional[dict] = None) -> float:
        """The ``time.perf_counter()`` value no step may end after, given the latest step's
        metrics (its ``rollout/capture_s`` updates the cost of a phase's captures)."""
        if metrics and "rollout/capture_s" in metrics:
            self.phase_capture_s = float(metrics["rollout/capture_s"])
        return self.end - self.reserve()
