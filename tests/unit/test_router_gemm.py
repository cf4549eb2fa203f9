"""r1mega/moe/router_gemm.py: the router's float32 product from bf16 part products, against a
float64 reference (the CPU runs the same part products through a float32 matmul)."""
from __future__ import annotations

import torch

from r1mega.moe import router_gemm as RG

T, H, E = 96, 256, 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
    # float32 weights with bits below bf16's: the low parts carry real value
    weight = torch.randn(E, H, generator=g) * 0.02 * torch.exp(torch.randn(E, H, generator=g))
    grad = torch.randn(T, E, generator=g) * torch.exp(torch.randn(T, E, generator=g) * 2)
    return hidden, weight, grad


def _rel_err(got: torch.Tensor, ref64: torch.Tensor, abs_terms: torch.Tensor) -> float:
    """Largest error against float64, relative to the sum of |products| of each output (the
    scale a float32 GEMM's rounding error grows with, cancellation or not)."""
    return float(((got.double() - ref64).abs() / (abs_terms + 1e-30)).max())


def test_three_bf16_parts_hold_a_float32_value_exactly():
    x = torch.randn(200_000) * torch.exp(torch.randn(200_000) * 8)
    parts = RG.split_bf16(x)
    assert all(p.dtype == torch.bfloat16 for p in parts)
    assert torch.equal(sum(p.double() for p in parts), x.double())


def test_the_split_stays_exact_under_torch_compile():
    # inductor drops intermediate bf16 roundings inside a fused kernel; the split must not rely
    # on one (a rounding split reconstructs x exactly in eager mode and not when compiled)
    x = torch.randn(4096) * torch.exp(torch.randn(4096) * 8)
    torch._dynamo.reset()
    parts = torch.compile(RG.split_bf16)(x)
    assert torch.equal(sum(p.double() for p in parts), x.double())


def test_logits_match_float64_within_a_float32_gemm_error():
    hidden, weight, _ = _inputs()
    ref = hidden.double() @ weight.double().t()                       # (T, E)
    abs_terms = hidden.double().abs() @ weight.double().abs().t()
    got = RG.logits_split(hidden, weight)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    plain = torch.nn.functional.linear(hidden.float(), weight)       # the float32 GEMM
    assert _rel_err(got, ref, abs_terms) <= 4 * _rel_err(plain, ref, abs_terms)
    assert _rel_err(got, ref, abs_terms) < 2 ** -20


def test_grad_hidden_keeps_float32_accuracy_with_six_part_products():
    _, weight, grad = _inputs(1)
    ref = grad.double() @ weight.double()                             # (T, H)
    abs_terms = grad.double().abs() @ weight.double().abs()
    got = RG.grad_hidden_split(grad, weight)
    fp32 = _rel_err(grad @ weight, ref, abs_terms)
    assert _rel_err(got, ref, abs_terms) <= 4 * fp32
    # the third parts matter: two parts each are ~15-bit accurate, not float32
    g2, w2 = RG.split_bf16(grad, 2), RG.split_bf16(weight, 2)
    coarse = g2[0].float() @ w2[0].float() + (g2[0].float() @ w2[1].float() + g2[1].float() @ w2[0].float())
    assert _rel_err(coarse, ref, abs_terms) > 16 * fp32


def test_grad_weight_matches_float64_within_a_float32_gemm_error():
    hidden, _, grad = _inputs(2)
    ref = grad.double().t() @ hidden.double()                         # (E, H)
    abs_terms = grad.double().abs().t() @ hidden.double().abs()
    got = RG.grad_weight_split(grad, hidden)
    assert got.dtype == torch.float32
    assert _rel_err(got, ref, abs_terms) <= 4 * _rel_err(grad.t() @ hidden.float(), ref, abs_terms)


def test_split_function_backward_equals_the_float32_autograd_graph():
    hidden, weight, grad = _inputs(3)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    RG.SplitLogits.apply(h1, w1).backward(grad)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.nn.functional.linear(h2.float(), w2).backward(grad)         # float32 reference graph
    assert h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.float32
    # bf16 gradients: the same float32 value up to order, then one rounding -> at most 1 ulp apart
    diff = (h1.grad.float() - h2.grad.float()).abs()
    ulp = h2.grad.float().abs() * 2 ** -7 + 1e-30
    assert (diff <= ulp).all() and (diff == 0).float().mean() > 0.99
    ref = grad.double().t() @ hidden.double()
    abs_terms = grad.double().abs().t() @ hidden.double().abs()
    assert _rel_err(w1.grad, ref, abs_terms) <= 4 * _rel_err(w2.grad, ref, abs_terms)


def test_the_split_path_serves_bf16_activations_on_cuda_only():
    hidden, weight, _ = _inputs()
    assert not RG.use_split(hidden, weight)                           # CPU
    if torch.cuda.is_available():
        assert RG.use_split(hidden.cuda(), weight.cuda())
        assert not RG.use_split(hidden.float().cuda(), weight.cuda())
