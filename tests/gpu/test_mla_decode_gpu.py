"""The Triton MLA decode kernel (r1mega/rollout/triton_mla.py) against the gather reference, and
inside a CUDA graph (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("heads", [16, 20, 128])
def test_kernel_matches_gather_reference(heads):
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.triton_mla import kernel_supports, mla_paged_decode

    if not kernel_supports(512, 64):
        pytest.skip("Triton not installed")
    g = torch.Generator(device="cuda").manual_seed(heads)
    r, d_r, bs, blocks = 512, 64, 16, 160
    cache = torch.randn(blocks, bs, 1, r + d_r, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.tensor([1, 16, 17, 300, 95, 2], dtype=torch.int32, device="cuda")
    tables = torch.stack([torch.randperm(blocks, device="cuda", generator=g)[:20]
                          for _ in range(ctx.numel())]).int()
    q = torch.randn(ctx.numel(), heads, r + d_r, device="cuda", generator=g, dtype=torch.bfloat16)
    scale = (128 + 64) ** -0.5
    got = mla_paged_decode(q, cache, tables, ctx, scale, r)
    ref = attend_decode_gather(q.float(), cache.float(), cache.float(), tables, ctx, scale)[..., :r]
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)

    # captured in a CUDA graph, replayed after the context grew: the loop bound is read on device
    static_ctx = ctx.clone()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        mla_paged_decode(q, cache, tables, static_ctx, scale, r)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_paged_decode(q, cache, tables, static_ctx, scale, r)
    static_ctx.add_(3)
    graph.replay()
    ref2 = attend_decode_gather(q.float(), cache.float(), cache.float(), tables, static_ctx, scale)[..., :r]
    torch.testing.assert_close(out.float(), ref2, atol=2e-2, rtol=2e-2)
