"""What a long run does when things go wrong: preemption signals, non-finite steps, dead ranks.

- SIGTERM / SIGUSR1 (Slurm sends one before preemption; torchrun forwards SIGTERM) only set a
  flag. The trainer asks :meth:`PreemptionHandler.should_stop` at a step boundary, where every rank
  agrees through one tiny all-reduce, saves a checkpoint and exits cleanly. Saving inside the
  handler itself would run collectives from a signal context on one rank only: a hang.
- A non-finite loss or gradient skips the update (:class:`NonFiniteGuard`), is logged, and after
  ``max_consecutive`` in a row stops the run with a clear error.
- A dead rank: collectives time out after ``parallel.timeout_s`` (set on the process group), and
  under torchrun the elastic agent tears the other workers down; :func:`exit_on_peer_failure`
  turns the resulting exception into a non-zero exit instead of a stack of hanging ranks.
"""
from __future__ import annotations

import math
import os
import re
import signal
import sys
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, enabled: bool = True, signals=PREEMPTION_SIGNALS):
        self.requested: Optional[int] = None
        self._previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):  # noqa: ARG002 - signal API
        self.requested = signum

    def should_stop(self, group=None) -> bool:
        """True on every rank if any rank received a preemption signal."""
        return any_rank(self.requested is not None, group)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def any_rank(flag: bool, group=None) -> bool:
    """``flag`` OR-ed over ``group``: a decision to stop must be the same on every rank, or the
    ranks that carry on hang in their next collective."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts skipped updates; ``max_consecutive`` 0 means skip forever, never stop."""

    def __init__(self, max_consecutive: int = 0):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total_skipped += 1
        print(f"[r1mega] step {step}: non-finite loss or gradient, update skipped "
              f"({self.consecutive} in a row, {self.total_skipped} in total)", flush=True)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient "
                f"(train.max_consecutive_nonfinite={self.max_consecutive}). Lower optimizer.lr, "
                f"check the data, or raise the limit.")


@torch.no_grad()
def guarded_optimizer_step(optimizer) -> tuple[bool, float]:
    """megatron's (Chained)Optimizer.step with one change: a non-finite global gradient norm skips
    the update instead of writing NaN into the weights and Adam's moments (bf16 and fp32 runs have
    no loss scaler, so megatron itself would not notice). Every rank computes the same global norm
    over the grad-stats group, so every rank takes the same branch."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from r1mega.train.lean_adam import LeanAdamW

    if optimizer.prepare_grads():  # fp16 loss scaler found inf: megatron already backs off
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if isinstance(opt.optimizer, LeanAdamW):
            # LeanAdamW divides by the clip factor inside its update (in fp32, on bf16 grads
            # that an in-place scale would round), as on the sync-free path.
            scale = max(1.0, (grad_norm + 1.0e-6) / opt.config.clip_grad)
            opt.optimizer.grad_scale = torch.tensor(scale, dtype=torch.float32, device=params[0].device)
        elif params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    try:
        return bool(optimizer.step_with_ready_grads()), grad_norm
    finally:
        for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
            if isinstance(getattr(opt, "optimizer", None), LeanAdamW):
                opt.optimizer.grad_scale = None


_PEER_MARKERS = ("Connection closed by peer", "Connection reset", "timed out", "Timeout",
                 "NCCL", "Gloo", "gloo", "peer", "Broken pipe")


def is_peer_failure(exc: BaseException) -> bool:
    """A collective (or the checkpoint writer's pipe to its manager) that failed because another
    process went away, rather than a bug or bad input here."""
    from r1mega.errors import UserError

    if isinstance(exc, UserError):
        return False
    if isinstance(exc, (ConnectionError, EOFError)):  # BrokenPipeError, ConnectionResetError
        return True
    return isinstance(exc, (RuntimeError, OSError)) and any(m in str(exc) for m in _PEER_MARKERS)


def exit_on_peer_failure(fn: Callable[[], int]) -> int:
    """Run ``fn``; a collective that failed because a peer died becomes one line ("rank N lost
    contact with rank M") and exit code 1, fast. When the peer left because it reported bad input,
    that report is the news: this rank leaves quietly with the same code (2).

    os._exit skips atexit handlers and joins of background threads that would wait on the dead
    peer forever (dist_checkpointing's writer pool, the gloo/NCCL watchdog)."""
    try:
        return fn()
    except (RuntimeError, OSError, EOFError) as exc:  # DistBackendError is a RuntimeError too
        if not is_peer_failure(exc) or os.environ.get("R1MEGA_DEBUG", "") not in ("", "0"):
            raise
        from r1mega.errors import EXIT_BAD_INPUT, peer_reported_user_error
        from r1mega.parallel.peers import lost_contact_message

        if peer_reported_user_error():
            os._exit(EXIT_BAD_INPUT)
        rank = int(dist.get_rank()) if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        # The backend's first sentence, without its source-file prefix ("[.../pair.cc:553] ").
        first = (str(exc).strip().splitlines() or [""])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160] or type(exc).__name__
        print(f"r1mega: {lost_contact_message(rank)}; exiting ({type(exc).__name__}: {first}).",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
