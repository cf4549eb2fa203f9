"""Overlapped decode steps: the host reads step k while the device already runs step k+1.

A graph-replayed decode step leaves the host idle while the GPU works, and the GPU idle while the
host records tokens, checks stops and builds the next inputs. Step k+1's inputs do not need the
host to know step k's tokens: the token column is copied on the device from step k's output, and
every other column (position, length, RNG step, block table) is known in advance. So step k+1 is
launched *before* step k is read.

Which sequences step k+1 runs is decided from what the host knows when it launches, i.e. after
reading step k-1:

- a sequence that finished at step k-1 is left out; its row of step k was speculative (it ran
  before the host knew) and is dropped when step k is read. The survivors take their tokens
  from their own rows of step k's output, gathered on the device (the gather index travels in
  the packed host buffer: no host read, no extra copy);
- a sequence that step k's token ends by length (``max_new_tokens``, the model's maximum) is
  left out too: its next token would be dropped whatever step k samples;
- a speculative row's K/V goes to the sequence's own block (its slot was reserved before the
  launch), which the scheduler frees when the finish is read; a later owner of that block
  writes each slot in a later step, so in stream order after the stale write, before reading it.

The batch otherwise keeps its order and its sequences their RNG keys and step indices, so every
token and log-prob is the synchronous engine's. The pipeline drains (step k is read, and the
engine goes back to synchronous scheduling) only when the batch must change in another way:

- a prompt or a preempted sequence waits for prefill and now has the seats and blocks to
  start (a prefill is a synchronous step; one that cannot start yet does not stop the others);
- the next tokens' blocks do not fit without preempting anybody;
- a sequence is within two tokens of the model's maximum length.

Switched by ``rollout.overlap_steps`` (or ``RolloutEngine(..., overlap_steps=...)``); GPU with
CUDA graphs only. tests/gpu checks that it changes no token (tests/unit runs the same code on CPU);
`r1mega bench rollout --overlap-too` times it against synchronous steps.
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
    tokens: torch.Tensor  # (n,) the sampled tokens on the device, read by the next launch
    slot: int


class OverlappedDecoder:
    def __init__(self, engine):
        self.engine = engine
        self.pending: Optional[PendingStep] = None
        self._slot = 0
        # One event per host buffer slot, re-recorded: a slot's step is read (its event waited
        # on) before the slot is filled again.
        self._events: list = [None, None]
        self.drains = 0  # times the batch had to change under a running step (stats)

    def launch(self, seqs: list, prev: Optional[PendingStep] = None, rows: Optional[list] = None) -> None:
        """Start a decode step. ``prev`` None: the input tokens come from the host; else from
        ``prev``'s device output, row ``rows[i]`` for ``seqs[i]`` (``rows`` None: row i)."""
        eng = self.engine
        slot = self._slot
        self._slot ^= 1
        width = eng._fill_host(seqs, slot, with_ids=prev is None, src_rows=rows)
        g = eng.graphs
        n = len(seqs)
        out = g.run(n, BT + width, slot=slot, prev_tokens=None if prev is None else prev.tokens,
                    gather=rows is not None)
        host_out = g.host_out_slots[slot][:n]
        host_out.copy_(out, non_blocking=True)
        event = None
        if out.is_cuda:
            event = self._events[slot] = self._events[slot] or torch.cuda.Event()
            event.record()
        for s in seqs:
            s.num_cached += 1
        # A view, not a copy: the next launch gathers from it before its replay, in stream
        # order, so the graph's output buffer is still this step's then.
        self.pending = PendingStep(seqs, host_out, event, out[:, 0], slot)

    def continuing_rows(self, sched) -> Optional[list]:
        """Rows of the pending step whose sequences run the next step (see the module doc), or
        None when the pipeline must drain."""
        p = self.pending
        if p is None or sched.prefill_ready():
            return None
        limit = self.engine.runner.max_positions
        rows: list = []
        alive = new_blocks = 0
        for i, s in enumerate(p.seqs):
            if s.finish_reason is not None:
                continue
            alive += 1
            # len(tokens) counts what the host has read; the pending step adds one token.
            n_tokens = len(s.tokens)
            if s.num_generated + 1 >= s.params.max_new_tokens or (limit and n_tokens + 1 >= limit):
                continue
            if limit and n_tokens + 2 >= limit:
                return None
            if sched.needs_block(s):
                new_blocks += 1
            rows.append(i)
        # Every running sequence is in the pending step unless the batch changed (a bug guard:
        # admissions and preemptions happen only in synchronous steps).
        if alive != len(sched.running) or new_blocks > sched.alloc.num_free:
            return None
        return rows

    def advance(self, sched) -> tuple[list, bool]:
        """Launch the next step unless the pipeline must drain, then read the pending one.
        Returns (the sequences that got a token from the read step, whether a step launched)."""
        p = self.pending
        rows = self.continuing_rows(sched)
        self.pending = None
        if rows is None:
            self.drains += 1
        elif rows:
            seqs = [p.seqs[i] for i in rows]
            sched.grow(seqs)  # fits without preemption (checked above)
            self.launch(seqs, prev=p, rows=None if len(rows) == len(p.seqs) else rows)
        return self.read(p), bool(rows)

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
