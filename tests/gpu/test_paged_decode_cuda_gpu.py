"""The FP8 paged decode attention kernels in CUDA (CUDA cores: csrc/paged_decode_kernel.cu; tensor
cores: csrc/paged_decode_mma.cuh; r1mega/rollout/cuda_paged.py), each against float64 attention
over the dequantised cache, the e4m3 error model against the unquantised
one, Triton's FP8 kernel, the decode op's routing under R1MEGA_PAGED_FP8=cuda|mma, and CUDA graphs.
Skipped without CUDA or without the extension."""
import math

import pytest
import torch

from tests.unit.test_rollout_fp8_error import DECODE_SHAPES, RMS_BAND, error_against_model, paged_decode_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (Hq, Hkv, D, block tokens): the CPU error test's shapes, SmolLM2's (groups of 3, D 64) and a
# group of 8 at D 256
SHAPES = DECODE_SHAPES + [(9, 3, 64, 16), (32, 4, 256, 16)]
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
KERNELS = pytest.mark.parametrize("tc", [False, True], ids=["cuda-cores", "tensor-cores"])


def _ext():
    from r1mega.rollout import cuda_paged

    if cuda_paged.get() is None:
        pytest.skip(f"r1mega_attn_cuda unavailable: {cuda_paged.load_error()}")
    return cuda_paged


def _case(shape, dtype, strided=False, **kw):
    from r1mega.rollout.kv_cache import quantize_rows

    q, k, v, bt, ctx = paged_decode_case(*shape, device="cuda", **kw)
    q = q.to(dtype)
    if strided:  # a slice of a wider rows-by-heads buffer, as the rotated q|k of the decode step
        wide = torch.zeros(q.shape[0], q.shape[1] + 3, q.shape[2], dtype=dtype, device="cuda")
        wide[:, 1:1 + q.shape[1]] = q
        q = wide[:, 1:1 + q.shape[1]]
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    return q, k, v, k8, ks, v8, vs, bt, ctx


@KERNELS
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-q"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
def test_cuda_fp8_decode_against_float64_and_the_e4m3_error_model(shape, dtype, strided, tc):
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.fp8_error import decode_error_model
    from r1mega.rollout.kv_cache import dequantize_rows
    from r1mega.rollout.triton_paged import paged_decode_attention

    cp = _ext()
    q, k, v, k8, ks, v8, vs, bt, ctx = _case(shape, dtype, strided)
    scale = 1 / math.sqrt(shape[2])
    assert cp.why_not(q, k8, ks) is None
    out = torch.full_like(q, float("nan"))
    cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, scale, ks, vs, out=out, tensor_cores=tc)
    ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                               dequantize_rows(v8, vs, torch.float64), bt, ctx, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    exact, sigma = decode_error_model(q, k, v, bt, ctx, scale)
    worst, rms = error_against_model(out, exact, sigma, kernel_tol=tol)
    assert worst <= 1 and RMS_BAND[0] <= rms <= RMS_BAND[1], (worst, rms)
    if shape[2] & (shape[2] - 1) == 0:  # Triton's kernel: the same values, another summation order
        tri = paged_decode_attention(q, k8, v8, bt, ctx, scale, k_scale=ks, v_scale=vs)
        torch.testing.assert_close(out.double(), tri.double(), atol=2 * tol, rtol=2 * tol)


@KERNELS
@pytest.mark.parametrize("shape", [(16, 4, 128, 16), (4, 2, 64, 32)], ids=["16-4-128-16", "4-2-64-32"])
def test_long_contexts_against_float64(shape, tc):
    """2,100 and 4,200 keys (33 and 66 chunks a warp) beside a short context."""
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import dequantize_rows

    cp = _ext()
    q, _, _, k8, ks, v8, vs, bt, ctx = _case(shape, torch.bfloat16, ctx=(2100, 4200, 33))
    scale = 1 / math.sqrt(shape[2])
    out = torch.full_like(q, float("nan"))
    cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, scale, ks, vs, out=out, tensor_cores=tc)
    ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                               dequantize_rows(v8, vs, torch.float64), bt, ctx, scale)
    torch.testing.assert_close(out.double(), ref, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


@KERNELS
def test_decode_op_routes_fp8_calls_under_the_switch_and_graphs_replay_them(monkeypatch, tc):
    cp = _ext()
    from r1mega.rollout import triton_paged

    q, _, _, k8, ks, v8, vs, bt, ctx = _case((16, 4, 128, 16), torch.bfloat16)
    direct = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, tensor_cores=tc)
    other = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, tensor_cores=not tc)
    assert not torch.equal(other, direct)  # the other kernel: f16 products vs float32 ones
    monkeypatch.setattr(cp, "IMPL", "mma" if tc else "cuda")
    via_op = torch.ops.r1mega.paged_decode_attention(q, k8, v8, bt, ctx, 0.1, ks, vs)
    assert torch.equal(via_op, direct)
    monkeypatch.setattr(cp, "IMPL", "triton")
    tri = torch.ops.r1mega.paged_decode_attention(q, k8, v8, bt, ctx, 0.1, ks, vs)
    assert not torch.equal(tri, direct)  # Triton's kernel: another summation order
    assert torch.equal(tri, triton_paged.paged_decode_attention(q, k8, v8, bt, ctx, 0.1, k_scale=ks, v_scale=vs))
    out = torch.empty_like(q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, out=out, tensor_cores=tc)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, out=out, tensor_cores=tc)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, direct)


@pytest.mark.parametrize("warps", [2, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + ["long"], ids=["-".join(map(str, s)) for s in SHAPES] + ["long"])
def test_fewer_warps_a_head_against_float64(shape, dtype, warps):
    """R1MEGA_PAGED_FP8_WARPS=2|1 (the tensor-core kernel): the same float64 bound as 4 warps."""
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import dequantize_rows

    cp = _ext()
    kw = {"ctx": (2100, 4200, 33)} if shape == "long" else {}
    shape = (16, 4, 128, 16) if shape == "long" else shape
    q, _, _, k8, ks, v8, vs, bt, ctx = _case(shape, dtype, **kw)
    scale = 1 / math.sqrt(shape[2])
    out = torch.full_like(q, float("nan"))
    cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, scale, ks, vs, out=out, tensor_cores=True,
                             warps_per_head=warps)
    ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                               dequantize_rows(v8, vs, torch.float64), bt, ctx, scale)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    four = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, scale, ks, vs, tensor_cores=True, warps_per_head=4)
    torch.testing.assert_close(out, four, atol=2 * TOL[dtype], rtol=2 * TOL[dtype])


def test_warps_a_head_refused_where_the_kernel_has_no_such_launch():
    cp = _ext()
    q, _, _, k8, ks, v8, vs, bt, ctx = _case((16, 4, 128, 16), torch.bfloat16)
    ext = cp.get()
    with pytest.raises(RuntimeError, match="must be 4, 2 or 1"):
        ext.paged_decode_fp8(q, k8, v8, ks, vs, bt, ctx, torch.empty_like(q), 0.1, True, warps_per_head=3)
    with pytest.raises(RuntimeError, match="tensor-core kernel's"):
        ext.paged_decode_fp8(q, k8, v8, ks, vs, bt, ctx, torch.empty_like(q), 0.1, False, warps_per_head=2)


def test_cuda_fp8_decode_refuses_what_it_cannot_take():
    cp = _ext()
    q, _, _, k8, ks, v8, vs, bt, ctx = _case((16, 4, 128, 16), torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        cp.paged_decode_fp8_cuda(q.float(), k8, v8, bt, ctx, 0.1, ks, vs)
    with pytest.raises(ValueError, match="multiples of 16"):
        cp.paged_decode_fp8_cuda(q, k8.reshape(-1, 8, 4, 128), v8.reshape(-1, 8, 4, 128), bt, ctx,
                                 0.1, ks.reshape(-1, 8, 4), vs.reshape(-1, 8, 4))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        cp.paged_decode_fp8_cuda(q, k8, v8, bt.short(), ctx, 0.1, ks, vs)


@KERNELS
def test_int64_block_tables_sliced_from_a_packed_buffer_give_the_int32_result(tc):
    """The CUDA-graph decode step hands the kernel its block tables as int64 columns of one packed
    per-row buffer (r1mega/rollout/cuda_graphs.py): a row stride wider than the table."""
    cp = _ext()
    q, _, _, k8, ks, v8, vs, bt, ctx = _case((16, 4, 128, 16), torch.bfloat16)
    packed = torch.full((bt.shape[0], 5 + bt.shape[1]), -7, dtype=torch.int64, device="cuda")
    packed[:, 5:] = bt
    wide = packed[:, 5:]
    assert wide.stride() == (5 + bt.shape[1], 1)
    assert torch.equal(cp.paged_decode_fp8_cuda(q, k8, v8, wide, ctx, 0.1, ks, vs, tensor_cores=tc),
                       cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, tensor_cores=tc))


@KERNELS
@pytest.mark.parametrize("shape", [(16, 4, 128, 16), (12, 2, 64, 32)], ids=["16-4-128-16", "12-2-64-32"])
def test_heads_inner_grid_gives_the_same_bits(shape, tc):
    """R1MEGA_PAGED_GRID=heads launches (Hkv, B) instead of (B, Hkv), =seq one CTA a sequence:
    each head's work is the same, so the output must be the same to the bit (and the Triton
    kernels', for a bf16 cache)."""
    from r1mega.rollout.triton_paged import paged_decode_attention

    cp = _ext()
    q, _, _, k8, ks, v8, vs, bt, ctx = _case(shape, torch.bfloat16)
    seqs = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, tensor_cores=tc, heads_inner=False)
    heads = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, tensor_cores=tc, heads_inner=True)
    assert torch.equal(seqs, heads) and not seqs.isnan().any()
    if tc:  # R1MEGA_PAGED_GRID=seq: one CTA a sequence, each head's warps and merge unchanged
        for inner in (False, True):
            one = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs, tensor_cores=True,
                                           heads_inner=inner, seq_cta=True)
            assert torch.equal(one, seqs)
    kb, vb = k8.to(torch.bfloat16), v8.to(torch.bfloat16)
    outs = [paged_decode_attention(q, kb, vb, bt, ctx, 0.1, heads_inner=inner, keys_major=tc)
            for inner in (False, True)]
    assert torch.equal(*outs)
