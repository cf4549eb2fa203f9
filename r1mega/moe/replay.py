"""Routing replay ("R3"): route the training forward of rollout tokens as the rollout routed them.

The rollout and the training forward compute the same router logits only up to numerics (other
batch shapes, kernels, the KV cache); where two experts' scores are close, top-k flips, and the
token then goes through different experts in the two passes. The log-prob the trainer computes
is then not the one the sample was drawn from. Routing replay records, during the rollout, the
top-k experts every MoE layer chose for every token it put through the model, and makes the
training (and log-prob) forward of the same tokens use those experts. Only the *choice* is
replayed: the weights are recomputed from the current router logits gathered at the recorded
experts, so the router still gets its gradient.

Two per-forward objects, set on the MoE layers by :func:`routing_context` (never carried in the
hidden states):

- :class:`RoutingCapture` collects each MoE layer's chosen indices (T, k);
- :class:`RoutingReplay` hands each MoE layer forced indices (T, k), -1 = route freely.

MoE layers are numbered over the whole model (``MoELayer.moe_index``, from megatron's global
layer number), so a pipeline stage reads its own layers' rows of an (L_moe, T, k) tensor.

In the packed training samples the routes travel as the per-token field ``moe_routes``
(T, L_moe * k) holding *expert id + 1*: zero means "not recorded, route freely", so the padding
that packing adds (zeros) needs no special case, and neither does a completion's last token,
which was sampled but never fed through the model.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

ROUTES_FIELD = "moe_routes"


class RoutingReplay:
    """Forced expert indices for one forward: (L_moe, T, k) int64, -1 where a token routes freely."""

    def __init__(self, indices: torch.Tensor):
        if indices.dim() != 3:
            raise ValueError(f"RoutingReplay: indices must be (moe_layers, tokens, topk), got {tuple(indices.shape)}")
        self.indices = indices.long()

    def forced(self, moe_index: int, num_tokens: int, topk: int) -> torch.Tensor:
        """(T, k) forced indices of MoE layer ``moe_index`` (-1 rows: free)."""
        L, T, k = self.indices.shape
        if not 0 <= moe_index < L or T != num_tokens or k != topk:
            raise ValueError(
                f"routing replay: MoE layer {moe_index} sees {num_tokens} tokens with top-{topk}, but the "
                f"recorded routes are {L} layers x {T} tokens x top-{k}; the routes must come from the same "
                f"model (model.num_experts / moe_router_topk) and the same tokens "
                f"(field '{ROUTES_FIELD}' packed with its sample)")
        return self.indices[moe_index]

    @classmethod
    def from_field(cls, routes: torch.Tensor, seq: int, batch: int, topk: int,
                   sp_rank: int = 0, sp_size: int = 1) -> "RoutingReplay":
        """The ``moe_routes`` field of a packed micro-batch, (T, L*k) in packed order (sequences end
        to end, T = batch * seq), -> the replay of the forward that sees it in megatron's (S, B)
        layout (token t = s * B + b), on sequence-parallel rank ``sp_rank`` of ``sp_size`` (which
        holds S / sp_size consecutive positions of every sequence)."""
        T, width = routes.shape
        if width % topk or T != seq * batch or seq % sp_size:
            raise ValueError(f"routing replay: field '{ROUTES_FIELD}' of shape {tuple(routes.shape)} does not "
                             f"fit a forward of {batch} x {seq} tokens with top-{topk} over {sp_size} "
                             f"sequence-parallel ranks")
        L = width // topk
        idx = routes.long().view(batch, seq, L, topk).transpose(0, 1)           # (S, B, L, k)
        local = seq // sp_size
        idx = idx[sp_rank * local:(sp_rank + 1) * local]                          # (S/sp, B, L, k)
        idx = idx.reshape(local * batch, L, topk).permute(1, 0, 2) - 1            # (L, T_local, k)
        return cls(idx.contiguous())


class RoutingCapture:
    """Collects the indices each MoE layer chose in one forward."""

    def __init__(self):
        self.by_layer: dict[int, torch.Tensor] = {}

    def record(self, moe_index: int, indices: torch.Tensor) -> None:
        if moe_index in self.by_layer:
            raise RuntimeError(f"routing capture: MoE layer {moe_index} ran twice in one forward")
        self.by_layer[moe_index] = indices.detach()

    def take(self) -> Optional[torch.Tensor]:
        """(L_moe_here, T, k) in MoE-layer order, or None when no MoE layer ran; clears."""
        if not self.by_layer:
            return None
        out = torch.stack([self.by_layer[i] for i in sorted(self.by_layer)])
        self.by_layer = {}
        return out


def moe_layers_of(chunks) -> list:
    from r1mega.moe.balancing import moe_layers

    return moe_layers(chunks if isinstance(chunks, (list, tuple)) else [chunks])


@contextlib.contextmanager
def routing_context(chunks, *, replay=..., capture=...):
    """Set ``replay`` (a RoutingReplay or None) and/or ``capture`` (a RoutingCapture or None) on
    every MoE layer of ``chunks`` for the forwards inside the block, restored afterwards (also on
    error); a side not passed is left as it is, so a capture around a replaying step sees it."""
    layers = moe_layers_of(chunks)
    saved = [(m.routing_replay, m.routing_capture) for m in layers]
    for m in layers:
        if replay is not ...:
            m.routing_replay = replay
        if capture is not ...:
            m.routing_capture = capture
    try:
        yield
    finally:
        for m, (r, c) in zip(layers, saved):
            m.routing_replay, m.routing_capture = r, c


def routes_field(routes: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A completion's recorded routes (L_moe, n, k), n <= num_tokens, -> the ``moe_routes``
    field (num_tokens, L_moe * k) int32 holding expert id + 1; rows past n are 0 (route freely)."""
    L, n, k = routes.shape
    if n > num_tokens:
        raise ValueError(f"routes_field: {n} recorded tokens but the sample has only {num_tokens}")
    out = torch.zeros(num_tokens, L * k, dtype=torch.int32)
    out[:n] = routes.permute(1, 0, 2).reshape(n, L * k).to(torch.int32) + 1
    return out


def micro_batch_replay(model, routes: Optional[torch.Tensor], seq: int, batch: int,
                       sp_rank: int = 0, sp_size: int = 1):
    """The context of one training forward of a packed micro-batch: its ``moe_routes`` field
    (or None) replayed on ``model``'s MoE layers; a no-op without routes or MoE layers."""
    layers = moe_layers_of(model) if routes is not None else []
    if not layers:
        return contextlib.nullcontext()
    replay = RoutingReplay.from_field(routes, seq, batch, layers[0].settings.topk, sp_rank, sp_size)
    return routing_context(model, replay=replay)
