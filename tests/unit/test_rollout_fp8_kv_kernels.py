"""The FP8 KV cache's Triton kernels (the fused RoPE + cache write, both paged decode kernels) run
by Triton's CPU interpreter against the PyTorch references, the e4m3 rounding at every edge of its
grid, and the paged decode kernel's process-wide choice. tests/gpu runs the same kernels compiled."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from r1mega.rollout.attention import attend_decode_f8_dots, attend_decode_gather
from r1mega.rollout.kv_cache import FP8_DTYPE, dequantize_rows, quantize_rows

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def e4m3_edge_values() -> torch.Tensor:
    """Every positive e4m3 value, every midpoint between neighbours (ties: round to even) and the
    float32 neighbours of each midpoint, subnormals included, both signs; float32 (N,)."""
    sub = [i * 2.0 ** -9 for i in range(8)]
    normal = [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)]
    grid = torch.tensor(sorted(set(sub + normal)), dtype=torch.float64)
    grid = grid[grid <= 448]
    mid = ((grid[:-1] + grid[1:]) / 2).float()
    vals = torch.cat([grid.float(), mid, torch.nextafter(mid, torch.zeros_like(mid)),
                      torch.nextafter(mid, torch.full_like(mid, 1e9))])
    return torch.cat([vals, -vals])


def _lower_float_minus_as_zero_minus_x():
    """Triton releases before triton-lang/triton#10270 (the H200's among them) compile float -x
    as 0 - x, so -(+0) is +0; the installed interpreter negates. Patched here so the interpreted
    kernels run under the old lowering too: a stored byte must not depend on it."""
    from triton.language.semantic import TritonSemantic

    def minus(self, x):
        zero = self.make_tensor(self.builder.get_null_value(x.type.scalar.to_ir(self.builder)), x.type.scalar)
        return self.sub(zero, x, True)

    TritonSemantic.minus = minus


def _interpreted_kernels(rank, world):
    """Runs in a process with TRITON_INTERPRET=1: the fused write and the decode kernel on FP8
    caches against the references."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.rollout import triton_rope_kv as R
    from r1mega.rollout.triton_paged import paged_decode_attention
    from tests.unit.test_rollout_rope_kv_triton import SHAPES, make_inputs

    def fp8_state(kc, vc):
        k8, ks = quantize_rows(kc)
        v8, vs = quantize_rows(vc)
        return [k8, v8, ks, vs]

    def as_bits(ts):
        return [t.view(torch.uint8) if t.dtype == FP8_DTYPE else t for t in ts]

    writes = []
    for i, shape in enumerate(SHAPES):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            qkv, cos, sin, slots, kc, vc = make_inputs(*shape, dtype, seed=i)
            ref, got = fp8_state(kc, vc), fp8_state(kc, vc)
            q_ref = R.rope_kv_write_reference(qkv, cos, sin, slots, *ref)
            q_got = torch.full_like(q_ref, float("nan"))
            R.rope_kv_write_triton(qkv, cos, sin, slots, got[0], got[1], out=q_got, k_scale=got[2],
                                   v_scale=got[3])
            writes.append(((shape, str(dtype)), (q_ref, *as_bits(ref)), (q_got, *as_bits(got))))
    # The rounding at every e4m3 edge: rows whose amax is 448 have scale 1 exactly, and cos = 1,
    # sin = 0 leave k as it is, so the stored bytes are the rounding of the values themselves.
    vals = e4m3_edge_values()
    d = 64
    rows = -(-vals.numel() // (d - 1))
    body = torch.cat([vals, torch.zeros(rows * (d - 1) - vals.numel())]).view(rows, d - 1)
    kv = torch.cat([torch.full((rows, 1), 448.0), body], dim=1)  # (rows, D)
    qkv = torch.cat([torch.randn(rows, d), kv, kv.flip(1)], dim=1).view(rows, 1, 1, 3 * d)
    cos, sin = torch.ones(rows, 1, 1, d), torch.zeros(rows, 1, 1, d)
    cache = torch.zeros(rows, 1, 1, d)
    slots = torch.arange(rows)
    edges = []
    for lowering in ("fneg", "0 - x"):  # Triton's two lowerings of float -x (signed zeros)
        if lowering == "0 - x":
            _lower_float_minus_as_zero_minus_x()
        ref, got = fp8_state(cache, cache), fp8_state(cache, cache)
        R.rope_kv_write_reference(qkv, cos, sin, slots, *ref)
        R.rope_kv_write_triton(qkv, cos, sin, slots, got[0], got[1], k_scale=got[2], v_scale=got[3])
        edges.append((lowering, as_bits(ref), as_bits(got)))
    # Decode attention: fp32 runs the IEEE dots, fp16 the low-precision ones; f16_dots (q scaled
    # into fp16 by a power of two: large, plain and tiny q) for fp16 and bf16 q. The interpreter's
    # bf16 dot is wrong, so bf16 dots (the bf16 cache's too) are left to tests/gpu.
    g = torch.Generator().manual_seed(9)
    nb, bs, hkv, hd, group = 12, 4, 2, 32, 3
    k8, ks = quantize_rows(torch.randn(nb, bs, hkv, hd, generator=g) * 3)
    v8, vs = quantize_rows(torch.randn(nb, bs, hkv, hd, generator=g))
    bt = torch.tensor([[3, 1, 7], [2, 0, 0], [4, 5, 6]], dtype=torch.int32)
    ctx = torch.tensor([10, 1, 12], dtype=torch.int32)
    decodes = []
    v8s, vss = quantize_rows(torch.randn(nb, bs, hkv, hd, generator=g) * 1e-4)
    kf, vf = torch.randn(nb, bs, hkv, hd, generator=g), torch.randn(nb, bs, hkv, hd, generator=g)
    for keys in (False, True):  # both kernels (the keys-major one: transposed dots)
        for dtype, q_mult, f16 in ((torch.float32, 1.0, False), (torch.float16, 1.0, False),
                                   (torch.float16, 1.0, True), (torch.bfloat16, 1.0, True),
                                   (torch.bfloat16, 3e3, True), (torch.bfloat16, 1e-6, True),
                                   (torch.float16, 1e-3, True)):
            q = (torch.randn(3, hkv * group, hd, generator=g) * q_mult).to(dtype)
            scale = 0.2 / q_mult  # logits of the same spread whatever q's size
            out = paged_decode_attention(q, k8, v8, bt, ctx, scale, k_scale=ks, v_scale=vs,
                                         f16_dots=f16, keys_major=keys)
            ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                                       dequantize_rows(v8, vs, torch.float64), bt, ctx, scale)
            decodes.append((f"{dtype} q x {q_mult:g}, f16_dots={f16}, keys={keys}", out.double(), ref))
        # fp16 with small values (|v| ~ 1e-4, scales ~ 2e-7): the scales enter the value dot
        # relative to the tile's largest, so nothing underflows fp16's 6e-5 normal range.
        q = torch.randn(3, hkv * group, hd, generator=g).half()
        out = paged_decode_attention(q, k8, v8s, bt, ctx, 0.2, k_scale=ks, v_scale=vss, keys_major=keys)
        ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                                   dequantize_rows(v8s, vss, torch.float64), bt, ctx, 0.2)
        decodes.append((f"small-v float16, keys={keys}", out.double() * 1e4, ref * 1e4))
        # an unquantised float32 cache (the IEEE dots), keys per tile from 16 to 64
        q = torch.randn(3, hkv * group, hd, generator=g)
        for block_n in (16, 64):
            out = paged_decode_attention(q, kf, vf, bt, ctx, 0.2, block_n=block_n, keys_major=keys)
            ref = attend_decode_gather(q.double(), kf.double(), vf.double(), bt, ctx, 0.2)
            decodes.append((f"torch.float32 cache, block_n={block_n}, keys={keys}", out.double(), ref))
        # FP8 x FP8 dots (f8_dots: q and the probabilities rounded to e4m3 in the kernel) against
        # their float64 emulation, over several tiles of keys (16-token blocks, contexts to 47)
        k8l, ksl = quantize_rows(torch.randn(nb, 16, hkv, hd, generator=g) * 3)
        v8l, vsl = quantize_rows(torch.randn(nb, 16, hkv, hd, generator=g))
        ctx_l = torch.tensor([40, 1, 47], dtype=torch.int32)
        for dtype, q_mult in ((torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.bfloat16, 3e3),
                              (torch.bfloat16, 1e-6), (torch.float16, 1e-3)):
            q = (torch.randn(3, hkv * group, hd, generator=g) * q_mult).to(dtype)
            for block_n in (32, 64):
                out = paged_decode_attention(q, k8l, v8l, bt, ctx_l, 0.2 / q_mult, k_scale=ksl,
                                             v_scale=vsl, f8_dots=True, keys_major=keys,
                                             block_n=block_n)
                ref = attend_decode_f8_dots(q, k8l, v8l, bt, ctx_l, 0.2 / q_mult, ksl, vsl, block_n)
                decodes.append((f"{dtype} q x {q_mult:g}, f8_dots, block_n={block_n}, keys={keys}",
                                out.double(), ref))
    # the heads-inner grid (R1MEGA_PAGED_GRID=heads): each program computes what it did on the
    # sequences-inner grid, bit for bit, for both kernels, an FP8 and a float32 cache
    grids = []
    for keys in (False, True):
        for cache in ((k8, v8, ks, vs), (kf, vf, None, None)):
            q = torch.randn(3, hkv * group, hd, generator=g)
            q = q.half() if cache[2] is not None else q
            outs = [paged_decode_attention(q, cache[0], cache[1], bt, ctx, 0.2, k_scale=cache[2],
                                           v_scale=cache[3], keys_major=keys, heads_inner=inner)
                    for inner in (False, True)]
            grids.append((f"keys={keys}, fp8={cache[2] is not None}", *outs))
    return writes, edges, decodes, grids


def test_paged_decode_kernel_choice_is_validated(monkeypatch):
    """R1MEGA_PAGED_DECODE picks the paged decode kernel for the whole process; a wrong value is
    an error naming the variable and what it takes, not a silent default."""
    from r1mega.rollout import triton_paged

    for spec, keys in (("rows", False), ("keys", True)):
        monkeypatch.setenv("R1MEGA_PAGED_DECODE", spec)
        assert triton_paged._kernel_from_env() is keys
    monkeypatch.delenv("R1MEGA_PAGED_DECODE")
    assert triton_paged._kernel_from_env() is False
    monkeypatch.setenv("R1MEGA_PAGED_DECODE", "key")
    with pytest.raises(ValueError, match="R1MEGA_PAGED_DECODE='key'.*'rows'.*'keys'"):
        triton_paged._kernel_from_env()


@pytest.mark.slow
@needs_triton
def test_fp8_kernels_match_references_under_interpreter(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    (result,) = run_ranks(_interpreted_kernels, 1, timeout_s=300)
    writes, edges, decodes, grids = result
    for case, seqs_inner, heads_inner in grids:
        assert torch.equal(seqs_inner, heads_inner) and not seqs_inner.isnan().any(), case
    for case, ref, got in writes:
        # Bit for bit: the rotated q, both e4m3 caches, both scale tensors.
        for name, r, g in zip(("q", "k_cache", "v_cache", "k_scale", "v_scale"), ref, got):
            assert torch.equal(r, g), f"{case}: {name} differs"
    for lowering, edge_ref, edge_got in edges:
        for name, r, g in zip(("k_cache", "v_cache", "k_scale", "v_scale"), edge_ref, edge_got):
            assert torch.equal(r, g), f"e4m3 edges, -x as {lowering}: {name} differs in {(r != g).sum()} places"
    for dtype, out, ref in decodes:
        # 16-bit: the dots' operands (v weighted, q rounded to fp16) and the output's rounding
        tol = (2e-6 if dtype.startswith("torch.float32") else 2e-2 if dtype.startswith("torch.bfloat16")
               else 5e-3)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=dtype)


def test_e4m3_edge_values_round_as_the_grid_says():
    """The reference's cast (torch's) on the same edge values: ties to even, neighbours of a tie to
    the nearer side: the edge table is a real check of the rounding, not just of agreement."""
    vals = e4m3_edge_values()
    got = vals.to(FP8_DTYPE).double()
    grid = torch.unique(got.abs())
    for x, y in zip(vals.double().tolist(), got.tolist()):
        below = grid[grid <= abs(x)].max()
        above = grid[grid >= abs(x)].min()
        if abs(x) - below < above - abs(x):
            want = below
        elif abs(x) - below > above - abs(x):
            want = above
        else:  # a tie: the even mantissa (e4m3 bytes: the lower bit of the code)
            codes = torch.tensor([below, above]).to(FP8_DTYPE).view(torch.uint8)
            want = below if int(codes[0]) % 2 == 0 else above
        assert abs(y) == want and (y == 0 or (y > 0) == (x > 0)), (x, y, want)
