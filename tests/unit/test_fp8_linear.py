"""The emulated FP8 linear (r1mega/precision/linear.py) against float64 math, and in the model.

The reference is the exact float64 product. FP8 rounding bounds the difference element by
element: each operand is off by at most u (relative; u = 2^-4 for e4m3, 2^-3 for e5m2) plus a
subnormal floor, so |fp8(a) . fp8(b) - a . b| <= (u_a + u_b + u_a u_b) (|a| . |b|) + floor.
"""
from __future__ import annotations

import pytest
import torch

from r1mega.precision.linear import Fp8LinearOps, fp8_linear, new_weight_generation
from r1mega.precision.policy import Fp8Policy

U = {"e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}
RECIPES = ["tensorwise", "rowwise", "blockwise"]


def _bound(a_abs, b_abs, ua, ub):
    return (ua + ub + ua * ub) * (a_abs @ b_abs) + 1e-3


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("grad_format", ["e4m3", "e5m2"])
def test_fp8_linear_forward_backward_within_format_error(recipe, grad_format):
    g = torch.Generator().manual_seed(1)
    T, K, N = 150, 260, 136                                   # ragged for every tile size
    x = torch.randn(T, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.05
    dy = torch.randn(T, N, generator=g, dtype=torch.float64)
    ops = Fp8LinearOps(Fp8Policy(recipe=recipe, backend="native", grad_format=grad_format,
                                 emulate=True))
    xr = x.float().requires_grad_()
    wr = w.float().requires_grad_()
    y = fp8_linear(xr, wr, None, ops)                          # (T, N)
    y.backward(dy.float())
    ue, ug = U["e4m3"], U[grad_format]
    y_ref = x @ w.t()
    err = (y.double() - y_ref).abs()
    assert bool((err <= _bound(x.abs(), w.abs().t(), ue, ue)).all())
    # not bf16 in disguise: FP8 rounding is visible, and of the format's size
    rel = (err.norm() / y_ref.norm()).item()
    assert 1e-3 < rel < 0.06
    dx_ref, dw_ref = dy @ w, dy.t() @ x
    assert bool(((xr.grad.double() - dx_ref).abs() <= _bound(dy.abs(), w.abs(), ug, ue)).all())
    assert bool(((wr.grad.double() - dw_ref).abs() <= _bound(dy.abs().t(), x.abs(), ug, ue)).all())
    for got, ref in ((xr.grad, dx_ref), (wr.grad, dw_ref)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 0.12


def test_fp8_linear_3d_input_and_bias():
    ops = Fp8LinearOps(Fp8Policy(recipe="blockwise", backend="native", emulate=True))
    x = torch.randn(5, 3, 128, requires_grad=True)             # (S, B, in) as megatron passes it
    w = torch.randn(256, 128, requires_grad=True)
    b = torch.randn(256, requires_grad=True)
    y = fp8_linear(x, w, b, ops)
    assert y.shape == (5, 3, 256)
    flat = fp8_linear(x.detach().reshape(15, 128), w.detach(), None, ops)
    torch.testing.assert_close(y.detach().reshape(15, 256), flat + b.detach())
    y.sum().backward()
    torch.testing.assert_close(b.grad, torch.full((256,), 15.0))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_weight_quantised_once_per_pass_and_after_updates():
    ops = Fp8LinearOps(Fp8Policy(recipe="rowwise", backend="native", emulate=True))
    w = torch.randn(64, 48, requires_grad=True)
    new_weight_generation()
    for _ in range(3):                                         # three micro-batches
        fp8_linear(torch.randn(10, 48), w, None, ops).sum().backward()
    assert ops.cache.quantizations == 2                        # forward copy + dgrad copy
    new_weight_generation()                                    # the next pass (after an update)
    fp8_linear(torch.randn(10, 48), w, None, ops).sum().backward()
    assert ops.cache.quantizations == 4
    with torch.no_grad():
        w.mul_(2.0)                                            # an in-place update mid-pass
    data = ops.cache._entries["fwd"][1].data
    y = fp8_linear(torch.ones(1, 48), w, None, ops)
    assert ops.cache.quantizations == 5
    assert ops.cache._entries["fwd"][1].data is data             # refreshed in place
    ref = torch.ones(1, 48) @ w.detach().t()
    assert ((y - ref).abs() <= 0.13 * (w.detach().abs().sum(1)) + 1e-3).all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_weight_pair_from_one_read_equals_separate_quantisations(recipe):
    """get_pair (the training forward's w and w.T copies from one read of w: quantize_dual for
    tensorwise, the FP8 bytes of w's 128x128 blocks transposed for blockwise) against the
    reference quantiser run on w and on w.t() separately, bit for bit; ragged block edges."""
    from r1mega.precision.linear import RECIPE_GRANULARITY
    from r1mega.precision.quantize import quantize_reference

    gran = RECIPE_GRANULARITY[recipe][1]
    w = torch.randn(200, 330, generator=torch.Generator().manual_seed(4)) * 0.05
    w[:128, :128] *= 40.0                                      # blocks of different scales
    ops = Fp8LinearOps(Fp8Policy(recipe=recipe, backend="native", emulate=True))
    new_weight_generation()
    fwd = ops.cache.get_pair(w, ops.policy)
    assert ops.cache.quantizations == (1 if gran in ("tensor", "block") else 2)
    dgrad = ops.cache.get(w, "dgrad", ops.policy)              # a hit: no second read
    assert ops.cache.get_pair(w, ops.policy) is fwd
    assert ops.cache.quantizations == (1 if gran in ("tensor", "block") else 2)
    for got, src in ((fwd, w), (dgrad, w.t())):
        ref = quantize_reference(src, gran, "e4m3", ops.policy.power2_scales)
        assert got.data.shape == ref.data.shape and got.data.is_contiguous()
        assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
        assert torch.equal(got.scale, ref.scale)
    with torch.no_grad():
        w.mul_(0.5)                                            # an update: both refreshed in place
    data = (fwd.data, dgrad.data)
    assert ops.cache.get_pair(w, ops.policy).data is data[0]
    assert ops.cache.get(w, "dgrad", ops.policy).data is data[1]
    ref = quantize_reference(w.t(), gran, "e4m3", ops.policy.power2_scales)
    assert torch.equal(data[1].view(torch.uint8), ref.data.view(torch.uint8))


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
@pytest.mark.parametrize("pad", [1, 128])
def test_dual_quantisation_path_equals_separate_passes(recipe, pad):
    """The path that quantises x and dy once for both layouts (ops.dual: x.T kept in FP8 for
    wgrad) against the separate quantisations of each GEMM's operands, same inputs. pad=128 is
    the GPU's blockwise token padding: zero rows, which change no scale and no product."""
    g = torch.Generator().manual_seed(3)
    T, K, N = 150, 260, 136
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(T, N, generator=g)
    grads = {}
    for dual in (True, False):
        ops = Fp8LinearOps(Fp8Policy(recipe=recipe, backend="native", emulate=True))
        assert ops.dual
        ops.dual = dual
        ops.wgrad_token_multiple = pad
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, None, ops)
        y.backward(dy)
        grads[dual] = (y.detach(), xr.grad, wr.grad)
    for got, ref in zip(grads[True], grads[False]):
        if pad == 1:
            assert torch.equal(got, ref)
        else:   # the padded wgrad contraction may sum in another order
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dual_path_keeps_fp8_xt_not_x():
    ops = Fp8LinearOps(Fp8Policy(recipe="tensorwise", backend="native", emulate=True))
    x = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=True)
    y = fp8_linear(x, w, None, ops)
    saved = y.grad_fn.saved_tensors
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    assert any(t.dtype == torch.float8_e4m3fn and t.shape == (64, 32) for t in saved)
    with torch.no_grad():                                      # rollout: nothing kept for wgrad
        assert fp8_linear(x, w, None, ops).grad_fn is None
    assert not Fp8LinearOps(Fp8Policy(recipe="rowwise", backend="native", emulate=True)).dual


# ----------------------------------------------------------------------------- in the model

def _fp8_precision(**kw):
    from r1mega.config import PrecisionConfig

    return PrecisionConfig(dtype="fp32", fp8=True, fp8_emulate=True, fp8_backend="native", **kw)


def test_model_uses_fp8_linears_where_the_policy_says(single_rank_runtime):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear

    prec = _fp8_precision(fp8_recipe="tensorwise", fp8_bf16_first_layers=1, fp8_bf16_last_layers=1)
    rt = single_rank_runtime(precision=prec)
    cfg = ModelConfig(num_layers=4)
    model = build_model(cfg, rt, prec, wrap=False)[0]
    kinds = []
    for layer in model.decoder.layers:
        lin = [m for m in layer.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
        assert len(lin) == 4                                   # qkv, proj, fc1, fc2
        kinds.append({isinstance(m, (Fp8ColumnParallelLinear, Fp8RowParallelLinear)) for m in lin})
    assert kinds == [{False}, {True}, {True}, {False}]
    assert not isinstance(model.output_layer, Fp8ColumnParallelLinear)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_model_close_to_fp32_model_and_trains(single_rank_runtime, recipe):
    from r1mega.config import ModelConfig, OptimizerConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    prec = _fp8_precision(fp8_recipe=recipe)
    rt = single_rank_runtime(precision=prec)
    cfg = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=256, vocab_size=128)
    torch.manual_seed(0)
    fp8_chunks = build_model(cfg, rt, prec, wrap=True)
    ref = build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)[0]
    ref.load_state_dict(fp8_chunks[0].module.state_dict(), strict=False)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = fp8_chunks[0](input_ids=ids, position_ids=None, attention_mask=None)
        b = ref(input_ids=ids, position_ids=None, attention_mask=None)
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < 0.05, rel

    optim = build_optimizer(OptimizerConfig(lr=3e-3), fp8_chunks, rt, distributed=True)
    step = TrainStep(fp8_chunks, optim, rt, micro_batch_tokens=64)
    samples = [sft_sample(ids[i]) for i in range(2)]
    losses = [step(samples, sft_loss_fn(cfg.vocab_size)).loss for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_fp8_state_is_derived_never_saved(single_rank_runtime):
    """Checkpoints stay bf16/fp32: an FP8 model (and FP8 rollout copies) has exactly the bf16
    model's state-dict keys, dtypes and shapes; no FP8 tensor is ever part of it."""
    from r1mega.config import ModelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.rollout import Fp8RolloutWeights

    prec = _fp8_precision(fp8_recipe="blockwise")
    rt = single_rank_runtime(precision=prec)
    cfg = ModelConfig(num_layers=2)
    fp8_model = build_model(cfg, rt, prec, wrap=False)[0]
    plain = build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)[0]
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    fp8_model(input_ids=ids, position_ids=None, attention_mask=None).sum().backward()  # fill caches
    rollout = Fp8RolloutWeights(plain, Fp8Policy(recipe="rowwise", backend="native", emulate=True))
    rollout.refresh()

    def summary(m):
        return {k: (v.dtype, tuple(v.shape)) for k, v in m.state_dict().items()
                if isinstance(v, torch.Tensor)}

    assert summary(fp8_model) == summary(plain)
    assert not any(d in (torch.float8_e4m3fn, torch.float8_e5m2) for d, _ in summary(plain).values())


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_linear_compiles_whole_and_steps_without_recompiling(recipe):
    """torch.compile sees the FP8 linear as two custom ops: one graph (no break), the same
    numbers as eager, and no recompile when the weight changes between steps (the weight
    cache's keys stay out of dynamo's guards)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    ops = Fp8LinearOps(Fp8Policy(recipe=recipe, backend="native", emulate=True))

    def block(x, w):
        return torch.nn.functional.silu(fp8_linear(x * 0.5, w, None, ops)).sum()

    explain = torch._dynamo.explain(block)(torch.randn(16, 256), torch.randn(128, 256))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(128, 256, generator=g, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    for _ in range(3):
        x = torch.randn(16, 256, generator=g)
        new_weight_generation()
        out, ref = compiled(x, w), block(x, w_ref)
        out.backward()
        ref.backward()
        assert torch.equal(out, ref) and torch.equal(w.grad, w_ref.grad)
        with torch.no_grad():                                  # an optimizer step
            for p in (w, w_ref):
                p.sub_(0.1 * p.grad)
                p.grad = None
    assert counter.frame_count == 1


def test_compiled_tensorwise_linear_takes_its_amaxes_from_the_graph(monkeypatch):
    """Compiled and tensorwise, the FP8 linear gets max |x| (forward) and max |dy| (backward) as
    graph values (which inductor may fuse into the ops that make x and dy) instead of reading
    x and dy again; eager it computes them itself. Both give the same bits."""
    from r1mega.precision import linear as lin

    torch._dynamo.reset()
    seen = []
    fwd, bwd = lin.Fp8LinearOps.forward_keep_xt, lin.Fp8LinearOps.backward_from_xt

    def record_fwd(self, x2, weight, x_amax=None):
        seen.append(("x", None if x_amax is None else float(x_amax), float(x2.abs().max())))
        return fwd(self, x2, weight, x_amax)

    def record_bwd(self, dy2, weight, xt, need_wgrad, out_dtype, dy_amax=None):
        seen.append(("dy", None if dy_amax is None else float(dy_amax), float(dy2.abs().max())))
        return bwd(self, dy2, weight, xt, need_wgrad, out_dtype, dy_amax)

    monkeypatch.setattr(lin.Fp8LinearOps, "forward_keep_xt", record_fwd)
    monkeypatch.setattr(lin.Fp8LinearOps, "backward_from_xt", record_bwd)
    ops = Fp8LinearOps(Fp8Policy(recipe="tensorwise", backend="native", emulate=True))

    def block(x, w):
        return (torch.nn.functional.silu(fp8_linear(torch.nn.functional.silu(x), w, None, ops)) ** 2).sum()

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(48, 256, generator=g), torch.randn(128, 256, generator=g)
    results = {}
    for name, fn in (("eager", block), ("compiled", torch.compile(block, backend="aot_eager"))):
        seen.clear()
        wp = w.clone().requires_grad_()
        out = fn(x, wp)
        out.backward()
        results[name] = (out.detach(), wp.grad, list(seen))
    assert torch.equal(results["eager"][0], results["compiled"][0])
    assert torch.equal(results["eager"][1], results["compiled"][1])
    assert [(k, given) for k, given, _ in results["eager"][2]] == [("x", None), ("dy", None)]
    assert [k for k, _, _ in results["compiled"][2]] == ["x", "dy"]
    assert all(given == true for _, given, true in results["compiled"][2])  # the exact max
    # R1MEGA_FP8_GRAPH=0: the Triton kernels compiled too; a wrong value is refused
    monkeypatch.setenv("R1MEGA_FP8_GRAPH", "0")
    torch._dynamo.reset()
    seen.clear()
    wp = w.clone().requires_grad_()
    torch.compile(block, backend="aot_eager")(x, wp).backward()
    assert [(k, given) for k, given, _ in seen] == [("x", None), ("dy", None)]
    assert torch.equal(wp.grad, results["eager"][1])
    monkeypatch.setenv("R1MEGA_FP8_GRAPH", "yes")
    with pytest.raises(ValueError, match="R1MEGA_FP8_GRAPH='yes'"):
        lin.graph_side_enabled()


def test_op_layout_argument_tells_recipes_apart():
    """Inductor caches compiled graphs on disk by their text; the op's outputs are laid out by
    the recipe, so the recipe's layout must be in the graph (a blockwise run once reused a
    tensorwise graph's stride checks from the cache and failed)."""
    from r1mega.precision.linear import _layout

    lay = {r: _layout(Fp8LinearOps(Fp8Policy(recipe=r, backend="native")), False)
           for r in ("tensorwise", "blockwise")}
    assert lay["tensorwise"] != lay["blockwise"]
    emu = _layout(Fp8LinearOps(Fp8Policy(recipe="blockwise", backend="native", emulate=True)), False)
    assert emu != lay["blockwise"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_custom_ops_fake_kernels_match_the_real_ones(recipe):
    """torch.library.opcheck: schema, autograd registration, and the fake (meta) kernels'
    shapes and strides against the real outputs, forward and backward, with x.T kept and not.
    (Its aot_dispatch test would sum the FP8 outputs, which torch cannot do on the CPU.)"""
    from r1mega.precision.linear import _fp8_linear_backward_op, _fp8_linear_op, _layout

    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    ops = Fp8LinearOps(Fp8Policy(recipe=recipe, backend="native", emulate=True))
    x = torch.randn(3, 5, 256, requires_grad=True)            # (S, B, in), 15 tokens
    w = torch.randn(128, 256, requires_grad=True)
    for keep in ((True, False) if ops.dual else (False,)):
        args = (x, w, ops.op_id, False, False, keep, _layout(ops, False))
        torch.library.opcheck(_fp8_linear_op, args, test_utils=checks)
        _, data, scale = _fp8_linear_op(*args)
        dy = torch.randn(3, 5, 128)
        for need_wgrad in (True, False):
            bargs = (dy, w.detach(), data if keep else x.detach(), scale, ops.op_id, False, False,
                     keep, need_wgrad)
            # (test_schema compares inputs by arithmetic, which float8 has none of on the CPU)
            torch.library.opcheck(_fp8_linear_backward_op, bargs, test_utils=("test_faketensor",))


def test_a_stale_copy_of_another_layout_is_replaced_not_written_into():
    """The cache writes a refresh into the stale copy only where it fits (same shape, format and
    scale layout); a weight that changed shape gets new tensors and the reference's values."""
    from r1mega.precision.quantize import quantize_reference

    ops = Fp8LinearOps(Fp8Policy(recipe="blockwise", backend="native", emulate=True))
    new_weight_generation()
    old = ops.cache.get_pair(torch.randn(256, 384), ops.policy)
    w = torch.randn(128, 384)
    new_weight_generation()
    got = ops.cache.get_pair(w, ops.policy)
    assert got is not old and got.data.shape == (128, 384)
    ref = quantize_reference(w, "block", "e4m3", ops.policy.power2_scales)
    assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(got.scale, ref.scale)


@pytest.mark.parametrize("form", ["flat", "rows"])
def test_every_graph_amax_form_is_the_exact_max_magnitude(form, monkeypatch):
    """R1MEGA_FP8_GRAPH_AMAX picks how the in-graph amax is written (for inductor's fusion);
    each form is torch's max |t| to the bit, a NaN anywhere gives NaN, and the compiled FP8
    linear gives the same output and weight gradient under every form."""
    from r1mega.precision import linear as lin

    g = torch.Generator().manual_seed(11)
    t = (torch.randn(3, 40, 96, generator=g) * 7).to(torch.bfloat16)
    t[1, 5, 7] = -300.0  # the largest magnitude is negative
    got = lin.graph_amax_of(t, form)
    assert got.dtype == torch.float32 and got.shape == (1,)
    assert torch.equal(got, t.float().abs().amax().reshape(1))
    t[2, 0, 1] = float("inf")
    assert torch.isinf(lin.graph_amax_of(t, form)).all()
    t[0, 3, 3] = float("nan")
    assert torch.isnan(lin.graph_amax_of(t, form)).all()
    with pytest.raises(ValueError, match="unknown form"):
        lin.graph_amax_of(t, "rowz")

    ops = Fp8LinearOps(Fp8Policy(recipe="tensorwise", backend="native", emulate=True))
    x, w = torch.randn(48, 256, generator=g), torch.randn(128, 256, generator=g)

    def block(x, w):
        return (torch.nn.functional.silu(fp8_linear(torch.nn.functional.silu(x), w, None, ops)) ** 2).sum()

    forms, real = [], lin.graph_amax_of

    def spy(t, f):
        forms.append((f, tuple(t.shape)))
        return real(t, f)

    monkeypatch.setattr(lin, "graph_amax_of", spy)
    results = {}
    for f in ("flat", form):
        monkeypatch.setenv("R1MEGA_FP8_GRAPH_AMAX", f)
        torch._dynamo.reset()
        forms.clear()
        wp = w.clone().requires_grad_()
        out = torch.compile(block, backend="aot_eager")(x, wp)
        out.backward()
        # the switch's form traced into the graph: x's amax in the forward (dy's in the backward
        # too, unless an earlier test's backward graph came from the cache)
        assert (f, (48, 256)) in forms and {k for k, _ in forms} == {f}
        results[f] = (out.detach(), wp.grad)
    assert torch.equal(results["flat"][0], results[form][0])
    assert torch.equal(results["flat"][1], results[form][1])
    monkeypatch.setenv("R1MEGA_FP8_GRAPH_AMAX", "rowz")
    with pytest.raises(ValueError, match="R1MEGA_FP8_GRAPH_AMAX='rowz'"):
        lin._graph_amax(t)
