"""The CUDA FP8 decode attention kernels' Python face (r1mega/rollout/cuda_paged.py) on the CPU: its
switch, the reasons it refuses operands, and that the decode op keeps its reference off CUDA. The
kernel itself is held to float64 by tests/gpu/test_paged_decode_cuda_gpu.py."""
import importlib
import math

import pytest
import torch

from r1mega.rollout import cuda_paged
from tests.unit.test_rollout_fp8_error import paged_decode_case


def _fp8_case(shape=(16, 4, 128, 16)):
    from r1mega.rollout.kv_cache import quantize_rows

    q, k, v, bt, ctx = paged_decode_case(*shape)
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    return q, k8, ks, v8, vs, bt, ctx


def test_switch_defaults_to_the_tensor_core_kernel_and_refuses_unknown_values(monkeypatch):
    assert cuda_paged.IMPL == "mma"
    monkeypatch.setenv("R1MEGA_PAGED_FP8", "cutlass")
    with pytest.raises(ValueError, match="R1MEGA_PAGED_FP8='cutlass'.*'cuda'"):
        importlib.reload(cuda_paged)
    for value in ("cuda", "triton"):
        monkeypatch.setenv("R1MEGA_PAGED_FP8", value)
        importlib.reload(cuda_paged)
        assert cuda_paged.IMPL == value
    monkeypatch.delenv("R1MEGA_PAGED_FP8")
    importlib.reload(cuda_paged)
    assert cuda_paged.IMPL == "mma"


def test_grid_switch_defaults_to_sequences_inner_and_refuses_unknown_values(monkeypatch):
    assert cuda_paged.HEADS_INNER is False
    monkeypatch.setenv("R1MEGA_PAGED_GRID", "head")
    with pytest.raises(ValueError, match="R1MEGA_PAGED_GRID='head'.*'seqs'.*'heads'"):
        importlib.reload(cuda_paged)
    monkeypatch.setenv("R1MEGA_PAGED_GRID", "heads")
    importlib.reload(cuda_paged)
    assert cuda_paged.HEADS_INNER is True and cuda_paged.SEQ_CTA is False
    monkeypatch.setenv("R1MEGA_PAGED_GRID", "seq")
    importlib.reload(cuda_paged)
    assert cuda_paged.HEADS_INNER is False and cuda_paged.SEQ_CTA is True
    monkeypatch.delenv("R1MEGA_PAGED_GRID")
    importlib.reload(cuda_paged)
    assert cuda_paged.HEADS_INNER is False and cuda_paged.SEQ_CTA is False


def test_warps_switch_defaults_to_four_and_refuses_unknown_values(monkeypatch):
    assert cuda_paged.WARPS_PER_HEAD == 4
    monkeypatch.setenv("R1MEGA_PAGED_FP8_WARPS", "3")
    with pytest.raises(ValueError, match="R1MEGA_PAGED_FP8_WARPS='3'.*'4'.*'2'.*'1'"):
        importlib.reload(cuda_paged)
    for value in (2, 1):
        monkeypatch.setenv("R1MEGA_PAGED_FP8_WARPS", str(value))
        importlib.reload(cuda_paged)
        assert cuda_paged.WARPS_PER_HEAD == value
    monkeypatch.delenv("R1MEGA_PAGED_FP8_WARPS")
    importlib.reload(cuda_paged)
    assert cuda_paged.WARPS_PER_HEAD == 4


def test_why_not_names_each_operand_it_cannot_take():
    q, k8, ks, _, _, _, _ = _fp8_case()
    assert "not a CUDA device" in cuda_paged.why_not(q, k8, ks)
    meta = {"device": "meta"}
    qm = torch.empty(8, 16, 128, dtype=torch.bfloat16, **meta)
    km = torch.empty(10, 16, 4, 128, dtype=torch.float8_e4m3fn, **meta)
    sm = torch.empty(10, 16, 4, **meta)
    # the checks read devices, dtypes, shapes and strides only: a stand-in CUDA tensor is enough
    fake_cuda = type("T", (), {})

    def as_cuda(t):
        obj = fake_cuda()
        obj.is_cuda, obj.dtype, obj.shape, obj.stride, obj.data_ptr = True, t.dtype, t.shape, t.stride, lambda: 0
        return obj

    assert cuda_paged.why_not(as_cuda(qm), as_cuda(km), sm) is None
    assert "float16" in cuda_paged.why_not(as_cuda(qm.float()), as_cuda(km), sm)
    assert "scales" in cuda_paged.why_not(as_cuda(qm), as_cuda(km), None)
    assert "head_dim 96" in cuda_paged.why_not(as_cuda(torch.empty(8, 16, 96, dtype=torch.bfloat16, **meta)),
                                               as_cuda(torch.empty(10, 16, 4, 96, dtype=torch.float8_e4m3fn, **meta)), sm)
    assert "8-token" in cuda_paged.why_not(as_cuda(qm), as_cuda(torch.empty(10, 8, 4, 128, dtype=torch.float8_e4m3fn, **meta)), sm)
    assert "group of at most 8" in cuda_paged.why_not(as_cuda(torch.empty(8, 36, 128, dtype=torch.bfloat16, **meta)),
                                                      as_cuda(km), sm)
    wide = torch.empty(10, 16, 4, 136, dtype=torch.float8_e4m3fn, **meta)[..., :128]  # row stride 136 bytes
    assert "16-byte multiples" in cuda_paged.why_not(as_cuda(qm), as_cuda(wide), sm)


def test_direct_call_refuses_off_cuda_and_the_op_keeps_its_reference(monkeypatch):
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout import triton_paged  # noqa: F401  (registers the op)

    q, k8, ks, v8, vs, bt, ctx = _fp8_case()
    with pytest.raises(ValueError, match="not a CUDA device"):
        cuda_paged.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, 0.1, ks, vs)
    monkeypatch.setattr(cuda_paged, "IMPL", "cuda")
    scale = 1 / math.sqrt(128)
    out = torch.ops.r1mega.paged_decode_attention(q, k8, v8, bt, ctx, scale, ks, vs)
    ref = attend_decode_gather(q, k8, v8, bt, ctx, scale, ks, vs)
    assert torch.equal(out, ref)


def _kernel_emulation(q, k8, v8, bt, ctx, scale, ks, vs, warps=4, chunk=16):
    """csrc/paged_decode_kernel.cu's walk in float32 torch ops: q pre-scaled into log2 units, each
    warp taking chunks c, c + warps, ... of 16 keys (one block-table read a chunk), a running max,
    sum and accumulator per warp, rescaled chunk by chunk, and the warps merged at the end."""
    b_n, hq, d = q.shape
    _, bs, hkv, _ = k8.shape
    group = hq // hkv
    out = torch.empty(b_n, hq, d)
    for b in range(b_n):
        n_chunks = -(-int(ctx[b]) // chunk)
        for h in range(hkv):
            qs = q[b, h * group:(h + 1) * group].float() * (scale * math.log2(math.e))   # (G, D)
            parts = []
            for w in range(warps):
                m = torch.full((group,), float("-inf"))
                l = torch.zeros(group)
                acc = torch.zeros(group, d)
                for c in range(w, n_chunks, warps):
                    n0 = c * chunk
                    blk, slot0 = int(bt[b, n0 // bs]), n0 % bs
                    keys = torch.arange(chunk)
                    ok = n0 + keys < int(ctx[b])
                    kk = k8[blk, slot0:slot0 + chunk, h].float() * ok[:, None]              # (16, D)
                    vv = v8[blk, slot0:slot0 + chunk, h].float() * ok[:, None]
                    ksc = ks[blk, slot0:slot0 + chunk, h] * ok
                    vsc = vs[blk, slot0:slot0 + chunk, h] * ok
                    s = torch.where(ok[None, :], (qs @ kk.t()) * ksc[None, :], float("-inf"))  # (G, 16)
                    m_new = torch.maximum(m, s.max(1).values)
                    alpha = torch.exp2(m - m_new)
                    p = torch.exp2(s - m_new[:, None])
                    l = l * alpha + p.sum(1)
                    acc = acc * alpha[:, None] + (p * vsc[None, :]) @ vv
                    m = m_new
                parts.append((m, l, acc))
            mx = torch.stack([p[0] for p in parts]).max(0).values
            f = [torch.exp2(p[0] - mx) for p in parts]
            den = sum(p[1] * fi for p, fi in zip(parts, f))
            num = sum(p[2] * fi[:, None] for p, fi in zip(parts, f))
            out[b, h * group:(h + 1) * group] = num / den[:, None]
    return out


@pytest.mark.parametrize("shape", [(16, 4, 128, 16), (12, 2, 64, 32), (9, 3, 64, 16)])
def test_the_kernels_walk_and_merge_equal_float64_attention(shape):
    """The kernel's algorithm (chunking, block-table reads, masking of a partial last chunk, warps
    without a chunk, the merge) against float64 attention on the dequantised cache; the CUDA
    code itself is held to the same reference by tests/gpu/test_paged_decode_cuda_gpu.py."""
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import dequantize_rows

    q, k8, ks, v8, vs, bt, ctx = _fp8_case(shape)
    scale = 1 / math.sqrt(shape[2])
    got = _kernel_emulation(q, k8, v8, bt, ctx, scale, ks, vs)
    ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                               dequantize_rows(v8, vs, torch.float64), bt, ctx, scale)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=2e-5)
