"""The split-K FP8 decode GEMM (r1mega/precision/triton_skinny_gemm.py) under Triton's CPU
interpreter, against the float64 product of the dequantised operands: with and without row
scales, K split 1 to 5 ways (ragged last split and K not a multiple of the K block included),
rows and columns not multiples of the tiles; a call repeated gives the same bits and leaves
every tile counter at zero; bad operands are refused with the reason. The GPU test runs the same
checks compiled at the 852M shape."""
from __future__ import annotations

import importlib.util

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# (rows, N, K, BM,BN,BK,SPLIT,WARPS,STAGES or None for the default config)
CASES = [
    (40, 256, 384, "64,128,128,2,4,2"),    # 3 K blocks in 2 splits: the last split's masked
    (40, 256, 384, "64,64,128,3,4,2"),     # one K block a split
    (16, 128, 256, None),                  # the default config
    (70, 192, 320, "64,64,64,2,4,2"),      # K = 5 blocks of 64: ragged; N a multiple of no 128
    (33, 96, 80, "64,64,32,5,4,2"),        # 3 K blocks of 32 with the last partial, 5 splits asked
    (130, 64, 128, "128,64,64,1,4,2"),     # no split, two M tiles
]


def _interpreted(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.precision import triton_skinny_gemm as sk
    from r1mega.precision.quantize import quantize

    g = torch.Generator().manual_seed(0)
    out = []
    for m, n, k, cfg in CASES:
        if cfg:
            os.environ["R1MEGA_FP8_SKINNY_CONFIG"] = cfg
        else:
            os.environ.pop("R1MEGA_FP8_SKINNY_CONFIG", None)
        x = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]
        a = quantize(x, "row", "e4m3", True)
        w = quantize(torch.randn(n, k, generator=g) * 0.05, "tensor", "e4m3", False)
        y_rows = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.float32, a.scale)
        y_plain = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.float32)
        again = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.float32, a.scale)
        bf16 = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.bfloat16, a.scale)
        counters = int(sk.counters_ready("cpu").abs().sum())
        out.append(((m, n, k, cfg), a, w, y_rows, y_plain, again, bf16, counters))
    # 1 x 128 tile scales of a (the attention output's heads): K blocks of 128 whatever the config
    tiles = []
    for m, n, k, cfg in ((24, 128, 384, "64,64,128,3,4,2"), (24, 128, 384, "64,64,64,2,4,2"),
                         (9, 64, 300, None)):
        if cfg:
            os.environ["R1MEGA_FP8_SKINNY_CONFIG"] = cfg
        else:
            os.environ.pop("R1MEGA_FP8_SKINNY_CONFIG", None)
        x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)[None, :]
        a = quantize(x, "tile", "e4m3", True)
        w = quantize(torch.randn(n, k, generator=g) * 0.05, "tensor", "e4m3", False)
        # the scales followed by a NaN in memory: a read past their last column shows
        buf = torch.full((a.scale.numel() + 1,), float("nan"))
        buf[:-1] = a.scale.reshape(-1)
        tiles.append(((m, n, k, cfg), a, w, sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.float32,
                                                                  buf[:-1].view(a.scale.shape))))
    os.environ.pop("R1MEGA_FP8_SKINNY_CONFIG", None)
    errors = []
    a = quantize(torch.randn(8, 64, generator=g), "row", "e4m3", True)
    w = quantize(torch.randn(32, 64, generator=g), "tensor", "e4m3", False)
    for args in ((a.data.float(), w.data, w.scale),          # not e4m3
                 (a.data, w.data[:, :48], w.scale),           # K differs
                 (a.data, w.data, w.scale.reshape(1).expand(2))):  # two weight scales
        try:
            sk.skinny_gemm_triton(*args, torch.float32)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return out, tiles, errors


@pytest.mark.slow
@needs_triton
def test_skinny_gemm_matches_float64_under_interpreter(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    ((out, tiles, errors),) = run_ranks(_interpreted, 1, timeout_s=600)
    assert len(out) == len(CASES)
    for case, a, w, y_rows, y_plain, again, bf16, counters in out:
        deq_w = w.data.double() * w.scale.double()
        plain = a.data.double() @ deq_w.t()                       # before a's row scales
        ref = plain * a.scale.double().reshape(-1, 1)
        # float32 accumulation of e4m3 products: each exact in float32, so only the adds round
        k = case[2]
        tol = k * 2.0 ** -23 * (a.data.double().abs() @ deq_w.abs().t())
        assert (y_plain.double() - plain).abs().le(tol * 1.01 + 1e-30).all(), case
        assert (y_rows.double() - ref).abs().le(tol * a.scale.double().reshape(-1, 1) * 1.01 + 1e-30).all(), case
        assert torch.equal(y_rows, again), case
        assert ((bf16.float() - y_rows).abs() <= y_rows.abs() * 2.0 ** -7).all(), case
        assert counters == 0, case
    for case, a, w, y in tiles:
        from r1mega.precision.quantize import dequantize

        assert a.scale.shape == (case[0], -(-case[2] // 128)), case
        deq_a, deq_w = dequantize(a, torch.float64), w.data.double() * w.scale.double()
        ref = deq_a @ deq_w.t()
        tol = case[2] * 2.0 ** -23 * (deq_a.abs() @ deq_w.abs().t())
        assert (y.double() - ref).abs().le(tol * 1.01 + 1e-30).all(), case
    assert errors[0] and "e4m3" in errors[0]
    assert errors[1] and "K sizes differ" in errors[1]
    assert errors[2] and "w_scale" in errors[2]


def test_skinny_config_covers_the_sms():
    from r1mega.precision.triton_skinny_gemm import config

    # the 852M shape at 256 decode rows: qkv, o_proj, fc1, fc2
    for n, k in ((3072, 2048), (2048, 2048), (11264, 2048), (2048, 5632)):
        bm, bn, bk, split, _, _ = config(256, n, k)
        programs = -(-256 // bm) * -(-n // bn) * split
        assert programs <= 132 or split == 1, (n, k, programs)
        assert split == 1 or (k // bk) // split >= 4, (n, k, split)
        assert programs >= 96 or split > 1 and (k // bk) // (split * 2) < 4, (n, k, programs)
