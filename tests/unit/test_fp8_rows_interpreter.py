"""The FP8 rollout's one-pass row quantiser (r1mega/precision/triton_fp8_rows.py) under Triton's
CPU interpreter, against the PyTorch reference ``quantize_reference(x, "row")`` bit for bit
(data bytes and scales), rows padded with zero rows; its SwiGLU variant against the reference
of the Triton SwiGLU kernel's output (bit for bit) and of eager ``silu(gate) * up`` (within
e4m3's rounding). The GPU test runs the same checks compiled."""
from __future__ import annotations

import importlib.util

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _rows(r: int, c: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(r, c, generator=g) * torch.logspace(-2, 2, c)
    x[0] = 0                    # an all-zero row: multiplier 1
    if r > 2:
        x[2] *= 1e-30           # a tiny row: its multiplier clamps to FLT_MAX's power of 2
    return x.bfloat16()


def _interpreted(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch.nn.functional as F

    from r1mega.ops.triton_swiglu import swiglu_forward
    from r1mega.precision.linear import _pad_rows
    from r1mega.precision.quantize import quantize_reference
    from r1mega.precision.triton_fp8_rows import fp8_rows, fp8_rows_triton

    g = torch.Generator().manual_seed(0)
    out = {"plain": [], "swiglu": [], "op": []}
    for r, c in ((1, 128), (5, 96), (17, 200), (3, 2048)):
        x = _rows(r, c, g)
        for power2 in (True, False):
            ref = quantize_reference(_pad_rows(x, 16), "row", "e4m3", power2)
            q, s = fp8_rows_triton(x, power2)
            out["plain"].append(((r, c, power2), ref.data, ref.scale, q, s))
        y = torch.cat([_rows(r, c, g), _rows(r, c, g)], dim=1)          # [gate | up]
        q, s = fp8_rows_triton(y, True, swiglu=True)
        ref_kernel = quantize_reference(_pad_rows(swiglu_forward(y), 16), "row", "e4m3", True)
        gate, up = y.float().chunk(2, dim=1)
        eager = (F.silu(gate) * up).bfloat16().float()
        out["swiglu"].append(((r, c), ref_kernel.data, ref_kernel.scale, q, s, eager))
        a = fp8_rows(x, True, pad=8)
        out["op"].append(((r, c), a.data, a.scale, a.granularity))
    nan = _rows(4, 64, g)
    nan[1, 5] = float("nan")
    out["nan"] = fp8_rows_triton(nan, True)
    return out


@pytest.mark.slow
@needs_triton
def test_fp8_rows_match_the_reference_under_interpreter(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    (out,) = run_ranks(_interpreted, 1, timeout_s=300)
    assert len(out["plain"]) == 8
    for case, ref_q, ref_s, q, s in out["plain"]:
        assert q.shape == ref_q.shape and q.shape[0] % 16 == 0, case
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), case
        assert torch.equal(s, ref_s), case
        assert (s[case[0]:] == 1).all() and (q[case[0]:].float() == 0).all(), case  # padding
    for case, ref_q, ref_s, q, s, eager in out["swiglu"]:
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), case
        assert torch.equal(s, ref_s), case
        r = case[0]
        got = q[:r].float() * s[:r]
        # e4m3 keeps 3 mantissa bits: half an ulp of the row's values, plus the smallest
        # subnormal step of the row's scale, plus one bf16 ulp: the kernel rounds SwiGLU to bf16
        # first (the interpreter by truncation), which can move a value across an e4m3 tie
        err = (got - eager).abs()
        bound = eager.abs() * (2.0 ** -4 + 2.0 ** -7) + s[:r] * 2.0 ** -9 + 1e-30
        assert (err <= bound * 1.01).all(), case
    for case, data, scale, gran in out["op"]:
        assert gran == "row" and data.shape[0] % 8 == 0 and scale.shape == (data.shape[0], 1), case
    q, s = out["nan"]
    # a NaN makes its row's scale NaN, so the whole dequantised row is NaN (the bytes: the GPU
    # casts NaN to e4m3's NaN, the interpreter's cast gives 0x7C)
    assert torch.isnan(s[1]).all() and torch.isnan(q[1].float() * s[1]).all()
    assert not torch.isnan(s[[0, 2, 3]]).any()
