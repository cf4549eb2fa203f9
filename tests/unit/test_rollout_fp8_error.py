"""The e4m3 error model of decode attention (r1mega.rollout.fp8_error) against its independent
references: e4m3's grid enumerated from torch's own float8 dtype, the measured rounding errors of
quantize_rows, and float64 attention over the dequantised cache. Its teeth: a coarser quantiser
(one mantissa bit less) and no rounding at all both fail the check the GPU test applies."""
from __future__ import annotations

import math

import torch

from r1mega.rollout.attention import attend_decode_gather
from r1mega.rollout.fp8_error import decode_error_model, e4m3_step, rounding_variance
from r1mega.rollout.kv_cache import FP8_DTYPE, dequantize_rows, quantize_rows

# Bounds of the check (tests/gpu/test_rollout_fp8_kv_gpu.py uses them too). The error is close to
# Gaussian (fp8_error's docstring): the largest of the ~27k elements of the three shapes exceeds 6
# sigma with probability ~1e-4, and over 75 CPU draws of them (2M elements) the largest
# |error| / sigma was 5.2. The RMS ratio is dominated by the few largest-sigma elements (peaked
# attention over long contexts): it ranged 0.89-1.15 over those draws; one mantissa bit less
# doubles it.
Z_MAX = 6.0
RMS_BAND = (0.75, 1.25)
DECODE_SHAPES = [(16, 4, 128, 16), (8, 8, 64, 16), (12, 2, 64, 32)]  # (Hq, Hkv, D, block tokens)


def paged_decode_case(hq, hkv, d, bs, seed=0, device="cpu", ctx=(1, 7, 16, 17, 100, 333, 64, 5)):
    """Unquantised paged K/V (keys with per-row magnitudes up to 4, so the scores' spread and the
    row scales vary), shuffled block tables with partial last blocks, q: built on the CPU so the
    GPU test sees the same values. Returns q (B, Hq, D), k, v (N, bs, Hkv, D), tables, ctx_lens."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-c // bs) for c in ctx) + 1  # + the scratch block 0 the padding points at
    k = torch.randn(n_blocks, bs, hkv, d, generator=g) * torch.rand(n_blocks, bs, hkv, 1, generator=g) * 4
    v = torch.randn(n_blocks, bs, hkv, d, generator=g)
    perm = (torch.randperm(n_blocks - 1, generator=g) + 1).tolist()
    tables, i = [], 0
    for c in ctx:
        n = -(-c // bs)
        tables.append(perm[i:i + n])
        i += n
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(ctx), hq, d, generator=g)
    return (t.to(device) for t in (q, k, v, bt, torch.tensor(ctx, dtype=torch.int32)))


def error_against_model(out, exact, sigma, kernel_tol=0.0):
    """(largest |out - exact| / (Z_MAX sigma + the kernel's own tolerance), RMS(out - exact) /
    RMS(sigma)): the check passes with the first <= 1 and the second within RMS_BAND."""
    err = (out.double() - exact).abs()
    worst = (err / (Z_MAX * sigma + kernel_tol * (1 + exact.abs()))).max().item()
    return worst, math.sqrt((err ** 2).mean().item() / (sigma ** 2).mean().item())


def _e4m3_grid():
    """Every finite non-negative e4m3 value, from torch's dtype (bytes 0x00-0x7E)."""
    return torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).double()


def test_e4m3_step_is_the_distance_to_the_next_grid_value():
    grid = _e4m3_grid()
    assert torch.equal(e4m3_step(grid[:-1]), grid[1:] - grid[:-1])
    mid = (grid[:-1] + grid[1:]) / 2  # between two values: the step of the lower one's binade
    assert torch.equal(e4m3_step(mid), grid[1:] - grid[:-1])


def test_rounding_variance_is_quantize_rows_measured_error():
    """Each error within half a step (sqrt(3) sigma of a uniform), and the mean squared error over
    many rows equal to the predicted variance's mean."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 64, generator=g) * torch.rand(4096, 1, generator=g) * 5
    x[:8, 1:] *= 1e-4  # subnormal-range elements beside one large value per row
    x8, s = quantize_rows(x)
    err = dequantize_rows(x8, s, torch.float64) - x.double()
    var = rounding_variance(x)
    assert (err.abs() <= (3 * var).sqrt() * (1 + 1e-6) + 1e-30).all()
    assert abs((err ** 2).mean().item() / var.mean().item() - 1) < 0.02


def _check(hq, hkv, d, bs, quantise):
    q, k, v, bt, ctx = paged_decode_case(hq, hkv, d, bs)
    scale = 1 / math.sqrt(d)
    exact, sigma = decode_error_model(q, k, v, bt, ctx, scale)
    # The model's exact attention is the repository's reader on the unquantised cache.
    torch.testing.assert_close(exact, attend_decode_gather(q.double(), k.double(), v.double(), bt, ctx, scale),
                               atol=1e-12, rtol=1e-12)
    ref = attend_decode_gather(q.double(), quantise(k), quantise(v), bt, ctx, scale)
    return error_against_model(ref, exact, sigma)


def test_model_predicts_float64_attention_on_the_e4m3_cache():
    """The data of the GPU test, in float64 and without the kernel: the FP8 error alone."""
    for shape in DECODE_SHAPES:
        worst, rms = _check(*shape, lambda x: dequantize_rows(*quantize_rows(x), torch.float64))
        assert worst <= 1 and RMS_BAND[0] <= rms <= RMS_BAND[1], (shape, worst, rms)


def test_check_fails_a_coarser_quantiser_and_no_rounding():
    """e5m2 (2 mantissa bits) in place of e4m3 roughly doubles the error: the RMS ratio leaves the
    band; an unrounded cache has none: the ratio drops below it."""
    def e5m2(x):
        s = x.abs().amax(-1, keepdim=True) / 57344.0  # e5m2's largest finite value
        return (x / s).to(torch.float8_e5m2).double() * s.double()

    for shape in DECODE_SHAPES[:2]:
        assert _check(*shape, e5m2)[1] > RMS_BAND[1], shape
        assert _check(*shape, lambda x: x.double())[1] < RMS_BAND[0], shape
