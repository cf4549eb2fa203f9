"""The grouped (torch._grouped_mm) experts with SwiGLU recomputed in backward: same output and
gradients as the plain autograd formulation, and (H + 2F) saved values per row, not (H + 4F)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _plain(x, gate_up, down, offsets):
    ends = offsets[1:].to(torch.int32)
    h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=ends)
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=ends)


def test_grouped_experts_recompute_matches_plain_autograd():
    from r1mega.moe.experts import grouped_mm_available, grouped_swiglu_experts

    torch.manual_seed(0)
    E, H, Fh = 8, 256, 128
    counts = torch.tensor([32, 0, 48, 16, 64, 0, 16, 80])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to("cuda", torch.int32)
    rows = int(counts.sum())
    x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if not grouped_mm_available(x):
        pytest.skip("torch._grouped_mm needs bf16 on sm_90+")
    gate_up = (torch.randn(E, 2 * Fh, H, device="cuda") * H ** -0.5).bfloat16().requires_grad_()
    down = (torch.randn(E, H, Fh, device="cuda") * Fh ** -0.5).bfloat16().requires_grad_()
    grad = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (_plain, grouped_swiglu_experts):
        params = {gate_up.untyped_storage().data_ptr(), down.untyped_storage().data_ptr()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params and t.is_floating_point():
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x, gate_up, down, offsets)
        grads = torch.autograd.grad(out, (x, gate_up, down), grad)
        results.append((out, grads, sum(seen.values())))
    (o0, g0, s0), (o1, g1, s1) = results
    assert torch.equal(o0, o1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    assert s0 == rows * 2 * (H + 4 * Fh) and s1 == rows * 2 * (H + 2 * Fh), (s0, s1)
