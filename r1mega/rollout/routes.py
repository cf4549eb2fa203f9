"""Routing replay, the rollout's side: record the experts each MoE layer chose for every token the
engine feeds through the model, and hand them to each sequence (r1mega/moe/replay.py has the
training side).

Rows of one step's forward, and whose token each is:
  prefill: every planned prompt (each sample of a prompt gets its prompt's routes), then the
           resumed sequences' ``tokens[:-1]`` (recomputed after preemption);
  decode:  row i is sequence i's last token, ``tokens[-1]``.
So a running sequence holds routes for exactly ``tokens[:-1]``, the tokens in its KV cache; the
last sampled token of a completion is never fed and has none.

A resumed sequence's recompute *replays* its recorded routes instead of routing afresh: its cache
is rebuilt as it was first routed, and the routes it hands on stay the ones its tokens were
sampled under.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.moe.replay import RoutingCapture, RoutingReplay, routing_context


class RouteRecorder:
    def __init__(self, model, device):
        self.model, self.device = model, device

    def forward(self, fn, *args, replay: Optional[torch.Tensor] = None, **kw):
        """``fn(*args, **kw)`` (the runner's forward) with the MoE layers recording, and forcing
        ``replay`` (L_moe, T, k) where given (-1: free). -> (its result, routes (L_moe, T, k)
        int32 on the host)."""
        capture = RoutingCapture()
        forced = None if replay is None else RoutingReplay(replay.to(self.device))
        with routing_context(self.model, replay=forced, capture=capture):
            out = fn(*args, **kw)
        return out, capture.take().to("cpu", torch.int32)

    @staticmethod
    def prefill_replay(plan) -> Optional[torch.Tensor]:
        """(L_moe, T, k) forced routes of a prefill step: free (-1) for new prompts, the recorded
        ones for resumed sequences; None when nothing was resumed."""
        if not plan.resumed:
            return None
        fresh = sum(len(g.prompt) for g in plan.groups)
        first = plan.resumed[0].routes[0]
        free = torch.full((first.shape[0], fresh, first.shape[2]), -1, dtype=torch.int32)
        return torch.cat([free] + [c for s in plan.resumed for c in s.routes], dim=1)

    @staticmethod
    def after_prefill(plan, routes: torch.Tensor) -> None:
        start = 0
        for g in plan.groups:  # every sample of a prompt shares its prompt's routes
            for seq in g.samples:
                seq.routes = [routes[:, start:start + len(g.prompt)]]
            start += len(g.prompt)
        # Resumed rows were replayed: their sequences hold those routes already.

    @staticmethod
    def after_decode(seqs, routes: torch.Tensor) -> None:
        for i, s in enumerate(seqs):  # row i fed s.tokens[-1]
            s.routes.append(routes[:, i:i + 1])

    @staticmethod
    def of(seq) -> torch.Tensor:
        """(L_moe, len(tokens) - 1, k): the routes of every token a finished sequence fed."""
        return torch.cat(seq.routes, dim=1)
