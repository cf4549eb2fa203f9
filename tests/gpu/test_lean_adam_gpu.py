"""The lean AdamW Triton kernel (r1mega/ops/lean_adam_triton.py) against its PyTorch reference
(r1mega/train/lean_adam_math.py) run on the same GPU, with outputs poisoned first."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N = 3 * 1024 * 1024 + 517  # several blocks and a ragged tail


def _state(n, moments, mode, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    master = torch.randn(n, generator=g, device=dev) * 0.05
    if mode == "bf16_remainder":
        from r1mega.train.lean_adam_math import split_master

        param, rem = split_master(master)
    else:
        param, rem = master.to(torch.bfloat16), None
    mdt = torch.float32 if moments == "fp32" else torch.bfloat16
    m = (torch.randn(n, generator=g, device=dev) * 1e-2).to(mdt)
    v = (torch.rand(n, generator=g, device=dev) * 1e-4).to(mdt)
    grad = (torch.randn(n, generator=g, device=dev) * 0.3).to(torch.bfloat16)
    return param, grad, m, v, rem


def _run_kernel(param, grad, m, v, rem, step, h, mode, grad_scale=None, found_inf=None):
    from r1mega.ops.lean_adam_triton import lean_adamw_cuda

    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    st = {"step": torch.full((), float(step), device="cuda"), "exp_avg": m.clone(),
          "exp_avg_sq": v.clone()}
    if rem is not None:
        st["remainder"] = rem.clone()
    lean_adamw_cuda([p], [st], h, [mode], grad_scale=grad_scale, found_inf=found_inf, seeds=[7])
    torch.cuda.synchronize()
    return p.data, st


def _hyper(wd=0.1):
    from r1mega.train.lean_adam_math import AdamHyper

    return AdamHyper(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd)


@pytest.mark.parametrize("scaled", [False, True])
def test_remainder_fp32_moments_bitwise_equal_to_reference(scaled):
    from r1mega.train.lean_adam_math import join_master, lean_step_reference

    param, grad, m, v, rem = _state(N, "fp32", "bf16_remainder", 0)
    h = _hyper()
    scale = torch.tensor(2.75, device="cuda") if scaled else None
    for step in (1, 7):
        p_k, st = _run_kernel(param, grad, m, v, rem, step, h, "bf16_remainder", grad_scale=scale)
        ref = lean_step_reference(param, grad, m, v, rem, step, h, "bf16_remainder", grad_scale=scale)
        mk = join_master(p_k, st["remainder"])
        mr = join_master(ref["param"], ref["remainder"])
        bad = (mk.view(torch.int32) != mr.view(torch.int32))
        assert not bad.any(), (f"step {step}: {int(bad.sum())} of {N} masters differ, max |diff| "
                               f"{(mk - mr).abs().max().item():.3e}")
        assert torch.equal(st["exp_avg"], ref["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], ref["exp_avg_sq"])
        assert torch.equal(p_k, ref["param"]) and torch.equal(st["remainder"], ref["remainder"])


@pytest.mark.xfail(reason="H200, 2026-12-03: last-bit differences from the reference (open)", strict=False)
def test_fp32_master_with_bf16_moments_matches_reference():
    from r1mega.train.lean_adam_math import lean_step_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    param = torch.randn(N, generator=g, device="cuda") * 0.05
    grad = torch.randn(N, generator=g, device="cuda") * 0.3
    m = (torch.randn(N, generator=g, device="cuda") * 1e-2).to(torch.bfloat16)
    v = (torch.rand(N, generator=g, device="cuda") * 1e-4).to(torch.bfloat16)
    h = _hyper()
    p_k, st = _run_kernel(param, grad, m, v, None, 3, h, "fp32")
    ref = lean_step_reference(param, grad, m, v, None, 3, h, "fp32",
                              generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(p_k, ref["param"])      # the update reads the stored moments exactly
    assert torch.equal(st["exp_avg"], ref["exp_avg"])  # round-to-nearest on both sides
    # exp_avg_sq: stochastic on both sides, different random bits: within one bf16 step.
    diff = (st["exp_avg_sq"].float() - ref["exp_avg_sq"].float()).abs()
    assert (diff <= ref["exp_avg_sq"].float().abs() * 2 ** -7 + 1e-30).all()


@pytest.mark.parametrize("mode", ["bf16_remainder", "bf16_stochastic"])
def test_found_inf_writes_nothing(mode):
    param, grad, m, v, rem = _state(4099, "bf16", mode, 2)
    p_k, st = _run_kernel(param, grad, m, v, rem, 2, _hyper(), mode,
                          grad_scale=torch.tensor(float("nan"), device="cuda"),
                          found_inf=torch.tensor(1.0, device="cuda"))
    assert torch.equal(p_k, param) and torch.equal(st["exp_avg"], m)
    assert torch.equal(st["exp_avg_sq"], v)
    if rem is not None:
        assert torch.equal(st["remainder"], rem)


def test_kernel_stochastic_rounding_is_unbiased():
    """Step 1 from zero moments moves every weight by lr * sign(-g) (times 1 + O(2^-23) from the
    bias-correction roundings): 1.0 + 2^-10 lies a quarter of the way to the next bf16 (1 + 2^-7),
    so the stochastic write must land there a quarter of the time."""
    from r1mega.train.lean_adam_math import AdamHyper

    n = 1 << 22
    target = 1.0 + 2 ** -10
    param = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    grad = torch.full((n,), -1.0, device="cuda", dtype=torch.bfloat16)
    m = torch.zeros(n, device="cuda")
    v = torch.zeros(n, device="cuda")
    h = AdamHyper(lr=2 ** -10, beta1=0.9, beta2=0.95, eps=0.0, weight_decay=0.0)
    p_k, _ = _run_kernel(param, grad, m, v, None, 1, h, "bf16_stochastic")
    vals = p_k.float()
    assert set(vals.unique().tolist()) <= {1.0, 1.0 + 2 ** -7}
    mean = vals.double().mean().item()
    assert abs(mean - target) < 6 * 2 ** -7 * 0.5 / n ** 0.5 + 2 ** -22, mean
    again, _ = _run_kernel(param, grad, m, v, None, 1, h, "bf16_stochastic")
    assert torch.equal(again, p_k)  # same (seed, step): same noise


@pytest.mark.xfail(reason="H200, 2026-12-03: last-bit differences from the reference (open)", strict=False)
def test_optimizer_on_cuda_matches_cpu_reference_loop():
    """LeanAdamW's CUDA path (kernel) over several steps equals its reference applied step by
    step on the same GPU, with per-step found_inf and grad_scale tensors (the sync-free step)."""
    from r1mega.train.lean_adam import LeanAdamW
    from r1mega.train.lean_adam_math import join_master, lean_step_reference

    h = _hyper(wd=0.01)
    param, _, _, _, _ = _state(70_001, "fp32", "bf16_remainder", 3)
    p = torch.nn.Parameter(param.clone())
    opt = LeanAdamW([p], lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay,
                    master_weights="bf16_remainder", moments_dtype="fp32")
    ref = {"param": param.clone(), "exp_avg": torch.zeros(param.shape, device="cuda"),
           "exp_avg_sq": torch.zeros(param.shape, device="cuda"),
           "remainder": torch.zeros(param.shape, dtype=torch.int16, device="cuda")}
    g = torch.Generator(device="cuda").manual_seed(4)
    step = 0
    for i in range(5):
        grad = (torch.randn(param.shape, generator=g, device="cuda")).to(torch.bfloat16)
        skip = i == 2
        opt.found_inf = torch.tensor(1.0 if skip else 0.0, device="cuda")
        opt.grad_scale = torch.tensor(1.5, device="cuda")
        p.grad = grad
        opt.step()
        if not skip:
            step += 1
            ref = lean_step_reference(ref["param"], grad, ref["exp_avg"], ref["exp_avg_sq"],
                                      ref["remainder"], step, h, "bf16_remainder",
                                      grad_scale=opt.grad_scale)
    assert opt.state[p]["step"].item() == step == 4
    assert torch.equal(join_master(p.data, opt.state[p]["remainder"]),
                       join_master(ref["param"], ref["remainder"]))


def test_step_with_device_scale_and_found_inf_never_waits_for_the_device():
    """The sync-free training step hands LeanAdamW device tensors (grad_scale, found_inf); a
    host read inside step() (an .item(), also one hidden in a torch op) would stall the device
    queue every step. CUDA's sync debug mode raises on any such read."""
    from r1mega.train.lean_adam import LeanAdamW

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1000, device="cuda").bfloat16()) for _ in range(4)]
    opt = LeanAdamW([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}],
                    lr=1e-3, master_weights="bf16_stochastic", moments_dtype="bf16")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.grad_scale = torch.tensor(2.0, device="cuda")
    opt.found_inf = torch.tensor(0.0, device="cuda")
    opt.step()  # the first step of a process probes torch's rounding once (host reads)
    before = [p.detach().clone() for p in ps]
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(not torch.equal(a, p) for a, p in zip(before, ps))
    assert all(float(opt.state[p]["step"]) == 2.0 for p in ps)


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_stochastic_mode_lands_next_to_the_float64_update(moments):
    """The stochastic mode's fast arithmetic (approximate division and square root) against the
    AdamW update in float64 from the same inputs: stochastic rounding picks one of the two bf16
    neighbours of the exact value, so every weight is within one bf16 spacing of it."""
    n = 1 << 20
    param, grad, m, v, _ = _state(n, moments, "bf16_stochastic", 5)
    h = _hyper(wd=0.1)
    scale = torch.tensor(1.7, device="cuda")
    p_k, st = _run_kernel(param, grad, m, v, None, 3, h, "bf16_stochastic", grad_scale=scale)
    g = grad.double() / 1.7
    m2 = h.beta1 * m.double() + (1 - h.beta1) * g
    v2 = h.beta2 * v.double() + (1 - h.beta2) * g * g
    bc1, bc2 = 1 - h.beta1 ** 3, 1 - h.beta2 ** 3
    decayed = param.double() * (1 - h.lr * h.weight_decay)
    update = h.lr / bc1 * m2 / (v2.sqrt() / bc2 ** 0.5 + h.eps)
    exact = decayed - update
    spacing = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    # float32 arithmetic errs relative to its operands, not to the (possibly cancelled) result
    assert ((p_k.double() - exact).abs() <= spacing + 1e-6 * (decayed.abs() + update.abs())).all()
    # exp_avg rounds to nearest; where b1 m and (1 - b1) g cancel, float32 errs on the operands
    cancel = 1e-6 * (h.beta1 * m.double().abs() + (1 - h.beta1) * g.abs())
    assert ((st["exp_avg"].double() - m2).abs() <= 2 ** -8 * m2.abs() + cancel).all()


@pytest.mark.parametrize("mode", ["bf16_remainder", "bf16_stochastic"])
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_the_step_reports_the_weights_amax(mode, moments):
    """LeanAdamW.track_amax on CUDA: the kernel's max |w| (atomic over its programs) equals
    torch's amax of the weight it wrote, in a step, a skipped step and a step writing a NaN."""
    from r1mega.train.lean_adam import LeanAdamW

    param, grad, *_ = _state(N, moments, mode, seed=11)
    p = torch.nn.Parameter(param.clone())
    opt = LeanAdamW([p], lr=1e-2, weight_decay=0.1, master_weights=mode, moments_dtype=moments)
    opt.track_amax(p)
    for found_inf, nan in ((None, False), (torch.ones((), device="cuda"), False), (None, True)):
        p.grad = grad.clone() * (3 if found_inf is None else 1)
        if nan:
            p.grad[N - 3] = float("nan")
        before = p.detach().clone()
        opt.found_inf = found_inf
        opt.step()
        got = opt.weight_amax(p)
        torch.cuda.synchronize()
        assert torch.equal(p.detach(), before) == (found_inf is not None)
        if nan:  # the GPU's NaN (0x7FFFFFFF) stays a NaN weight, and its amax is NaN
            assert torch.isnan(p.detach()[N - 3]) and torch.isnan(got).all()
        else:
            assert torch.equal(got, p.detach().float().abs().amax().reshape(1)), (found_inf, mode)


def test_fp8_weight_caches_take_the_steps_amax(single_rank_runtime, monkeypatch):
    """A tensorwise FP8 model trained with the lean optimizer: after the first step every FP8
    layer's weight copy is quantised with the optimizer's amax, to the bytes of its own pass."""
    monkeypatch.setenv("R1MEGA_FP8_WEIGHT_AMAX", "1")
    from r1mega.config import ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.linear import Fp8LinearOps
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample
    from tests.unit.test_weight_amax import caches_took_the_steps_amax

    prec = PrecisionConfig(dtype="bf16", grad_reduce_in_fp32=False, fp8=True, fp8_backend="native",
                           fp8_recipe="tensorwise")
    rt = single_rank_runtime(parallel=ParallelConfig(distributed_optimizer=False), precision=prec)
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=2, num_query_groups=2,
                      ffn_hidden_size=512, vocab_size=256)
    chunks = build_model(cfg, rt, prec, wrap=True, distributed_optimizer=False)
    optim = build_optimizer(OptimizerConfig(lr=3e-3, master_weights="bf16_remainder",
                                            moments_dtype="bf16"), chunks, rt, distributed=False)
    step = TrainStep(chunks, optim, rt, micro_batch_tokens=200)
    g = torch.Generator().manual_seed(0)
    samples = [sft_sample(torch.randint(0, 256, (100,), generator=g)) for _ in range(4)]
    layers = [m for m in chunks[0].modules() if isinstance(getattr(m, "fp8_ops", None), Fp8LinearOps)]
    assert layers and all(m.fp8_ops.cache.amax_source is not None for m in layers)
    step(samples, sft_loss_fn(cfg.vocab_size))
    seen = [m.weight.detach().clone() for m in layers]
    step(samples, sft_loss_fn(cfg.vocab_size))
    caches_took_the_steps_amax(layers, seen)
