"""The router's float32 product on bf16 tensor cores (r1mega/moe/router_gemm.py) on the GPU:
as accurate as the float32 GEMM it replaces, the same logits with and without a graph, and
traceable by torch.compile (the layers are compiled in training)."""
from __future__ import annotations

import pytest
import torch

from r1mega.moe.router import router_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

T, H, E = 8192, 2048, 64


def _inputs(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
    weight = torch.randn(E, H, generator=g, device="cuda") * 0.02
    grad = torch.randn(T, E, generator=g, device="cuda")
    return hidden, weight, grad


def _rel_err(got, ref64, abs_terms):
    return float(((got.double() - ref64).abs() / (abs_terms + 1e-30)).max())


def test_logits_and_grads_are_as_accurate_as_the_float32_gemm():
    assert not torch.backends.cuda.matmul.allow_tf32
    hidden, weight, grad = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = router_logits(h, w)
    logits.backward(grad)
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = torch.nn.functional.linear(h32.float(), w32)               # the float32 GEMM
    plain.backward(grad)

    ref = hidden.double() @ weight.double().t()
    terms = hidden.double().abs() @ weight.double().abs().t()
    assert _rel_err(logits, ref, terms) <= 4 * _rel_err(plain, ref, terms) + 2 ** -23
    ref = grad.double().t() @ hidden.double()
    terms = grad.double().abs().t() @ hidden.double().abs()
    assert _rel_err(w.grad, ref, terms) <= 4 * _rel_err(w32.grad, ref, terms) + 2 ** -23
    diff = (h.grad.float() - h32.grad.to(torch.bfloat16).float()).abs()
    assert (diff <= h32.grad.abs() * 2 ** -7).all() and (diff == 0).float().mean() > 0.99


def test_forward_only_passes_route_on_the_same_logits():
    hidden, weight, _ = _inputs(1)
    with torch.no_grad():
        eval_logits = router_logits(hidden, weight)
    train_logits = router_logits(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    assert torch.equal(eval_logits, train_logits.detach())


def test_compiled_matches_eager():
    hidden, weight, grad = _inputs(2)

    def step(h, w):
        out = router_logits(h, w)
        out.backward(grad)
        return out.detach(), h.grad, w.grad

    eager = step(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    torch._dynamo.reset()
    compiled = torch.compile(step)(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    for a, b in zip(eager, compiled):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5)
