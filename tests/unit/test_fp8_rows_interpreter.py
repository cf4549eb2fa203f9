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
    out = {"plain": [], "swiglu": [], "op": [], "multi": []}
    for r, c in ((1, 128), (5, 96), (17, 200), (3, 2048)):
        x = _rows(r, c, g)
        for power2 in (True, False):
            ref = quantize_reference(_pad_rows(x, 16), "row", "e4m3", power2)
            q, s = fp8_rows_triton(x, power2)
            out["plain"].append(((r, c, power2), ref.data, ref.scale, q, s))
            for per in (4, 16):  # several rows a program (a prefill's calls): the same bytes
                out["multi"].append(((r, c, power2, per), q, s, *fp8_rows_triton(x, power2, rows=per)))
        y = torch.cat([_rows(r, c, g), _rows(r, c, g)], dim=1)          # [gate | up]
        q, s = fp8_rows_triton(y, True, swiglu=True)
        in_s = torch.exp2(torch.randint(-3, 4, (r, 1), generator=g).float())     # a GEMM's row scales
        one = fp8_rows_triton(y, True, swiglu=True, in_scale=in_s)
        out["multi"].append(((r, c, "swiglu", 8), *one, *fp8_rows_triton(y, True, swiglu=True, in_scale=in_s,
                                                                         rows=8)))
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
    assert len(out["multi"]) == 20
    for case, q1, s1, q, s in out["multi"]:
        assert torch.equal(q.view(torch.uint8), q1.view(torch.uint8)), case
        assert torch.equal(s, s1), case
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


def row_model(tensor: int, with_runtime: bool = False):
    """In a spawned rank: a one-layer bf16 local-spec model (hidden 128, FFN 256) over
    ``tensor`` TP ranks and its tensorwise FP8 rollout copies under the row switch."""
    import os

    os.environ["R1MEGA_FP8_ROLLOUT_ACT"] = "row"
    from r1mega.config import ModelConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.precision.policy import Fp8Policy
    from r1mega.precision.rollout import Fp8RolloutWeights

    rt = init_parallel(ParallelConfig(tensor=tensor), PrecisionConfig(dtype="bf16"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=1, hidden_size=128, ffn_hidden_size=256,
                                    num_attention_heads=4, num_query_groups=2, vocab_size=96,
                                    max_position_embeddings=64, spec="local"), rt, wrap=False)
    fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native", rollout=True))
    return (model, fp8, rt) if with_runtime else (model, fp8)


def qkv_rows_vs_route(rank, world):
    """In a spawned rank (TRITON_INTERPRET=1): the runner's qkv for the fused RoPE kernel under
    the row route (the GEMM's output before its row scales, and the scales), the per-linear
    route's scaled output, and whether the unscaled call is refused outside ``decoding`` and
    after ``remove``."""
    from r1mega.precision import rollout as fp8_rollout
    from r1mega.rollout.model_runner import ModelRunner
    from r1mega.rollout.triton_rope_kv import apply_row_scale
    from tests.unit.test_rollout_rope_kv_triton import attach_random_cache

    model, fp8, rt = row_model(tensor=world, with_runtime=True)
    runner = ModelRunner(model, rt)
    attach_random_cache(runner, block_tokens=4, num_blocks=4)
    attn = model[0].decoder.layers[0].self_attention
    x = (torch.randn(6, 1, 128, generator=torch.Generator().manual_seed(3)) * 2).bfloat16()
    with torch.no_grad():
        with fp8.decoding():
            unscaled, scales = runner._mixed_qkv(attn, x, 0)
            route, _ = attn.get_query_key_value_tensors(x, split_qkv=False)
        refused = fp8_rollout.qkv_unscaled(attn.linear_qkv, x) is None
        fp8.remove()
        with fp8.decoding():
            refused = refused and fp8_rollout.qkv_unscaled(attn.linear_qkv, x) is None
    return apply_row_scale(unscaled, scales), route, scales, refused


def _interpreted_mlp(rank, world):
    """A dense SwiGLU MLP of the FP8 rollout under row scales (cuBLAS's role played by torch's
    CPU scaled matmul, the row kernel by the interpreter): its fused chain, the quantised
    reference of the same chain, and megatron's own forward outside ``decoding``."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch.nn.functional as F

    from r1mega.precision import triton_fp8_rows
    from r1mega.precision.quantize import dequantize, quantize_reference

    model, fp8 = row_model(tensor=1)
    mlp = model[0].decoder.layers[0].mlp
    calls = []
    real = triton_fp8_rows.fp8_rows_triton

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append((k.get("in_scale") is not None, out))
        return out
    triton_fp8_rows.fp8_rows_triton = spy
    x = (torch.randn(5, 1, 128, generator=torch.Generator().manual_seed(1)) * 2).bfloat16()
    with torch.no_grad():
        plain, _ = mlp(x)
        with fp8.decoding():
            got, _ = mlp(x)
    # the chain by hand: rows of x, fc1 on the dequantised operands, SwiGLU, rows, fc2
    w1 = dequantize(quantize_reference(mlp.linear_fc1.weight.detach(), "tensor", power2=fp8.policy.power2_scales))
    w2 = dequantize(quantize_reference(mlp.linear_fc2.weight.detach(), "tensor", power2=fp8.policy.power2_scales))
    y1 = (dequantize(quantize_reference(x.reshape(5, 128), "row", power2=True)) @ w1.t()).bfloat16()
    gate, up = y1.float().chunk(2, dim=1)
    h = (F.silu(gate) * up).bfloat16()
    h_ref = dequantize(quantize_reference(h, "row", power2=True))
    # the same 5 rows as a "prefill" (thresholds lowered): the row route stays, and the GEMMs
    # after the row kernels are cuBLAS's rowwise ones (torch's CPU scaled matmul here)
    from r1mega.precision import gemm as gemm_mod
    from r1mega.precision import rollout as rollout_mod

    rollout_mod.ROW_ACT_MAX_ROWS = gemm_mod.ROWWISE_KERNEL_MIN_ROWS = 4
    qkv = model[0].decoder.layers[0].self_attention.linear_qkv
    wq = dequantize(quantize_reference(qkv.weight.detach(), "tensor", power2=fp8.policy.power2_scales))
    with torch.no_grad(), fp8.decoding():
        big_mlp, _ = mlp(x)
        big_qkv, _ = qkv(x)
    big_ref = dequantize(quantize_reference(x.reshape(5, 128), "row", power2=True)) @ wq.t()
    fp8.remove()
    with torch.no_grad():
        after, _ = mlp(x)
    return (got.reshape(5, 128).float(), h_ref, w2, plain.reshape(5, 128).float(),
            after.reshape(5, 128).float(), calls,
            (big_mlp.reshape(5, 128).float(), big_qkv.reshape(5, -1).float(), big_ref))


@pytest.mark.slow
@needs_triton
def test_fp8_rollout_mlp_chain_under_interpreter(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (res,) = run_ranks(_interpreted_mlp, 1, timeout_s=300)
    got, h_ref, w2, plain, after, calls, (big_mlp, big_qkv, big_ref) = res
    # two launches (eager: no compiled norm to fold fc1's quantiser into): fc1's rows, then
    # the SwiGLU quantiser fed fc1's row scales
    assert [c[0] for c in calls[:2]] == [False, True]
    q, s = calls[1][1]
    h = q[:5].float() * s[:5]
    # SwiGLU's rows as the reference quantises them, but for e4m3 ties moved by a bf16 rounding
    # (fc1's output, SwiGLU's; the interpreter truncates to bf16, which moves more of them than
    # the GPU's rounding): few elements, one e4m3 step (2^-3 of the value's binade) each
    moved = h != h_ref
    assert moved.float().mean() < 0.06, float(moved.float().mean())
    assert ((h - h_ref).abs() <= h_ref.abs() * 2.0 ** -3 + s[:5] * 2.0 ** -9).all()
    # fc2 on those operands: float32 products, bf16 output
    ref = h @ w2.t()
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    # FP8 against megatron's bf16 forward: close, not equal; and plain again after remove()
    assert not torch.equal(got, plain) and (got - plain).abs().max() / plain.abs().max() < 0.15
    assert torch.equal(after, plain)
    # prefill-sized: the chain's result through the rowwise GEMM, and a plain linear row-scaled
    torch.testing.assert_close(big_mlp, got, rtol=1e-2, atol=1e-2 * float(got.abs().max()))
    torch.testing.assert_close(big_qkv, big_ref, rtol=1e-2, atol=1e-2 * float(big_ref.abs().max()))
    assert [c[0] for c in calls] == [False, True, False, True, False]  # + the prefill's launches


@pytest.mark.slow
@needs_triton
def test_qkv_rows_left_to_the_rope_kernel_equal_the_scaled_route(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ((got, route, scales, refused),) = run_ranks(qkv_rows_vs_route, 1, timeout_s=300)
    assert got.shape == route.shape == (6, 1, 2, 4 * 32) and refused
    assert torch.equal(got, route)  # the scales are powers of two: applied anywhere, the same bits
    assert torch.equal(scales, 2.0 ** torch.log2(scales).round()) and not (scales == 1).all()


def test_rows_a_program_only_for_prefill_sized_calls_with_the_switch(monkeypatch):
    from r1mega.precision import triton_fp8_rows as rows

    assert rows.rows_per_program(16384, 2048) == 1                  # off by default
    monkeypatch.setattr(rows, "MULTI_ROW", True)
    assert [rows.rows_per_program(r, c) for r, c in ((16384, 2048), (16384, 8192), (4096, 512), (256, 2048))] \
        == [4, 1, 16, 1]
