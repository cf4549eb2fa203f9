"""max |w| from the optimizer's step (LeanAdamW.track_amax / weight_amax) and the tensorwise FP8
weight cache that takes it instead of a pass over the weight. The independent reference of the
amax is torch's ``abs().amax()`` of the weight as the step left it; of the cache, the same cache
without the optimizer's amax (its own pass), byte for byte."""
from __future__ import annotations

import pytest
import torch

from r1mega.precision.linear import Fp8WeightCache
from r1mega.precision.policy import Fp8Policy
from r1mega.train.lean_adam import LeanAdamW
from r1mega.train.lean_adam_math import amax_bits


def _params(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).bfloat16())
    b = torch.nn.Parameter((torch.randn(7, 5, generator=g) * 3).bfloat16())
    return a, b


def _grads(params, g):
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).bfloat16()


def _torch_amax(p) -> torch.Tensor:
    return p.detach().float().abs().amax().reshape(1)


@pytest.mark.parametrize("mode", ["bf16_remainder", "bf16_stochastic"])
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_the_step_reports_the_amax_of_the_weight_it_wrote(mode, moments):
    a, b = _params()
    opt = LeanAdamW([a, b], lr=1e-2, weight_decay=0.1, master_weights=mode, moments_dtype=moments)
    opt.track_amax(b)
    assert opt.weight_amax(b) is None            # no step yet
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        _grads((a, b), g)
        before = b.detach().clone()
        opt.step()
        assert not torch.equal(b.detach(), before)
        got = opt.weight_amax(b)
        assert got.dtype == torch.float32 and torch.equal(got, _torch_amax(b))
    assert opt.weight_amax(a) is None            # not tracked


def test_a_weight_the_step_passes_over_keeps_its_amax():
    """A tracked weight without a gradient in a step keeps the amax of its last step, and one
    tracked later gets its own from the next step on."""
    a, b = _params()
    opt = LeanAdamW([a, b], lr=1e-2, master_weights="bf16_remainder")
    opt.track_amax(a)
    opt.track_amax(b)
    g = torch.Generator().manual_seed(2)
    _grads((a, b), g)
    opt.step()
    b_amax = _torch_amax(b)
    assert torch.equal(opt.weight_amax(b), b_amax)
    a.grad = torch.randn(a.shape, generator=g).bfloat16() * 50
    b.grad = None                                 # b is not stepped
    opt.step()
    assert torch.equal(opt.weight_amax(a), _torch_amax(a))
    assert torch.equal(opt.weight_amax(b), b_amax) and torch.equal(b_amax, _torch_amax(b))
    c = torch.nn.Parameter(torch.ones(4).bfloat16())
    opt.add_param_group({"params": [c]})
    opt.track_amax(c)
    assert opt.weight_amax(c) is None
    _grads((a, b, c), g)
    opt.step()
    assert all(torch.equal(opt.weight_amax(p), _torch_amax(p)) for p in (a, b, c))


def test_a_skipped_step_reports_the_unchanged_weight():
    a, b = _params()
    opt = LeanAdamW([a, b], lr=1e-2)
    opt.track_amax(a)
    g = torch.Generator().manual_seed(2)
    _grads((a, b), g)
    opt.step()
    kept = a.detach().clone()
    _grads((a, b), g)
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(a.detach(), kept)
    assert torch.equal(opt.weight_amax(a), _torch_amax(kept))


def test_a_nan_weight_gives_a_nan_amax_and_inf_stays_inf():
    a, b = _params()
    opt = LeanAdamW([a, b], lr=1e-2)
    opt.track_amax(a)
    opt.track_amax(b)
    a.grad = torch.zeros_like(a)
    a.grad[17] = float("nan")
    b.grad = torch.zeros_like(b)
    opt.step()
    assert torch.isnan(a.detach()[17]) and torch.isnan(opt.weight_amax(a)).all()
    with torch.no_grad():
        b[2, 3] = float("-inf")
    assert torch.equal(amax_bits(b).view(torch.float32), torch.tensor([float("inf")]))


def test_a_write_outside_the_step_drops_the_amax():
    a, b = _params()
    opt = LeanAdamW([a, b], lr=1e-2)
    opt.track_amax(a)
    _grads((a, b), torch.Generator().manual_seed(3))
    opt.step()
    assert opt.weight_amax(a) is not None
    with torch.no_grad():
        a.copy_(a * 4)                            # a load through the parameter: a new version
    assert opt.weight_amax(a) is None
    _grads((a, b), torch.Generator().manual_seed(4))
    opt.step()
    assert torch.equal(opt.weight_amax(a), _torch_amax(a))
    opt.reset_remainders()                        # a weights-only load (possibly through .data)
    assert opt.weight_amax(a) is None


def test_track_amax_refuses_what_it_cannot_serve():
    a, b = _params()
    opt = LeanAdamW([a], lr=1e-2)
    with pytest.raises(ValueError, match="not one this optimizer steps"):
        opt.track_amax(b)
    w = torch.nn.Parameter(torch.randn(8))
    fp32 = LeanAdamW([w], lr=1e-2, master_weights="fp32")
    with pytest.raises(ValueError, match="only bf16 parameters"):
        fp32.track_amax(w)


def test_the_cache_quantises_with_the_given_amax_to_the_same_bytes():
    policy = Fp8Policy(recipe="tensorwise", backend="native", emulate=True)
    w = (torch.randn(48, 80, generator=torch.Generator().manual_seed(5)) * 0.3).bfloat16()
    own, given = Fp8WeightCache(), Fp8WeightCache()
    given.amax_source = lambda weight: _torch_amax(weight)
    for which in ("fwd", "dgrad"):
        q0, q1 = own.get(w, which, policy), given.get(w, which, policy)
        assert torch.equal(q0.data.view(torch.uint8), q1.data.view(torch.uint8))
        assert torch.equal(q0.scale, q1.scale)
    assert given.given_amaxes == 2 and own.given_amaxes == 0
    pair = Fp8WeightCache()
    pair.amax_source = given.amax_source
    q = pair.get_pair(w, policy)
    assert torch.equal(q.data.view(torch.uint8), own.get(w, "fwd", policy).data.view(torch.uint8))
    # The amax given is the one used: twice the true amax halves the scale's multiplier.
    wrong = Fp8WeightCache()
    wrong.amax_source = lambda weight: _torch_amax(weight) * 2
    assert torch.equal(wrong.get(w, "fwd", policy).scale, own.get(w, "fwd", policy).scale * 2)
    # None (no step yet, or a stale amax): the cache's own pass.
    none = Fp8WeightCache()
    none.amax_source = lambda weight: None
    assert torch.equal(none.get(w, "fwd", policy).scale, own.get(w, "fwd", policy).scale)
    assert none.given_amaxes == 0


def caches_took_the_steps_amax(layers: list, seen: list) -> None:
    """Each FP8 layer's forward copy was quantised with a given amax, to the bytes the reference
    quantiser makes of ``seen`` (the weights that forward read), with its own amax."""
    from r1mega.precision.quantize import quantize_reference

    for m, w in zip(layers, seen):
        assert m.fp8_ops.cache.given_amaxes > 0
        ref = quantize_reference(w, "tensor", "e4m3")
        hit = m.fp8_ops.cache._entries["fwd"][1]
        assert torch.equal(hit.data.view(torch.uint8), ref.data.view(torch.uint8))
        assert torch.equal(hit.scale.reshape(1), ref.scale.reshape(1))


def test_a_training_step_feeds_the_fp8_weight_caches(single_rank_runtime, monkeypatch):
    """build_optimizer wires every tensorwise FP8 layer to the lean optimizer; after a step the
    caches quantise with its amax, to the bytes of their own pass."""
    monkeypatch.setenv("R1MEGA_FP8_WEIGHT_AMAX", "1")
    from tests.unit.test_lean_adam_model import _setup

    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.precision.linear import Fp8LinearOps

    chunks, bundle, one = _setup(single_rank_runtime, master_weights="bf16_remainder",
                                 fp8_recipe="tensorwise")
    try:
        layers = [m for m in chunks[0].modules() if isinstance(getattr(m, "fp8_ops", None), Fp8LinearOps)]
        assert layers and all(m.fp8_ops.cache.amax_source is not None for m in layers)
        one()
        assert all(m.fp8_ops.cache.given_amaxes == 0 for m in layers)  # the first pass: own amax
        seen = [m.weight.detach().clone() for m in layers]   # what the second forward quantises
        one()
        caches_took_the_steps_amax(layers, seen)
    finally:
        destroy_parallel()


def _kernel_amaxes(rank, world):
    """In a spawned rank (TRITON_INTERPRET=1): the Triton lean AdamW's amax against the weight it
    wrote, for a step, a skipped step and a step that writes a NaN."""
    import r1mega.ops.lean_adam_triton as kernel
    from r1mega.train.lean_adam_math import AdamHyper

    kernel.available = lambda: True       # the interpreter runs the kernel on CPU tensors
    h = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    out = []
    for mode in ("bf16_remainder", "bf16_stochastic"):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter((torch.randn(3000, generator=g) * 0.02).bfloat16())  # 3 programs
        opt = LeanAdamW([p], lr=h.lr, master_weights=mode)
        opt.init_state()
        st = opt.state[p]
        st["step"] += 1
        slot = torch.zeros(1, dtype=torch.int32)
        for found_inf, nan in ((None, False), (torch.ones(()), False), (None, True)):
            p.grad = torch.randn(3000, generator=g).bfloat16() * 10
            if nan:
                p.grad[2500] = float("nan")
            before = p.detach().clone()
            slot.zero_()
            kernel.lean_adamw_cuda([p], [st], h, [mode], grad_scale=None, found_inf=found_inf,
                                   seeds=[1], amax=[slot])
            out.append(((mode, found_inf is not None, nan), before, p.detach().clone(),
                        slot.view(torch.float32).clone()))
    return out


@pytest.mark.slow
def test_the_kernel_reports_the_amax_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (out,) = run_ranks(_kernel_amaxes, 1, timeout_s=300)
    assert len(out) == 6
    for (mode, skipped, nan), before, after, amax in out:
        assert torch.equal(after, before) == skipped, mode
        if nan:
            assert torch.isnan(after).any() and torch.isnan(amax).all(), mode
        else:
            assert torch.equal(amax, _torch_amax(after)), (mode, skipped)


@pytest.mark.parametrize("value", ["0", None])
def test_the_switch_keeps_the_caches_own_pass(single_rank_runtime, monkeypatch, value):
    from tests.unit.test_lean_adam_model import _setup

    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.precision.linear import Fp8LinearOps

    if value is None:   # off by default until timed on a GPU
        monkeypatch.delenv("R1MEGA_FP8_WEIGHT_AMAX", raising=False)
    else:
        monkeypatch.setenv("R1MEGA_FP8_WEIGHT_AMAX", value)
    chunks, _, one = _setup(single_rank_runtime, master_weights="bf16_remainder", fp8_recipe="tensorwise")
    try:
        layers = [m for m in chunks[0].modules() if isinstance(getattr(m, "fp8_ops", None), Fp8LinearOps)]
        one()
        one()
        assert layers and all(m.fp8_ops.cache.amax_source is None for m in layers)
        assert all(m.fp8_ops.cache.given_amaxes == 0 for m in layers)
    finally:
        destroy_parallel()
