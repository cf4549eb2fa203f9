"""The memory-lean AdamW (r1mega/train/lean_adam*.py) against independent references: torch's
AdamW on fp32 tensors, and megatron's fp32-master optimizer on a tiny GPT."""
from __future__ import annotations

import pytest
import torch

from r1mega.train.lean_adam import LeanAdamW
from r1mega.train.lean_adam_math import (bf16_noise, join_master, split_master,
                                         stochastic_round_bf16)


def _wide_fp32(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)


def test_split_join_is_exact_and_the_bf16_is_nearest():
    x = _wide_fp32(200_000, 0)
    ties = torch.tensor([1 + 2 ** -8, -(1 + 2 ** -8), 1 + 3 * 2 ** -8, 2.0 ** -126 * (1 + 2 ** -8)])
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, 1e-40, -3e38])])
    hi, lo = split_master(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16
    assert torch.equal(join_master(hi, lo).view(torch.int32), x.view(torch.int32))
    rne = x.to(torch.bfloat16)                       # torch's round-to-nearest-even
    assert ((hi.double() - x.double()).abs() <= (rne.double() - x.double()).abs()).all()
    # Ties go away from zero (the one place it differs from round-to-nearest-even).
    assert hi[-8:-4].float().tolist() == pytest.approx(
        [1 + 2 ** -7, -(1 + 2 ** -7), 1 + 2 ** -6, 2.0 ** -126 * (1 + 2 ** -7)])


def test_split_keeps_nan_and_inf_of_any_payload():
    """Rounding a NaN whose mantissa is all ones (the GPU's canonical NaN) would carry into the
    sign and store -0.0 (or +0.0 for a negative one): a diverged weight would vanish. Every NaN
    stays NaN, infinities stay infinite, and the largest finite master still round-trips."""
    bits = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000, 0x7F800001, 0xFFC00000, 0x7F800000,
                         0xFF800000, 0x7F7FFFFF], dtype=torch.int64)
    x = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)
    hi, lo = split_master(x)
    assert torch.isnan(hi[:5].float()).all() and torch.isnan(join_master(hi, lo)[:5]).all()
    assert hi[5:7].float().tolist() == [float("inf"), float("-inf")]
    assert join_master(hi, lo)[5:7].tolist() == [float("inf"), float("-inf")]
    assert torch.equal(join_master(hi[7:], lo[7:]).view(torch.int32), x[7:].view(torch.int32))


@pytest.mark.parametrize("value", [1 + 2 ** -10, -(1 + 3 * 2 ** -10), 3.14159, 2.0 - 2 ** -20, 1e-3])
def test_stochastic_rounding_is_unbiased(value):
    n = 400_000
    x = torch.full((n,), value, dtype=torch.float32)
    r = stochastic_round_bf16(x, bf16_noise(x.shape, torch.Generator().manual_seed(1))).double()
    lo = torch.tensor(value).to(torch.bfloat16).double()
    neighbours = set(r.unique().tolist())
    assert len(neighbours) <= 2  # only the two bf16 neighbours ever come out
    step = max(abs(a - b) for a in neighbours for b in neighbours) or abs(lo.item()) * 2 ** -7
    # Bernoulli mean: standard error step * 0.5 / sqrt(n); 6 sigma.
    assert abs(r.mean().item() - value) < 6 * step * 0.5 / n ** 0.5


def test_stochastic_rounding_keeps_non_finite():
    x = torch.tensor([float("inf"), -float("inf"), float("nan")])
    r = stochastic_round_bf16(x, torch.full((3,), 65535, dtype=torch.int32)).float()
    assert r[0] == float("inf") and r[1] == -float("inf") and torch.isnan(r[2])


def _pair(n=4096, seed=0, master_weights="bf16_remainder", moments="fp32", wd=0.1):
    """The same weights in LeanAdamW (bf16 param) and torch AdamW (fp32 master)."""
    w = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    lean_p = torch.nn.Parameter(w.clone())
    ref_p = torch.nn.Parameter(w.float())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    lean = LeanAdamW([lean_p], master_weights=master_weights, moments_dtype=moments, **kw)
    ref = torch.optim.AdamW([ref_p], foreach=False, **kw)
    return lean_p, ref_p, lean, ref


def test_remainder_mode_is_bit_identical_to_fp32_master_adamw():
    lean_p, ref_p, lean, ref = _pair()
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        grad = torch.randn(lean_p.shape, generator=g).to(torch.bfloat16)
        lean_p.grad, ref_p.grad = grad.clone(), grad.float()
        lean.step()
        ref.step()
        master = lean.masters()[0]
        assert torch.equal(master.view(torch.int32), ref_p.data.view(torch.int32))
        assert torch.equal(lean_p.data, split_master(ref_p.data)[0])
        assert torch.equal(lean.state[lean_p]["exp_avg"], ref.state[ref_p]["exp_avg"])
        assert torch.equal(lean.state[lean_p]["exp_avg_sq"], ref.state[ref_p]["exp_avg_sq"])
    assert lean.state[lean_p]["step"].item() == 6


def test_bf16_moments_stay_close_to_fp32_moments():
    lean_p, ref_p, lean, ref = _pair(moments="bf16")
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        grad = (torch.randn(lean_p.shape, generator=g) + 0.3).to(torch.bfloat16)
        lean_p.grad, ref_p.grad = grad.clone(), grad.float()
        lean.step()
        ref.step()
    assert lean.state[lean_p]["exp_avg"].dtype == torch.bfloat16
    start = _pair()[1].data  # the weights both began from
    delta_ref, delta_lean = ref_p.data - start, lean.masters()[0] - start
    rel = (delta_lean - delta_ref).norm() / delta_ref.norm()
    assert rel < 0.02, rel


@pytest.mark.parametrize("mode", ["bf16_remainder", "bf16_stochastic"])
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_found_inf_skips_everything(mode, moments):
    lean_p, _, lean, _ = _pair(master_weights=mode, moments=moments)
    lean_p.grad = torch.randn(lean_p.shape).to(torch.bfloat16)
    lean.step()
    before = {k: v.clone() for k, v in lean.state[lean_p].items()}
    param = lean_p.data.clone()
    lean_p.grad = torch.randn(lean_p.shape).to(torch.bfloat16)
    lean.found_inf = torch.ones(())
    lean.grad_scale = torch.full((), float("nan"))  # a skipped step must not even look at it
    lean.step()
    assert torch.equal(lean_p.data, param)
    for k, v in before.items():
        assert torch.equal(lean.state[lean_p][k], v), k
    lean.found_inf = torch.zeros(())
    lean.grad_scale = None
    lean.step()
    assert lean.state[lean_p]["step"].item() == 2 and not torch.equal(lean_p.data, param)


def test_grad_scale_clip_matches_megatron_clip(single_rank_runtime):
    """grad_scale = (norm + 1e-6) / clip divides in the update; megatron multiplies the fp32
    grads by clip / (norm + 1e-6) first (clip_grad_by_total_norm_fp32). Same step, to fp32
    rounding."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    single_rank_runtime()  # CPU mode: megatron's clip asserts CUDA tensors
    lean_p, ref_p, lean, ref = _pair(wd=0.0)
    grad = (torch.randn(lean_p.shape) * 3).to(torch.bfloat16)
    lean_p.grad, ref_p.grad = grad.clone(), grad.float()
    norm, clip = grad.float().norm().item(), 1.0
    clip_grad_by_total_norm_fp32([ref_p], max_norm=clip, total_norm=norm)
    assert ref_p.grad.norm().item() == pytest.approx(clip, rel=1e-5)
    lean.grad_scale = torch.tensor((norm + 1e-6) / clip)
    lean.step()
    ref.step()
    torch.testing.assert_close(lean.state[lean_p]["exp_avg"], ref.state[ref_p]["exp_avg"],
                               rtol=2e-6, atol=0)
    # The step moves each weight by about lr (a first Adam step is ~lr * sign(g)), so a weight
    # near lr lands near 0 by cancellation: its rounding error is the step's (~1e-7 * lr), not a
    # small multiple of its own ulp; how it rounds depends on the CPU's vector kernels.
    torch.testing.assert_close(lean.masters()[0], ref_p.data, rtol=2e-6, atol=2e-6 * 1e-2)


def test_wrong_parameter_dtype_is_named():
    with pytest.raises(ValueError, match="precision.dtype=bf16"):
        LeanAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))],
                  master_weights="bf16_remainder")
    with pytest.raises(ValueError, match="parameter 0 of shape"):
        LeanAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], master_weights="fp32")
    with pytest.raises(ValueError, match="optimizer.moments_dtype"):
        LeanAdamW([torch.nn.Parameter(torch.zeros(3))], master_weights="fp32", moments_dtype="fp16")


@pytest.mark.parametrize("overrides,match", [
    (dict(master_weights="bf16"), "optimizer.master_weights: 'bf16' is not one of"),
    (dict(moments_dtype="fp16"), "optimizer.moments_dtype: 'fp16' is not one of"),
    (dict(master_weights="bf16_remainder"), "parallel.distributed_optimizer=false"),
    (dict(master_weights="bf16_remainder", distributed=False, dtype="fp32"), "precision.dtype=bf16"),
    (dict(master_weights="bf16_stochastic", distributed=False, dtype="bf16"),
     "precision.grad_reduce_in_fp32=false"),
    (dict(moments_dtype="bf16", name="sgd", distributed=False), "optimizer.name=sgd"),
])
def test_config_validation_names_the_key(overrides, match):
    from r1mega.config import Config, ConfigError
    from r1mega.config_checks import validate

    cfg = Config()
    cfg.optimizer.master_weights = overrides.get("master_weights", "fp32")
    cfg.optimizer.moments_dtype = overrides.get("moments_dtype", "fp32")
    cfg.optimizer.name = overrides.get("name", "adam")
    cfg.parallel.distributed_optimizer = overrides.get("distributed", True)
    cfg.precision.dtype = overrides.get("dtype", "auto")
    cfg.precision.grad_reduce_in_fp32 = overrides.get("fp32_grads", True)
    cfg.precision.fp8 = cfg.precision.fp8_emulate = overrides.get("fp8", False)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_config_accepts_the_lean_settings():
    from r1mega.config import Config
    from r1mega.config_checks import validate

    cfg = Config()
    cfg.optimizer.master_weights, cfg.optimizer.moments_dtype = "bf16_remainder", "bf16"
    cfg.parallel.distributed_optimizer = False
    cfg.precision.dtype, cfg.precision.grad_reduce_in_fp32 = "bf16", False
    validate(cfg)
    cfg.precision.fp8 = cfg.precision.fp8_emulate = True   # FP8 linears with bf16 masters
    validate(cfg)
    cfg.precision.fp8 = cfg.precision.fp8_emulate = False
    cfg.optimizer.master_weights = "fp32"  # bf16 moments beside fp32 masters keep fp32 grads
    cfg.precision.grad_reduce_in_fp32 = True
    validate(cfg)


def test_grad_norm_of_bf16_grads_is_an_fp32_norm():
    """The clip factor of a bf16 grad buffer: per-tensor norms are not rounded to bf16."""
    from r1mega.parallel.fused_fallbacks import foreach_l2_norm

    g = torch.Generator().manual_seed(3)
    grads = [(torch.randn(n, generator=g) * s).to(torch.bfloat16) for n, s in ((999, 3.0), (77, 0.1))]
    norm, _ = foreach_l2_norm(None, torch.zeros(1, dtype=torch.int), [grads], False)
    want = torch.cat([t.double() for t in grads]).norm()
    assert norm.dtype == torch.float32
    assert abs(norm.item() - want.item()) < 1e-6 * want.item()


def test_reset_remainders_makes_the_master_the_new_weight():
    lean_p, _, lean, _ = _pair()
    lean_p.grad = torch.randn(lean_p.shape).to(torch.bfloat16)
    lean.step()
    assert lean.state[lean_p]["remainder"].abs().sum() > 0
    lean_p.data.copy_(torch.randn(lean_p.shape).to(torch.bfloat16))  # a weights-only load
    lean.reset_remainders()
    assert torch.equal(lean.masters()[0], lean_p.data.float())
