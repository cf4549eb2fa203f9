"""The expert MLPs keep only (H + 2F) values per routed row for backward (swiglu_into): same
gradients as plain autograd, and neither silu(gate) nor the SwiGLU output is saved."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1mega.moe.experts import SwiGLUMLP, loop_swiglu_experts


def _plain(x, gate_up, down, offsets):
    """The experts as plain autograd ops (the pre-recompute formulation)."""
    bounds = offsets.tolist()
    out = []
    for e in range(gate_up.shape[0]):
        gate, up = F.linear(x[bounds[e]:bounds[e + 1]], gate_up[e]).chunk(2, dim=-1)
        out.append(F.linear(F.silu(gate) * up, down[e]))
    return torch.cat(out, dim=0)


def _saved_bytes(fn, *args) -> int:
    params = {a.untyped_storage().data_ptr() for a in args[1:3]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


def test_loop_experts_gradients_equal_plain_autograd_and_save_less():
    torch.manual_seed(0)
    E, H, Fh, rows = 3, 16, 24, 40
    x = torch.randn(rows, H, dtype=torch.bfloat16, requires_grad=True)
    gate_up = torch.randn(E, 2 * Fh, H, dtype=torch.bfloat16, requires_grad=True)
    down = torch.randn(E, H, Fh, dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor([0, 10, 10, 40], dtype=torch.int32)  # expert 1 gets no rows
    grad = torch.randn(rows, H, dtype=torch.bfloat16)
    results = []
    for fn in (_plain, loop_swiglu_experts):
        out, saved = _saved_bytes(fn, x, gate_up, down, offsets)
        gx, gw1, gw2 = torch.autograd.grad(out, (x, gate_up, down), grad)
        results.append((out, gx, gw1, gw2, saved))
    (o0, *g0, s0), (o1, *g1, s1) = results
    assert torch.equal(o0, o1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    # Plain: x + h (2F) + silu (F) + act (F) per row; recomputed: x + h.
    per_row_plain, per_row_lean = 2 * (H + 4 * Fh), 2 * (H + 2 * Fh)
    assert s0 == rows * per_row_plain and s1 == rows * per_row_lean, (s0, s1)


def test_shared_expert_gradients_unchanged():
    torch.manual_seed(1)
    mlp = SwiGLUMLP(16, 32, dtype=torch.float32)
    x = torch.randn(7, 16, requires_grad=True)
    out = mlp(x)
    ref = F.linear(F.silu(F.linear(x, mlp.gate_up)[:, :32]) * F.linear(x, mlp.gate_up)[:, 32:], mlp.down)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, mlp.gate_up, mlp.down), g)
    want = torch.autograd.grad(ref, (x, mlp.gate_up, mlp.down), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
