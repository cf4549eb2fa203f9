"""RoPE and the FP8 cache write inside the decode attention kernel (csrc/paged_decode_rope.cuh,
``R1MEGA_PAGED_FP8_ROPE``): the caches it writes equal the eager reference's
(rope_kv_write_reference) byte for byte, its attention equals the plain tensor-core kernel's on
the reference's rotated q and cache to the bit, with the cluster rows epilogue its e4m3 rows equal
the one-pass row kernel's, also under CUDA graph replay; and an FP8 rollout decodes the same
tokens and log-probs with it as with the eager RoPE."""
from __future__ import annotations

import pytest
import torch

from tests.gpu.test_paged_rows_gpu import _clusters_or_skip, _ext, _rows_reference, check_rollouts_equal, \
    epilogue_rollouts
from tests.unit.test_paged_rope import rope_case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

# (Hq, Hkv, D, block tokens)
SHAPES = [(16, 4, 128, 16), (12, 2, 64, 32), (8, 1, 64, 16), (32, 4, 64, 16), (16, 2, 256, 16), (8, 8, 128, 32)]

_CACHE = ("k_cache", "v_cache", "k_scale", "v_scale")


def _bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _reference(cp, c, rows=False, power2=True):
    """The reference road on copies of the caches: the eager RoPE and write, then the plain
    tensor-core kernel (and the one-pass row kernel on its output)."""
    from r1mega.rollout.triton_rope_kv import rope_kv_write_reference

    kc, vc, ks, vs = (c[n].clone() for n in _CACHE)
    t = c["qkv"].shape[0]
    q = rope_kv_write_reference(c["qkv"].unsqueeze(1), c["cos"].reshape(t, 1, 1, -1), c["sin"].reshape(t, 1, 1, -1),
                                c["slots"], kc, vc, ks, vs, row_scale=c["row_scale"])
    out = cp.paged_decode_fp8_cuda(q, kc, vc, c["block_tables"], c["ctx_lens"], c["scale"], ks, vs,
                                   tensor_cores=True)
    q8, s8 = _rows_reference(out, power2) if rows else (None, None)
    return out, q8, s8, (kc, vc, ks, vs)


def _fused(rope, c, rows=False, power2=True):
    return rope.paged_decode_fp8_rope(*(c[n] for n in ("qkv", "cos", "sin", "slots", "row_scale", *_CACHE,
                                                       "block_tables", "ctx_lens", "scale")), rows, power2)


def _case(shape, dtype, row_scale, int64_tables=False, repeat=1):
    c = rope_case(*shape, dtype=dtype, row_scale=row_scale, device="cuda")
    if int64_tables:  # the graph step's block tables: int64 rows of a packed buffer
        c["block_tables"] = c["block_tables"].long()
    if repeat > 1:  # more rows, each sequence's new token again: rows 8.. write what rows 0..7 do
        for n in ("qkv", "cos", "sin", "slots", "block_tables", "ctx_lens", "row_scale"):
            if c[n] is not None:
                c[n] = c[n].repeat(repeat, *([1] * (c[n].dim() - 1)))
    return c


@pytest.mark.parametrize("heads_inner", [False, True], ids=["seqs-grid", "heads-grid"])
@pytest.mark.parametrize("int64_tables", [False, True], ids=["int32-tables", "int64-tables"])
@pytest.mark.parametrize("row_scale", [False, True], ids=["scaled-qkv", "row-scaled-qkv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
def test_kernel_writes_the_reference_cache_and_attends_as_the_plain_kernel(monkeypatch, shape, dtype, row_scale,
                                                                           int64_tables, heads_inner):
    cp = _ext()
    from r1mega.rollout import cuda_paged_rope as rope

    monkeypatch.setattr(cp, "HEADS_INNER", heads_inner)
    c = _case(shape, dtype, row_scale, int64_tables)
    ref_out, _, _, ref_cache = _reference(cp, c)
    out, q8, s8 = _fused(rope, c)
    for name, want in zip(_CACHE, ref_cache):
        assert torch.equal(_bytes(c[name]), _bytes(want)), name
    assert torch.equal(out, ref_out)
    assert q8.shape[0] == 0 and s8.shape[0] == 0


def test_a_slot_off_the_last_position_is_written_not_read():
    """Sequence 0's new row goes to a slot of a block it does not hold: written there as the
    reference writes it, while its attention reads its last position from the cache as it was."""
    cp = _ext()
    from r1mega.rollout import cuda_paged_rope as rope

    c = _case((16, 4, 128, 16), torch.bfloat16, True)
    c["slots"][0] = c["block_tables"][1, 0].long() * 16 + 15  # sequence 1's first block, last slot
    ref_out, _, _, ref_cache = _reference(cp, c)
    out, _, _ = _fused(rope, c)
    for name, want in zip(_CACHE, ref_cache):
        assert torch.equal(_bytes(c[name]), _bytes(want)), name
    assert torch.equal(out[0], ref_out[0])


@pytest.mark.parametrize("power2", [True, False], ids=["power2", "exact-scales"])
@pytest.mark.parametrize("repeat", [1, 5], ids=["8-seqs", "40-seqs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 4, 128, 16), (8, 8, 128, 32), (4, 1, 128, 16)],
                         ids=["16-4-128-16", "8-8-128-32", "4-1-128-16"])
def test_with_the_cluster_rows_epilogue(shape, dtype, repeat, power2):
    cp = _clusters_or_skip(_ext())
    from r1mega.rollout import cuda_paged_rope as rope

    c = _case(shape, dtype, True, repeat=repeat)
    ref_out, ref_q8, ref_s8, ref_cache = _reference(cp, c, rows=True, power2=power2)
    out, q8, s8 = _fused(rope, c, rows=True, power2=power2)
    for name, want in zip(_CACHE, ref_cache):
        assert torch.equal(_bytes(c[name]), _bytes(want)), name
    assert torch.equal(out, ref_out)
    assert q8.shape == ref_q8.shape and torch.equal(_bytes(q8), _bytes(ref_q8)) and torch.equal(s8, ref_s8)


def test_refuses_what_it_cannot_take():
    cp = _ext()
    from r1mega.rollout import cuda_paged_rope as rope

    c = _case((12, 2, 64, 32), torch.bfloat16, False)
    with pytest.raises(ValueError, match="head_dim 64: the cluster rows epilogue takes 128"):
        _fused(rope, c, rows=True)
    c = _case((16, 4, 128, 16), torch.bfloat16, False)
    out = torch.empty(8, 16, 128, dtype=torch.bfloat16, device="cuda")
    q8 = torch.empty(16, 16 * 128, dtype=torch.float8_e4m3fn, device="cuda")
    s8 = torch.empty(16, dtype=torch.float32, device="cuda")
    args = [c[n] for n in ("qkv", "cos", "sin", "slots", "row_scale", *_CACHE, "block_tables", "ctx_lens")]
    with pytest.raises(RuntimeError, match="cluster epilogue only"):
        cp.get().paged_decode_fp8_rope(*args, out, 0.1, False, q8, s8, True, cluster=False)
    skewed = torch.empty(c["qkv"].numel() + 2, dtype=torch.bfloat16, device="cuda")[2:].view_as(c["qkv"])
    skewed.copy_(c["qkv"])  # 4 bytes past an 8-byte boundary: a lane's 8-byte reads would fault
    with pytest.raises(ValueError, match="does not start on 8 bytes"):
        _fused(rope, dict(c, qkv=skewed))
    with pytest.raises(RuntimeError, match="must start on 8 bytes"):
        cp.get().paged_decode_fp8_rope(skewed, *args[1:], out, 0.1)
    bad = dict(c, cos=c["cos"][:, :64].contiguous())
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        cp.get().paged_decode_fp8_rope(*[bad[n] for n in ("qkv", "cos", "sin", "slots", "row_scale", *_CACHE,
                                                           "block_tables", "ctx_lens")], out, 0.1)


@pytest.mark.parametrize("rows", [False, True], ids=["attention", "attention+rows"])
def test_replays_in_a_cuda_graph_and_the_op_falls_back(rows):
    cp = _ext()
    if rows:
        _clusters_or_skip(cp)
    from r1mega.rollout import cuda_paged_rope as rope

    c = _case((16, 4, 128, 16), torch.bfloat16, True, int64_tables=True, repeat=5)
    args = [c[n] for n in ("qkv", "cos", "sin", "slots", "row_scale", *_CACHE, "block_tables", "ctx_lens", "scale")]
    op = torch.ops.r1mega.paged_decode_attention_rope
    eager = op(*args, rows, True, 16)
    cache = [x.clone() for x in args[5:9]]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = op(*args, rows, True, 16)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(_bytes(a), _bytes(b))
        for a, b in zip(args[5:9], cache):
            assert torch.equal(_bytes(a), _bytes(b))  # rewritten with the same rows
    fallback = rope.reference(*args, rows, True, 16)  # the eager RoPE, write and decode ops
    for a, b in zip(fallback, eager):
        assert torch.equal(_bytes(a), _bytes(b))


def _eager_rope(monkeypatch):
    """The decode step's RoPE kernel replaced by the eager reference (whose bits the fused kernel
    has), and the prefill's too, in every run of a comparison."""
    from r1mega.rollout import triton_rope_kv

    def eager(qkv, cos, sin, slots, k_cache, v_cache, out=None, k_scale=None, v_scale=None, exact=False,
              kv_out=None, row_scale=None):
        res = triton_rope_kv.rope_kv_write_reference(qkv, cos, sin, slots, k_cache, v_cache, k_scale, v_scale,
                                                     kv_out=kv_out is not None, row_scale=row_scale)
        if kv_out is None:
            return res
        kv_out[0].copy_(res[1])
        kv_out[1].copy_(res[2])
        return res[0]

    monkeypatch.setattr(triton_rope_kv, "rope_kv_write_triton", eager)


@pytest.mark.parametrize("rows_cluster", [False, True], ids=["row-kernel", "cluster-rows"])
def test_rollout_decodes_the_same_with_rope_in_the_kernel(single_rank_runtime, monkeypatch, rows_cluster):
    """The FP8 rollout with RoPE in the attention kernel against the same rollout with the eager
    RoPE (:func:`check_rollouts_equal`: tokens and log-probs to the bit, eager and compiled with
    CUDA graphs, the kernel taken once a layer and decode step, no graph break added); o_proj's
    input from the row kernel, or from the cluster epilogue in both rollouts."""
    cp = _ext()
    if rows_cluster:
        _clusters_or_skip(cp)
        monkeypatch.setattr(cp, "ROWS_CLUSTER", True)
    from r1mega.rollout import cuda_paged_rope as rope

    _eager_rope(monkeypatch)
    check_rollouts_equal(epilogue_rollouts(single_rank_runtime, monkeypatch, cp, "ROPE", 1024, 0.0, 1,
                                           switch_owner=rope, counted=(rope, "paged_decode_fp8_rope")))
