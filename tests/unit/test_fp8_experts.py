"""FP8 MoE experts (r1mega/precision/grouped.py, precision.fp8_experts), emulated on the CPU.

The reference is float64 math. Rowwise e4m3 rounding bounds each product term: every operand is
off by at most u = 2^-4 relative (plus a subnormal floor), so per output element
|fp8(a) . fp8(b) - a . b| <= (2u + u^2) (|a| . |b|) + floor. The weight gradient stays in the
working precision: it equals dy_e.T @ x_e per group exactly up to float32 summation.
"""
from __future__ import annotations

import pytest
import torch

from r1mega.config import ConfigError, PrecisionConfig
from r1mega.precision.grouped import Fp8GroupedOps, fp8_grouped_linear, grouped_scaled_gemm
from r1mega.precision.linear import new_weight_generation
from r1mega.precision.policy import Fp8Policy, resolve_fp8_policy

U = 2.0 ** -4


def _policy(**kw):
    return Fp8Policy(recipe=kw.pop("recipe", "rowwise"), backend="native", emulate=True,
                     experts=True, **kw)


def _reference(x, w, ends):
    """float64 y, per group: rows [ends[g-1], ends[g]) times w[g].T; the tail stays zero."""
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    start = 0
    for g, end in enumerate(ends.tolist()):
        y[start:end] = x[start:end].double() @ w[g].double().t()
        start = end
    return y


def _abs_product(x, w, ends):
    return _reference(x.abs(), w.abs(), ends)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
def test_grouped_linear_forward_backward_within_e4m3_error(recipe):
    g = torch.Generator().manual_seed(0)
    E, K, N = 4, 48, 40
    counts = [5, 0, 9, 3]                               # an empty expert
    R = sum(counts) + 2                                 # two padding rows past the last group
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(R, K, generator=g, dtype=torch.float64)
    x[-2:] = 0                                          # the dispatcher's zero padding rows
    w = torch.randn(E, N, K, generator=g, dtype=torch.float64) * 0.1
    dy = torch.randn(R, N, generator=g, dtype=torch.float64)
    dy[-2:] = 0
    ops = Fp8GroupedOps(_policy(recipe=recipe))
    new_weight_generation()
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    y = fp8_grouped_linear(xr, wr, ends, ops)
    y.backward(dy.float())
    floor = 1e-3
    assert ((y.double() - _reference(x, w, ends)).abs()
            <= (2 * U + U * U) * _abs_product(x, w, ends) + floor).all()
    assert y[-2:].eq(0).all()
    # dx = dy @ w_e per group; the bound with |dy| . |w_e|
    wt = w.transpose(1, 2)
    assert ((xr.grad.double() - _reference(dy, wt, ends)).abs()
            <= (2 * U + U * U) * _reference(dy.abs(), wt.abs(), ends) + floor).all()
    # dW_e = dy_e.T @ x_e, not quantised
    start, ref = 0, torch.zeros_like(w)
    for e, end in enumerate(ends.tolist()):
        ref[e] = dy[start:end].t() @ x[start:end]
        start = end
    torch.testing.assert_close(wr.grad.double(), ref, rtol=1e-5, atol=1e-5)
    assert wr.grad[1].eq(0).all()                       # the empty expert gets no gradient


def test_fp8_moves_the_result_like_fp8_should():
    """The emulation really quantises: y differs from the float result by FP8-sized amounts,
    not by zero (a path that skipped quantisation would pass the bound test)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, generator=g)
    w = torch.randn(2, 24, 32, generator=g)
    ends = torch.tensor([7, 16], dtype=torch.int32)
    y = fp8_grouped_linear(x, w, ends, Fp8GroupedOps(_policy()))
    rel = ((y.double() - _reference(x, w, ends)).abs().max() / _reference(x, w, ends).abs().max())
    assert 1e-4 < rel.item() < 0.1


def test_weight_copies_cached_per_pass_and_refreshed_after_updates():
    ops = Fp8GroupedOps(_policy())
    w = torch.randn(3, 16, 32, requires_grad=True)
    ends = torch.tensor([4, 4, 10], dtype=torch.int32)
    new_weight_generation()
    for _ in range(3):                                  # three micro-batches of one pass
        fp8_grouped_linear(torch.randn(10, 32, requires_grad=True), w, ends, ops).sum().backward()
    assert ops.cache.quantizations == 2                 # forward copy + dgrad copy
    with torch.no_grad():
        w.mul_(2.0)                                     # an update mid-pass: _version moves
    x = torch.randn(10, 32)
    y = fp8_grouped_linear(x, w, ends, ops)
    assert ops.cache.quantizations == 3
    ref = _reference(x, w.detach(), ends)
    assert ((y.double() - ref).abs() <= (2 * U + U * U) * _abs_product(x, w.detach(), ends) + 1e-3).all()


def test_scaled_grouped_gemm_layout_accepted_by_torch_meta():
    """The CUDA call's operands in the layouts torch's meta function checks (row-major a,
    column-major b, 1-D scale_a, (E, N) scale_b, int32 offsets), on meta tensors."""
    from r1mega.precision.quantize import Fp8Tensor

    R, E, N, K = 64, 4, 48, 32
    a = Fp8Tensor(torch.empty(R, K, dtype=torch.float8_e4m3fn, device="meta"),
                  torch.empty(R, 1, device="meta"), "row", "e4m3")
    b = Fp8Tensor(torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device="meta"),
                  torch.empty(E, N, device="meta"), "row", "e4m3")
    ends = torch.empty(E, dtype=torch.int32, device="meta")
    out = grouped_scaled_gemm(a, b, ends, torch.bfloat16, emulate=False)
    assert out.shape == (R, N) and out.dtype == torch.bfloat16


def test_policy_checks_name_the_key():
    with pytest.raises(ConfigError, match="precision.fp8_experts=true needs precision.fp8=true"):
        resolve_fp8_policy(PrecisionConfig(fp8_experts=True), "cpu")
    with pytest.raises(ConfigError, match="fp8_grad_format=e5m2"):
        resolve_fp8_policy(PrecisionConfig(fp8=True, fp8_emulate=True, fp8_backend="native",
                                           fp8_experts=True, fp8_grad_format="e5m2"), "cpu")
    with pytest.raises(ConfigError, match="native backend only"):
        resolve_fp8_policy(PrecisionConfig(fp8=True, fp8_backend="te", fp8_recipe="current",
                                           fp8_experts=True), "cuda", te_available=True)
    with pytest.raises(ConfigError, match="precision.fp8=true"):   # CPU without emulation
        resolve_fp8_policy(PrecisionConfig(fp8=True, fp8_backend="native", fp8_experts=True), "cpu")
    pol = resolve_fp8_policy(PrecisionConfig(fp8=True, fp8_emulate=True, fp8_backend="native",
                                             fp8_experts=True), "cpu")
    assert pol.experts


def test_fp8_experts_model_builds_and_trains(single_rank_runtime):
    """precision.fp8_experts: the MoE layers' routed and shared experts carry FP8 ops, no bf16
    warning, and a few emulated FP8 steps lower the loss."""
    import warnings

    from r1mega.models.gpt import build_model
    from tests.unit.test_moe_model import moe_model

    prec = PrecisionConfig(dtype="fp32", fp8=True, fp8_emulate=True, fp8_backend="native",
                           fp8_recipe="tensorwise", fp8_experts=True)
    rt = single_rank_runtime(precision=prec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunks = build_model(moe_model(moe_shared_expert_ffn_hidden_size=32), rt, prec, wrap=False)
    assert not any("stay bf16" in str(w.message) for w in caught)
    model = chunks[0]
    experts = [m for m in model.modules() if type(m).__name__ == "GroupedExperts"]
    shared = [m for m in model.modules() if type(m).__name__ == "SwiGLUMLP"]
    assert experts and all(m.fp8_ops is not None for m in experts)
    assert shared and all(m.fp8_ops is not None for m in shared)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (1, 32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        new_weight_generation()
        logits = model(input_ids=ids, position_ids=None, attention_mask=None)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for m in experts for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fp8_experts_under_compiled_layers_equal_eager(single_rank_runtime):
    """model.compile_layers with FP8 experts: a forward-only pass (traces the routed experts)
    and a training pass (routed experts eager) give eager's logits and expert gradients."""
    from r1mega.models.compile import compile_layers
    from r1mega.models.gpt import build_model
    from tests.unit.test_moe_model import moe_model

    prec = PrecisionConfig(dtype="fp32", fp8=True, fp8_emulate=True, fp8_backend="native",
                           fp8_recipe="tensorwise", fp8_experts=True)
    rt = single_rank_runtime(precision=prec)
    cfg = moe_model(moe_shared_expert_ffn_hidden_size=32)
    compiled, eager = (build_model(cfg, rt, prec, wrap=False)[0] for _ in range(2))
    eager.load_state_dict(compiled.state_dict())
    compile_layers([compiled])
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    new_weight_generation()
    run = lambda m: m(input_ids=ids, position_ids=None, attention_mask=None)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(run(compiled), run(eager), rtol=1e-5, atol=1e-5)
    for m in (compiled, eager):
        run(m).float().logsumexp(-1).mean().backward()
    for layer_c, layer_e in zip(compiled.decoder.layers, eager.decoder.layers):
        for name in ("gate_up", "down"):
            gc = getattr(layer_c.mlp.experts, name).grad
            ge = getattr(layer_e.mlp.experts, name).grad
            assert gc is not None and gc.abs().max() > 0
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-8)
