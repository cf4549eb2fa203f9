"""Overlapped decode steps: the host reads step k while the device already runs step k+1.

A graph-replayed decode step leaves the host idle while the GPU works, and the GPU idle while the
host records tokens, checks stops and builds the next inputs. Step k+1's inputs do not need the
host to know step k's tokens: the token column is copied on the device from step k's output, and
every other column (position, length, RNG step, block table) is known in advance. So step k+1 is
launched *before* step k is read, as long as the batch cannot change in between:

- every sequence of step k is still unfinished as far as the host knows;
- no prompt is waiting for prefill (that needs a synchronous step);
- the next tokens' blocks fit without preempting anybody;
- no sequence is at the model's maximum length.

A sequence that turns out to have finished at step k (EOS, stop string) computed one extra token
at step k+1; that token is dropped when step k+1 is read, and its K/V went to the sequence's own
block, which later owners overwrite in stream order. Otherwise the pipeline drains: step k is
read and the engine goes back to synchronous scheduling.

Opt-in (``rollout.overlap_steps``, or ``RolloutEngine(..., overlap_steps=True)``). tests/gpu checks that
it changes no token; `r1mega bench rollout --overlap-too` times it against synchronous steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from r1mega.rollout.cuda_graphs import BT


@dataclass
class PendingStep:
    seqs: list
    host_out: torch.Tensor  # (n, 2) pinned, filled when ``event`` completes
    event: Optional[object]  # torch.cuda.Event (None on CPU: already complete)
    tokens: torch.Tensor  # (n,) int64 on the device: the next step's input tokens
    slot: int


class OverlappedDecoder:
    def __init__(self, engine):
        self.engine = engine
        self.pending: Optional[PendingStep] = None
        self._slot = 0

    def launch(self, seqs: list, ids: Optional[torch.Tensor] = None) -> None:
        """Start a decode step; ``ids`` None takes the tokens from the host."""
        eng = self.engine
        slot = self._slot
        self._slot ^= 1
        width = eng._fill_host(seqs, slot, with_ids=ids is None)
        g = eng.graphs
        n = len(seqs)
        out = g.run(n, BT + width, slot=slot, ids=ids)
        host_out = g.host_out_slots[slot][:n]
        host_out.copy_(out, non_blocking=True)
        event = None
        if out.is_cuda:
            event = torch.cuda.Event()
            event.record()
        # Copied now: the output buffer is overwritten by the next replay of this bucket.
        tokens = out[:, 0].long()
        for s in seqs:
            s.num_cached += 1
        self.pending = PendingStep(seqs, host_out, event, tokens, slot)

    def can_continue(self, sched) -> bool:
        p = self.pending
        if p is None or sched.waiting or sched.resumed or len(p.seqs) != len(sched.running):
            return False
        bs = self.engine.block_tokens
        limit = self.engine.runner.max_positions
        new_blocks = 0
        for s in p.seqs:
            if s.finish_reason is not None or (limit and len(s.tokens) + 2 >= limit):
                return False
            if s.num_cached >= len(s.blocks) * bs:
                new_blocks += 1
        return new_blocks <= sched.alloc.num_free

    def advance(self, sched) -> list:
        """Launch the next step if the batch cannot change, then read the pending one.
        Returns the sequences that got a token from the read step."""
        p = self.pending
        if self.can_continue(sched):
            sched._reserve_decode_slots()  # fits without preemption (checked above)
            self.launch(p.seqs, ids=p.tokens)
        else:
            self.pending = None
        return self.read(p)

    def read(self, p: PendingStep) -> list:
        if p.event is not None:
            p.event.synchronize()
        got = []
        for s, (tok, lp) in zip(p.seqs, p.host_out.tolist()):
            if s.finish_reason is not None:  # finished at the step before: speculative token
                continue
            s.tokens.append(int(tok))
            s.logprobs.append(lp)
            got.append(s)
        return got
