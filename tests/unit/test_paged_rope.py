"""RoPE and the FP8 cache write inside the decode attention kernel (r1mega/rollout/cuda_paged_rope.py,
``R1MEGA_PAGED_FP8_ROPE``) on the CPU: the switch, the route's conditions, and the op's contract,
which its fallback keeps here and the CUDA kernel is held to on a GPU
(tests/gpu/test_paged_rope_gpu.py): megatron's RoPE on linear_qkv's q and k, the new rows
quantised into the cache at their slots, attention over that cache, and with ``rows`` o_proj's
input rows in e4m3."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from r1mega.rollout import cuda_paged, cuda_paged_rope
from tests.unit.test_rollout_fp8_error import paged_decode_case


def test_switch_is_off_by_default_and_validated(monkeypatch):
    assert cuda_paged_rope.ROPE is False
    monkeypatch.setenv("R1MEGA_PAGED_FP8_ROPE", "yes please")
    with pytest.raises(ValueError, match="R1MEGA_PAGED_FP8_ROPE='yes please'"):
        importlib.reload(cuda_paged_rope)
    monkeypatch.setenv("R1MEGA_PAGED_FP8_ROPE", "1")
    importlib.reload(cuda_paged_rope)
    assert cuda_paged_rope.ROPE is True
    monkeypatch.delenv("R1MEGA_PAGED_FP8_ROPE")
    importlib.reload(cuda_paged_rope)
    assert cuda_paged_rope.ROPE is False


def rope_case(hq, hkv, d, bs, dtype=torch.bfloat16, row_scale=False, seed=0, device="cpu"):
    """An FP8 paged cache (paged_decode_case's), linear_qkv's output for one new token a sequence
    at position ctx - 1, its cos/sin, and the slots of those positions; built on the CPU so the
    GPU test sees the same values. Returns a dict of the op's operands (and "freqs", the angles)."""
    from r1mega.rollout.kv_cache import quantize_rows

    _, k, v, bt, ctx = paged_decode_case(hq, hkv, d, bs, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t, group = ctx.shape[0], hq // hkv
    qkv = (torch.randn(t, hkv, (group + 2) * d, generator=g) * 2).to(dtype)
    pos = (ctx - 1).long()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(pos.float(), inv)
    freqs = torch.cat([f, f], -1)
    slots = bt.long()[torch.arange(t), pos // bs] * bs + pos % bs
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    case = dict(qkv=qkv, freqs=freqs, cos=freqs.cos().to(dtype), sin=freqs.sin().to(dtype), slots=slots,
                row_scale=(2.0 ** torch.randint(-3, 4, (t,), generator=g).float()) if row_scale else None,
                k_cache=k8, v_cache=v8, k_scale=ks, v_scale=vs, block_tables=bt, ctx_lens=ctx,
                scale=1 / math.sqrt(d))
    return {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in case.items()}


def _megatron_reference(c, rows: bool, power2: bool):
    """The contract from megatron's RoPE and our cache and attention references: (out, q8, s8,
    the caches and scales as written)."""
    from r1mega.precision.linear import _pad_rows
    from r1mega.precision.quantize import quantize_reference
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import write_slots

    kc, vc, ks, vs = (c[n].clone() for n in ("k_cache", "v_cache", "k_scale", "v_scale"))
    hkv, d = kc.shape[2], kc.shape[3]
    t, group = c["qkv"].shape[0], c["qkv"].shape[2] // d - 2
    x = c["qkv"]
    if c["row_scale"] is not None:
        x = (x.float() * c["row_scale"][:, None, None]).to(x.dtype)
    x = x.reshape(t, hkv, group + 2, d)

    def rotate(y):  # (T, n, D) through megatron's bshd RoPE at the case's positions
        return rope_utils._apply_rotary_pos_emb_bshd(y[:, None], c["freqs"][:, None, None, :])[:, 0]

    q = rotate(x[:, :, :group].reshape(t, hkv * group, d))
    k = rotate(x[:, :, group])
    write_slots(kc, vc, c["slots"], k, x[:, :, group + 1], ks, vs)
    out = attend_decode_gather(q, kc, vc, c["block_tables"], c["ctx_lens"], c["scale"], ks, vs)
    if not rows:
        return out, None, None, (kc, vc, ks, vs)
    a = quantize_reference(_pad_rows(out.reshape(t, -1), 16), "row", "e4m3", power2)
    return out, a.data, a.scale.reshape(-1, 1), (kc, vc, ks, vs)


@pytest.mark.parametrize("rows", [False, True], ids=["attention", "attention+rows"])
@pytest.mark.parametrize("row_scale", [False, True], ids=["scaled-qkv", "row-scaled-qkv"])
@pytest.mark.parametrize("shape", [(16, 4, 64, 16), (8, 2, 128, 32)], ids=["16-4-64-16", "8-2-128-32"])
def test_op_fallback_keeps_the_contract(shape, row_scale, rows):
    c = rope_case(*shape, row_scale=row_scale)
    assert cuda_paged_rope.why_not(c["qkv"], c["k_cache"], c["k_scale"]).endswith("not a CUDA device")
    ref_out, ref_q8, ref_s8, ref_cache = _megatron_reference(c, rows, True)
    out, q8, s8 = torch.ops.r1mega.paged_decode_attention_rope(
        c["qkv"], c["cos"], c["sin"], c["slots"], c["row_scale"], c["k_cache"], c["v_cache"], c["k_scale"],
        c["v_scale"], c["block_tables"], c["ctx_lens"], c["scale"], rows, True, 16)
    for got, want in zip((c["k_cache"], c["v_cache"], c["k_scale"], c["v_scale"]), ref_cache):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)
    assert torch.equal(out, ref_out)
    if rows:
        assert torch.equal(q8.view(torch.uint8), ref_q8.view(torch.uint8)) and torch.equal(s8, ref_s8)
    else:
        assert q8.shape == (0, out.shape[1] * out.shape[2]) and s8.shape == (0, 1)


def test_op_declares_its_writes_and_its_fake_shapes():
    """The schema marks exactly the caches and their scales as written (inductor must see the
    cache write), and the fake implementation gives the real outputs' shapes and dtypes
    (opcheck's schema test cannot compare e4m3 tensors on the CPU)."""
    op = torch.ops.r1mega.paged_decode_attention_rope
    written = [a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["k_cache", "v_cache", "k_scale", "v_scale"]
    c = rope_case(8, 2, 64, 16, row_scale=True)
    for rows in (False, True):
        args = (c["qkv"], c["cos"], c["sin"], c["slots"], c["row_scale"], c["k_cache"], c["v_cache"],
                c["k_scale"], c["v_scale"], c["block_tables"], c["ctx_lens"], c["scale"], rows, True, 16)
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def test_route_conditions(monkeypatch):
    """The tensor-core kernel, one CTA a KV head of four warps, linear_qkv's (T, Hkv, (G + 2) * D)
    layout, the decode kernel's own conditions; with rows also the cluster epilogue's (head_dim
    128). A CPU tensor is never served."""
    c = rope_case(16, 4, 64, 16)
    kc, ks = c["k_cache"], c["k_scale"]
    assert "not a CUDA device" in cuda_paged_rope.why_not(c["qkv"], kc, ks)
    assert "head_dim 64" in cuda_paged_rope.rows_why_not(c["qkv"], kc, ks)
    assert "is not (T, Hkv=4" in cuda_paged_rope.why_not(c["qkv"][:, :2], kc, ks)
    assert "is not (T, Hkv=4" in cuda_paged_rope.why_not(c["qkv"][..., :64 * 2], kc, ks)
    # the decode kernel's own checks see the q heads qkv holds: here a group of 9, refused on a GPU
    assert cuda_paged_rope._q_like(torch.zeros(3, 4, 11 * 64), kc).shape == (3, 36, 64)
    monkeypatch.setattr(cuda_paged, "WARPS_PER_HEAD", 2)
    assert "four warps" in cuda_paged_rope.why_not(c["qkv"], kc, ks)
    monkeypatch.setattr(cuda_paged, "WARPS_PER_HEAD", 4)
    monkeypatch.setattr(cuda_paged, "IMPL", "triton")
    assert "tensor-core kernel's" in cuda_paged_rope.why_not(c["qkv"], kc, ks)
    monkeypatch.setattr(cuda_paged_rope, "ROPE", True)
    assert not cuda_paged_rope.serves(c["qkv"], kc, ks)
