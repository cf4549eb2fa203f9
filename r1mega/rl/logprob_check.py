"""How far the trainer's log-probs are from the rollout's, every step; bitwise with ``rollout.exact``.

GRPO treats the sampled tokens as drawn from the policy being trained. The rollout reports each
token's log-prob; the trainer recomputes it from the training forward. Their largest gap over a
step's active tokens is logged as ``rollout/logprob_max_abs_diff`` in either mode (one device
max per micro-batch, one host read and one DP all-reduce per step). With ``rollout.exact`` the
two must be equal bit for bit: the first micro-batch the step trains on is checked on an evenly
spaced sample of its tokens (one host read), and a difference stops the run, because then some
operation escaped the batch-invariant mode and every later "exact" step would be silently off.

Beside the max, the step's importance weights w = exp(recomputed - rollout) over active tokens
are summarised (``stats``: mean |diff|, mean/min/max of w): what truncated importance sampling
(``grpo.tis_cap``) would correct, and exactly 1 everywhere in the exact mode.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


class ExactLogprobMismatch(RuntimeError):
    pass


class LogprobCheck:
    def __init__(self, exact: bool, sample_tokens: int = 256):
        self.exact, self.sample_tokens = bool(exact), int(sample_tokens)
        self.max_diff: Optional[torch.Tensor] = None
        self.pending = False
        self._sums: Optional[torch.Tensor] = None  # (3,): count, sum |diff|, sum w
        self._w_min: Optional[torch.Tensor] = None
        self._w_max: Optional[torch.Tensor] = None
        self.stats: dict = {}

    def start_step(self) -> None:
        self.max_diff, self.pending = None, self.exact
        self._sums = self._w_min = self._w_max = None

    def observe(self, recomputed: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> None:
        """recomputed, rollout, mask: (T,) of one micro-batch; only mask > 0 tokens count."""
        active = mask > 0
        rollout = rollout.to(recomputed.device, torch.float32)
        diff = torch.where(active, (recomputed.float() - rollout).abs(), torch.zeros_like(rollout))
        m = diff.max() if diff.numel() else diff.new_zeros(())
        self.max_diff = m if self.max_diff is None else torch.maximum(self.max_diff, m)
        w = torch.exp(recomputed.float() - rollout)
        sums = torch.stack([active.float().sum(), diff.sum(), torch.where(active, w, 0.0).sum()])
        w_min = torch.where(active, w, float("inf")).amin() if w.numel() else w.new_full((), float("inf"))
        w_max = torch.where(active, w, float("-inf")).amax() if w.numel() else w.new_full((), float("-inf"))
        if self._sums is None:
            self._sums, self._w_min, self._w_max = sums, w_min, w_max
        else:
            self._sums = self._sums + sums
            self._w_min = torch.minimum(self._w_min, w_min)
            self._w_max = torch.maximum(self._w_max, w_max)
        if self.pending:
            self.pending = False
            self._assert_sample(recomputed.float(), rollout, active)

    def _assert_sample(self, recomputed, rollout, active) -> None:
        idx = active.nonzero().squeeze(1)  # one host read per step
        if idx.numel() > self.sample_tokens:
            pick = torch.linspace(0, idx.numel() - 1, self.sample_tokens, device=idx.device).long()
            idx = idx[pick]
        a, b = recomputed[idx], rollout[idx]
        if not torch.equal(a, b):
            bad = int((a != b).nonzero()[0, 0])
            raise ExactLogprobMismatch(
                f"rollout.exact: the training forward's log-prob of packed token {int(idx[bad])} "
                f"is {float(a[bad])!r}, the rollout reported {float(b[bad])!r} "
                f"(max |diff| on {idx.numel()} sampled tokens: {float((a - b).abs().max()):.3e}). "
                f"An operation escaped the batch-invariant mode (r1mega/ops/batch_invariant.py): "
                f"run tests/unit/test_exact_rollout.py, or set rollout.exact=false to train "
                f"approximately on-policy.")

    def finish_step(self, dp_group=None, device=None) -> float:
        """The step's max |diff| over all DP ranks (NaN if no rank saw a rollout log-prob).
        Every rank must call it (a collective when DP > 1)."""
        if self.max_diff is None:
            # "nothing seen": below any real |diff| and weight
            mx = torch.tensor([-1.0, -math.inf, -math.inf], device=device)
            sums = torch.zeros(3, device=device)
        else:
            # one MAX reduce for the max |diff|, the max weight and the negated min weight
            mx = torch.stack([self.max_diff.detach().float(), self._w_max, -self._w_min])
            sums = self._sums.detach().float()
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=dp_group)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=dp_group)
        self.max_diff = self._sums = self._w_min = self._w_max = None
        values, (n, diff_sum, w_sum) = mx.tolist(), sums.tolist()
        value = values[0]
        self.stats = {} if n <= 0 else {
            "logprob_mean_abs_diff": diff_sum / n, "is_weight_mean": w_sum / n,
            "is_weight_min": -values[2], "is_weight_max": values[1]}
        return float("nan") if value < 0 else value
