"""The FP8 rollout's one-pass row quantiser (r1mega/precision/triton_fp8_rows.py) compiled on a
GPU with e4m3 (sm_89+): bit for bit against ``quantize_reference(x, "row")`` and, for SwiGLU,
against it on the Triton SwiGLU kernel's output (within a moved e4m3 tie); the op inside a compiled function; and the FP8
rollout's attention output projection through it against the explicit quantise-and-multiply."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

from r1mega.precision.linear import _pad_rows  # noqa: E402
from r1mega.precision.quantize import dequantize, quantize_reference  # noqa: E402
from r1mega.precision.triton_fp8_rows import fp8_rows, fp8_rows_triton  # noqa: E402


def _x(r, c, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(r, c, device="cuda", generator=g) * torch.logspace(-2, 2, c, device="cuda")
    x[0] = 0
    if r > 2:
        x[2] *= 1e-30
    return x.bfloat16()


def _same(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture
def row_model(monkeypatch, single_rank_runtime):
    """A one-layer local-spec model (hidden 256, FFN 1024) and its tensorwise FP8 rollout copies
    under the row switch; the copies are removed after the test."""
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.policy import Fp8Policy
    from r1mega.precision.rollout import Fp8RolloutWeights

    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=1, hidden_size=256, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=1024, vocab_size=128,
                                    max_position_embeddings=64, spec="local"), rt, wrap=False)
    fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native", rollout=True))
    yield model[0].decoder.layers[0], fp8
    fp8.remove()


@pytest.mark.parametrize("r,c", [(1, 2048), (5, 96), (100, 2048), (256, 5632), (256, 14336)])
@pytest.mark.parametrize("power2", [True, False])
def test_rows_bit_for_bit(r, c, power2):
    x = _x(r, c, r + c)
    ref = quantize_reference(_pad_rows(x, 16), "row", "e4m3", power2)
    q, s = fp8_rows_triton(x, power2)
    assert _same(q, ref.data) and torch.equal(s, ref.scale)


@pytest.mark.parametrize("r,c", [(1, 256), (37, 5632), (256, 5632)])
def test_swiglu_rows(r, c):
    from r1mega.ops.triton_swiglu import swiglu_forward

    y = torch.cat([_x(r, c, 1), _x(r, c, 2)], dim=1)
    ref = quantize_reference(_pad_rows(swiglu_forward(y), 16), "row", "e4m3", True)
    _close_to(fp8_rows_triton(y, True, swiglu=True), ref)


def _close_to(got, ref):
    """The SwiGLU kernel against the reference on triton_swiglu's output: its sigmoid divides
    approximately, so a bf16 rounding can move a few values across an e4m3 tie (one step) and,
    rarely, a row's amax across a power of two (its scale one binade off)."""
    q, s = got
    a, b = q.float() * s, dequantize(ref)
    moved = a != b
    assert moved.float().mean() < 0.01, float(moved.float().mean())
    assert ((a - b).abs() <= b.abs() * 2.0 ** -3 + torch.maximum(s, ref.scale) * 2.0 ** -9).all()
    assert (s == ref.scale).float().mean() > 0.95


def test_op_compiled_equals_eager():
    x = _x(64, 2048, 7)

    def f(t):
        a = fp8_rows(t * 2, True)
        return a.data, a.scale

    q0, s0 = f(x)
    q1, s1 = torch.compile(f, fullgraph=True)(x)
    assert _same(q0, q1) and torch.equal(s0, s1)


def test_rollout_output_projection_through_the_row_kernel(row_model):
    layer, fp8 = row_model
    lin = layer.self_attention.linear_proj
    x = _x(7, 256, 3).reshape(7, 1, 256)
    with torch.no_grad(), fp8.decoding():
        y, _ = lin(x)
    a = quantize_reference(x.reshape(7, 256), "row", power2=True)
    w = quantize_reference(lin.weight.detach(), "tensor", power2=fp8.policy.power2_scales)
    ref = dequantize(a).double() @ dequantize(w).double().t()
    torch.testing.assert_close(y.reshape(7, 256).double(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


def test_swiglu_rows_with_input_scales():
    from r1mega.ops.triton_swiglu import swiglu_forward

    y = torch.cat([_x(48, 5632, 3), _x(48, 5632, 4)], dim=1)
    s_in = 2.0 ** torch.randint(-6, 6, (64, 1), device="cuda").float()   # padded rows too
    ref = quantize_reference(_pad_rows(swiglu_forward((y.float() * s_in[:48]).bfloat16()), 16),
                             "row", "e4m3", True)
    _close_to(fp8_rows_triton(y, True, swiglu=True, in_scale=s_in), ref)


def test_rollout_mlp_chain_against_megatron_forward(row_model, monkeypatch):
    from r1mega.precision import triton_fp8_rows

    layer, fp8 = row_model
    mlp = layer.mlp
    calls = []
    real = triton_fp8_rows.fp8_rows_triton
    monkeypatch.setattr(triton_fp8_rows, "fp8_rows_triton",
                        lambda *a, **k: calls.append(k.get("in_scale") is not None) or real(*a, **k))
    x = _x(40, 256, 9).reshape(40, 1, 256)
    with torch.no_grad():
        plain, _ = mlp(x)
        with fp8.decoding():
            got, _ = mlp(x)
            compiled, _ = torch.compile(mlp)(x)
    # eager: fc1's rows, then SwiGLU's fed fc1's scales; compiled: fc1's quantiser is inductor's
    # (fused into what makes x), SwiGLU's the op, and no graph break ran the chain eagerly
    assert calls == [False, True, True], calls
    rel = float((got - plain).abs().max() / plain.abs().max())
    assert 0 < rel < 0.15, rel
    torch.testing.assert_close(compiled, got, rtol=2e-2, atol=2e-2 * float(got.abs().max()))


@pytest.mark.parametrize("m", [256, 4096])
def test_row_tensor_gemm_both_kernels_against_emulation(m):
    """Row-scaled x times a tensorwise weight: the tensorwise kernel plus the row scales on its
    output (decode sizes), cuBLAS's rowwise kernel above ROWWISE_KERNEL_MIN_ROWS (prefill)."""
    from r1mega.precision.gemm import ROWWISE_KERNEL_MIN_ROWS, emulated_gemm, scaled_gemm

    assert (m > ROWWISE_KERNEL_MIN_ROWS) == (m == 4096)
    x = _x(m, 2048, 11)
    w = (torch.randn(3072, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
         * 0.02).bfloat16()
    a = fp8_rows(x, True)
    wq = quantize_reference(w, "tensor", "e4m3", False)
    ref = emulated_gemm(a, wq, torch.float32)[:m]
    got = scaled_gemm(a, wq, torch.bfloat16, fast_accum=True)[:m].float()
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


def test_prefill_sized_calls_take_row_scales_on_gpu(row_model):
    """With the row switch, a prefill-sized call (above ROW_ACT_MAX_ROWS) on a GPU is row-scaled
    too (one-pass kernel, rowwise GEMM), for a plain linear and through the MLP chain."""
    from r1mega.precision.rollout import ROW_ACT_MAX_ROWS

    layer, fp8 = row_model
    rows = ROW_ACT_MAX_ROWS * 2
    # rows of very different sizes: row scales and one tensor scale round them differently
    x = (_x(rows, 256, 5).float() * torch.logspace(-3, 1, rows, device="cuda")[:, None]).bfloat16()
    lin = layer.self_attention.linear_qkv
    with torch.no_grad(), fp8.decoding():
        y, _ = lin(x.reshape(rows, 1, 256))
        mlp_fp8, _ = layer.mlp(x.reshape(rows, 1, 256))
    with torch.no_grad():
        mlp_plain, _ = layer.mlp(x.reshape(rows, 1, 256))
    w = dequantize(quantize_reference(lin.weight.detach(), "tensor", power2=fp8.policy.power2_scales))
    ref = dequantize(quantize_reference(x, "row", power2=True)) @ w.t()
    scale = ref.abs().amax(1, keepdim=True)  # per row: the small rows must be right too
    assert ((y.reshape(rows, -1).float() - ref).abs() <= 1e-2 * scale + 1e-30).all()
    rel = ((mlp_fp8 - mlp_plain).float().abs().amax(-1)
           / mlp_plain.float().abs().amax(-1).clamp_min(1e-30))  # row 0 is all zeros
    assert rel.max() < 0.3, float(rel.max())  # FP8 noise; a lost scale would be a factor >= 2


def test_qkv_row_scales_in_the_rope_kernel_decode_the_same(tensorwise_rollout, monkeypatch):
    """The FP8 rollout's decode with qkv's row scales applied in the RoPE kernel (the default)
    against the same decode with them applied after the GEMM (qkv_unscaled refused): tokens and
    log-probs equal to the bit in eager decode (powers of two round nowhere), and the route is
    taken once per layer and decode step; compiled with CUDA graphs the same tokens."""
    from r1mega.config import RolloutConfig
    from r1mega.precision import rollout as rollout_mod
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    monkeypatch.delenv("R1MEGA_FP8_ROLLOUT_ACT", raising=False)  # tensorwise: row scales
    model, rt, policy, prompts = tensorwise_rollout
    real = rollout_mod.qkv_unscaled
    runs, taken = {}, {}
    for compiled, in_kernel in ((False, False), (False, True), (True, True)):
        calls = []
        monkeypatch.setattr(rollout_mod, "qkv_unscaled", (lambda lin, h: calls.append(1) or real(lin, h))
                            if in_kernel else (lambda lin, h: None))
        torch._dynamo.reset()
        fp8 = rollout_mod.Fp8RolloutWeights(model[0], policy)
        assert fp8.act == "row"
        cfg = RolloutConfig(max_new_tokens=12, kv_block_tokens=16, max_batch_sequences=64,
                            temperature=0.0, compile_decode=compiled, cuda_graphs=compiled)
        eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
        with fp8.decoding():
            outs = eng.generate([GenerationRequest(p, n=1, seed=i) for i, p in enumerate(prompts)])
        eng.release()
        fp8.remove()
        runs[compiled, in_kernel] = [(c.token_ids, c.logprobs) for c in outs]
        taken[compiled, in_kernel] = len(calls)
    assert runs[False, True] == runs[False, False]
    # both layers of each decode step: 11 steps at least (the first token is the prefill's)
    assert taken[False, True] >= 2 * 11 and taken[False, True] % 2 == 0
    assert taken[True, True] > 0         # traced into the compiled step
    for (t0, _), (t1, _) in zip(runs[False, True], runs[True, True]):
        assert t0[:4] == t1[:4]


@pytest.mark.parametrize("r,c,per", [(4100, 2048, None), (16384, 2048, None), (4100, 2816, 2), (300, 512, 16)])
def test_several_rows_a_program_give_the_one_row_bits(monkeypatch, r, c, per):
    """R1MEGA_FP8_ROWS_MULTI (prefill-sized calls): the same bytes and scales as one row a
    program and as the reference, plain and SwiGLU with a GEMM's input row scales."""
    from r1mega.precision import triton_fp8_rows

    monkeypatch.setattr(triton_fp8_rows, "MULTI_ROW", True)
    x = _x(r, c, r + c)
    ref = quantize_reference(_pad_rows(x, 16), "row", "e4m3", True)
    one = fp8_rows_triton(x, True, rows=1)
    many = fp8_rows_triton(x, True, rows=per)
    assert _same(many[0], one[0]) and torch.equal(many[1], one[1])
    assert _same(many[0], ref.data) and torch.equal(many[1], ref.scale)
    y = torch.cat([_x(r, c, 1), _x(r, c, 2)], dim=1)
    s_in = torch.exp2(torch.randint(-3, 4, (r, 1), device="cuda").float())
    one = fp8_rows_triton(y, True, swiglu=True, in_scale=s_in, rows=1)
    many = fp8_rows_triton(y, True, swiglu=True, in_scale=s_in, rows=per)
    assert _same(many[0], one[0]) and torch.equal(many[1], one[1])
