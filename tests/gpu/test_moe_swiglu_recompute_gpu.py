"""The grouped (torch._grouped_mm) experts with SwiGLU recomputed in backward by the fused
kernels: output and gradients as close to a float32 reference as the plain bf16 autograd
formulation's, and (H + 2F) saved values per row, not (H + 4F)."""
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
    # The independent reference: the plain formulation in float32 from the same bf16 values.
    x32, gu32, d32 = (t.detach().float().requires_grad_() for t in (x, gate_up, down))
    bounds = offsets.tolist()
    pieces = []
    for e in range(E):
        g, u = F.linear(x32[bounds[e]:bounds[e + 1]], gu32[e]).chunk(2, dim=-1)
        pieces.append(F.linear(F.silu(g) * u, d32[e]))
    o_ref = torch.cat(pieces)
    g_ref = torch.autograd.grad(o_ref, (x32, gu32, d32), grad.float())

    def err(a, ref):
        return (a.float() - ref).abs().max().item() / ref.abs().max().item()

    for got, plain, ref in [(o1, o0, o_ref)] + list(zip(g1, g0, g_ref)):
        assert torch.isfinite(got).all()
        # one rounding where eager rounds twice: never worse than bf16 autograd by much
        assert err(got, ref) <= 1.25 * err(plain, ref) + 2e-3, (err(got, ref), err(plain, ref))
    assert s0 == rows * 2 * (H + 4 * Fh) and s1 == rows * 2 * (H + 2 * Fh), (s0, s1)


def test_moe_swiglu_kernels_match_float64():
    """The expert SwiGLU's fused forward and backward (r1mega/ops/triton_swiglu.py) against
    float64 autograd, on the (rows, 2F) shapes the experts give it."""
    from r1mega.moe.experts import _RecomputedSwiGLU

    torch.manual_seed(1)
    h = (torch.randn(4099, 2 * 768, device="cuda") * 3).bfloat16().requires_grad_()
    dy = torch.randn(4099, 768, device="cuda").bfloat16()
    out = _RecomputedSwiGLU.apply(h)
    (dh,) = torch.autograd.grad(out, h, dy)
    h64 = h.detach().double().requires_grad_()
    g, u = h64.chunk(2, dim=-1)
    ref = F.silu(g) * u
    (dh_ref,) = torch.autograd.grad(ref, h64, dy.double())
    # one bf16 rounding of the float32 result: within half a bf16 ulp plus float32 noise
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(dh.double(), dh_ref, rtol=2 ** -8, atol=1e-6)
