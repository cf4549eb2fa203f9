"""``r1mega::mla_decode_attention`` on CPU (the gather reference the Triton kernel is tested
against on GPU) equals absorbed attention computed sequence by sequence from the paged rows."""
from __future__ import annotations

import torch

from r1mega.rollout.triton_mla import kernel_supports, mla_decode_attention


def direct(q, cache, tables, ctx, scale, r):
    """Per sequence: its rows in block order, softmax over them, values = the latent part."""
    bs = cache.shape[1]
    out = []
    for b in range(q.shape[0]):
        pos = torch.arange(int(ctx[b]))
        rows = cache[tables[b, pos // bs].long(), pos % bs, 0].double()            # (L, r + d_r)
        p = (q[b].double() @ rows.T * scale).softmax(-1)                           # (H, L)
        out.append(p @ rows[:, :r])                                                # (H, r)
    return torch.stack(out)


def test_cpu_op_equals_per_sequence_absorbed_attention():
    g = torch.Generator().manual_seed(0)
    r, d_r, heads, bs, blocks = 32, 16, 5, 4, 40
    cache = torch.randn(blocks, bs, 1, r + d_r, generator=g)
    ctx = torch.tensor([1, 7, 13, 4], dtype=torch.int32)
    # scattered, non-monotone blocks per sequence; the table is wider than any sequence needs
    tables = torch.stack([torch.randperm(blocks, generator=g)[:5] for _ in range(4)]).int()
    q = torch.randn(4, heads, r + d_r, generator=g)
    got = mla_decode_attention(q, cache, tables, ctx, 0.3, r)
    assert got.shape == (4, heads, r)
    torch.testing.assert_close(got.double(), direct(q, cache, tables, ctx, 0.3, r), atol=1e-5, rtol=1e-5)


def test_kernel_widths():
    # V3's latent row (512 + 64) is what the kernel serves; odd widths fall back to the gather
    assert not kernel_supports(500, 64) and not kernel_supports(512, 8)
