"""One-pass Triton kernel of the lean AdamW update (r1mega/train/lean_adam.py) on CUDA.

Per element: read grad, param (+ int16 remainder), both moments; divide by ``grad_scale``;
decoupled weight decay; Adam moments; bias-corrected update; write param (+ remainder) and
moments. ``found_inf`` (device, non-zero) masks every load and store, so a skipped step writes
nothing; the step counters and the bias corrections are device tensors: no host read in a step
(one probe at the first step of a process, :func:`torch_cuda_rounding`).
The reference is :func:`r1mega.train.lean_adam_math.lean_step_reference`; tests/gpu/test_lean_adam_gpu.py
compares the two.

Arithmetic follows the reference *as torch computes it on CUDA* (the reference replays torch's
single-tensor AdamW): whether torch's CUDA ``lerp``/``addcmul``/``addcdiv`` contract into an FMA,
and whether a division by a python scalar is a multiplication by its reciprocal, is found once
per process by :func:`torch_cuda_rounding` and compiled in; every other operation rounds on its
own (``enable_fp_fusion=False`` stops Triton contracting them), divisions are IEEE (``div_rn``;
Triton's ``/`` is the approximate ``div.full``) and the square root is ``sqrt_rn``.

The stochastic mode (bf16_stochastic) is the exception: its writes are random by design, so it
takes the fast instructions instead (multiplication by the reciprocal of ``grad_scale``, the
approximate square root and division, FMA contraction): each is within 2 ulp of float32, some
2^-15 of the bf16 spacing its rounding draws from (the IEEE sequences cost several
instructions per element each, beside the Philox draw).

Stochastic rounding draws from Philox (``tl.randint4x``) keyed by (per-tensor seed, step) and
counted by element: reproducible, but not the CPU reference's bits (torch's CPU generator), which
the stochastic mode does not need; its test checks the kernel's rounding is unbiased instead.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.train.lean_adam_math import AdamHyper

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False

# Elements per program and warps (`r1mega bench lean-adam` times other choices). The Philox counter
# of an element is its index / 4, so any choice gives the same bits.
BLOCK, NUM_WARPS = 1024, 4


_MASTER_CODE = {"fp32": 0, "bf16_remainder": 1, "bf16_stochastic": 2}


def available() -> bool:
    return HAVE_TRITON and torch.cuda.is_available()


if HAVE_TRITON:
    @triton.jit
    def _sr_bf16_bits(x, noise):
        """fp32 -> bf16 bit pattern (int16), rounded stochastically with 16-bit ``noise``."""
        bits = x.to(tl.int32, bitcast=True)
        hi = ((bits + noise) >> 16).to(tl.int16)
        finite = (bits & 0x7F800000) != 0x7F800000
        return tl.where(finite, hi, x.to(tl.bfloat16).to(tl.int16, bitcast=True))

    @triton.jit
    def _amax_bits(amax_ptr, p_ptr, offs, new_bits, mask, live):
        """max |w| of the bf16 weight as it stands after the step, as float32 bits, into
        ``amax_ptr`` (int32, atomic max; the caller zeroed it): |bf16| bits shifted to float32's.
        A skipped step (mask off, live on) reads the unchanged weight. Integers order every
        non-negative float and put NaN above inf, so a NaN weight gives a NaN amax."""
        old = tl.load(p_ptr + offs, mask=live & ~mask, other=0).to(tl.int32)
        mag = tl.where(mask, new_bits, old) & 0x7FFF
        top = tl.max(tl.where(live, mag, 0), axis=0)
        tl.atomic_max(amax_ptr, top << 16)

    @triton.jit
    def _exact_update(p, m, v, neg_step_size, inv_bc2, bc2, eps, DIV_RECIP: tl.constexpr,
                      ADDCDIV: tl.constexpr):
        """p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) with torch's roundings: IEEE sqrt and
        divisions, and the FMA contraction of its addcdiv (torch_cuda_rounding)."""
        sq = tl.math.sqrt_rn(v)
        if DIV_RECIP:
            denom = sq * inv_bc2
        else:
            denom = tl.math.div_rn(sq, bc2)
        denom = denom + eps
        if ADDCDIV == 0:
            p = tl.fma(neg_step_size, tl.math.div_rn(m, denom), p)
        elif ADDCDIV == 1:
            p = p + tl.math.div_rn(neg_step_size * m, denom)
        else:
            p = p + neg_step_size * tl.math.div_rn(m, denom)
        return p

    @triton.jit
    def _lean_adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, r_ptr, step_ptr, scal_ptr, gs_ptr, fi_ptr,
                           amax_ptr, n, decay, w1, beta2, c2, eps, seed_lo,
                           MASTER: tl.constexpr, BF16_MOMENTS: tl.constexpr, AMAX: tl.constexpr,
                           HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                           HAS_DECAY: tl.constexpr, SMALL_W1: tl.constexpr,
                           NEED_NOISE: tl.constexpr, LERP_FMA: tl.constexpr,
                           ADDCMUL: tl.constexpr, ADDCDIV: tl.constexpr,
                           DIV_RECIP: tl.constexpr, FAST_MATH: tl.constexpr,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        if HAS_INF:  # a skipped step: every element masked off, nothing read or written
            n = tl.where(tl.load(fi_ptr) == 0, n, 0)
        mask = offs < n
        neg_step_size = tl.load(scal_ptr)      # float(-(lr / bias_correction1))
        inv_bc2 = tl.load(scal_ptr + 1)        # 1 / float(sqrt(bias_correction2))
        bc2 = tl.load(scal_ptr + 2)            # float(sqrt(bias_correction2))

        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            if FAST_MATH:
                g = g * (1.0 / tl.load(gs_ptr))
            else:
                g = tl.math.div_rn(g, tl.load(gs_ptr))
        if MASTER == 1:  # exact fp32 master from bf16 bits (int16 view) and the remainder
            hi = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32)
            lo = tl.load(r_ptr + offs, mask=mask, other=0).to(tl.int32)
            p = ((hi << 16) + lo).to(tl.float32, bitcast=True)
        elif MASTER == 2:
            p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32)
            p = (p << 16).to(tl.float32, bitcast=True)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        if HAS_DECAY:
            p = p * decay
        # The roundings of torch's CUDA lerp / addcmul / addcdiv / scalar division in this build
        # (torch_cuda_rounding).
        if SMALL_W1:  # torch's lerp for weight < 0.5: self + w * (end - self)
            if LERP_FMA:
                m = tl.fma(w1, g - m, m)
            else:
                m = m + w1 * (g - m)
        else:         # end - (end - self) * (1 - w)
            if LERP_FMA:
                m = tl.fma(-(g - m), 1.0 - w1, g)
            else:
                m = g - (g - m) * (1.0 - w1)
        v = v * beta2
        if ADDCMUL == 0:
            v = tl.fma(c2, g * g, v)
        elif ADDCMUL == 1:
            v = tl.fma(c2 * g, g, v)
        else:
            v = v + (c2 * g) * g
        if FAST_MATH:
            p = p + neg_step_size * (m / (tl.sqrt(v) * inv_bc2 + eps))
        else:
            p = _exact_update(p, m, v, neg_step_size, inv_bc2, bc2, eps, DIV_RECIP, ADDCDIV)

        if NEED_NOISE:
            # One Philox draw (four 32-bit words) serves four elements, 16 bits for the weight and
            # 16 for exp_avg_sq each: the draw costs more integer work than the rest of the update.
            step_i = tl.load(step_ptr).to(tl.int64)
            draw = (pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.int32)
            r0, r1, r2, r3 = tl.randint4x((step_i << 32) + seed_lo, draw)
            words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK,))
            noise_p = (words & 0xFFFF).to(tl.int32)
            noise_v = ((words >> 16) & 0xFFFF).to(tl.int32)
        if MASTER == 1:
            bits = p.to(tl.int32, bitcast=True)
            hi = (bits + 0x8000) >> 16         # nearest, ties away from zero (see lean_adam_math)
            lo = bits - (hi << 16)
            # non-finite: truncated, NaN kept NaN, remainder 0 (lean_adam_math.split_master)
            nonfinite = (bits & 0x7F800000) == 0x7F800000
            quiet = tl.where((bits & 0x7FFFFF) != 0, 0x40, 0)
            hi = tl.where(nonfinite, (bits >> 16) | quiet, hi)
            lo = tl.where(nonfinite, 0, lo)
            tl.store(p_ptr + offs, hi.to(tl.int16), mask=mask)
            tl.store(r_ptr + offs, lo.to(tl.int16), mask=mask)
            if AMAX:
                _amax_bits(amax_ptr, p_ptr, offs, hi, mask, live)
        elif MASTER == 2:
            sr = _sr_bf16_bits(p, noise_p)
            tl.store(p_ptr + offs, sr, mask=mask)
            if AMAX:
                _amax_bits(amax_ptr, p_ptr, offs, sr.to(tl.int32), mask, live)
        else:
            tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        if BF16_MOMENTS:  # exp_avg to nearest, exp_avg_sq stochastically (lean_adam_math.store_moments)
            tl.store(m_ptr + offs, m.to(tl.bfloat16), mask=mask)
            tl.store(v_ptr + offs, _sr_bf16_bits(v, noise_v).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)


def bias_scalars(step: torch.Tensor, h: AdamHyper) -> torch.Tensor:
    """(3,) fp32 on the step's device: [-(lr / bc1), 1 / float(sqrt(bc2)), float(sqrt(bc2))],
    from the 0-d step counter without reading it (fp64 as the reference's python floats)."""
    s = step.double()
    step_size = h.lr / (1 - h.beta1 ** s)
    bc2_sqrt = ((1 - h.beta2 ** s) ** 0.5).float()
    return torch.stack([(-step_size).float(), 1.0 / bc2_sqrt, bc2_sqrt])


_ROUNDING: dict = {}


def torch_cuda_rounding(device) -> dict:
    """How torch's CUDA kernels round ``lerp``, ``addcmul``, ``addcdiv`` and a division by a
    python scalar in this build: whether an FMA contracts the multiply-add is the source's and
    nvcc's choice, and has changed between releases. Each op is compared once with every
    candidate (single roundings composed from separate torch ops; an FMA as fp64 arithmetic
    rounded once) on 2^20 random elements and the matching one is kept, so the kernel replays
    the reference's roundings. One host read, at the first step of the process."""
    key = str(device)
    if key in _ROUNDING:
        return _ROUNDING[key]
    g = torch.Generator(device=device).manual_seed(0)
    a, b, c = (torch.randn(1 << 20, device=device, generator=g) for _ in range(3))
    c = c.abs() + 0.5

    def f32(x):
        return torch.tensor(x, dtype=torch.float32, device=device)

    def fma(x, y, z):  # fp32 fma: the fp64 product is exact, one rounding of the fp64 sum
        return (x.double() * y.double() + z.double()).float()

    def pick(ref, cands):
        misses = [int((x != ref).sum()) for x in cands]
        return misses.index(min(misses))

    w, alpha, sv, d = 0.1, 0.05, -0.0123, 0.7
    rounding = {
        "LERP_FMA": pick(a.lerp(b, w), [a + f32(w) * (b - a), fma(f32(w), b - a, a)]),
        "ADDCMUL": pick(a.addcmul(b, b, value=alpha),
                        [fma(f32(alpha), b * b, a), fma(f32(alpha) * b, b, a),
                         a + (f32(alpha) * b) * b]),
        "ADDCDIV": pick(a.addcdiv(b, c, value=sv),
                        [fma(f32(sv), b / c, a), a + (f32(sv) * b) / c, a + f32(sv) * (b / c)]),
        "DIV_RECIP": pick(b / d, [b / f32(d), b * (1.0 / f32(d))]),
    }
    _ROUNDING[key] = rounding
    return rounding


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def lean_adamw_cuda(params: list, states: list, h: AdamHyper, modes: list, *,
                    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    seeds: list, tiles: Optional[tuple[int, int]] = None,
                    amax: Optional[list] = None) -> None:
    """The update of ``params`` (already stepped counters in ``states``; ``modes[i]`` the
    master mode of params[i], see LeanAdamW.mode_of), one launch each.

    ``amax``: per parameter None or a zeroed int32 (1,) tensor that receives max |param| after
    the step as float32 bits (bf16 parameters: bf16_remainder / bf16_stochastic), read by the
    tensorwise FP8 weight cache instead of a pass over the weight.

    All counters of a group advance together, so the first one's bias corrections serve all.
    ``tiles``: (BLOCK, NUM_WARPS) instead of the module's (the benchmark's candidates)."""
    if not available():
        raise RuntimeError("lean AdamW on CUDA needs Triton; install triton or run on CPU")
    scal = bias_scalars(states[0]["step"], h)
    rounding = torch_cuda_rounding(params[0].device)
    w1, beta2 = 1 - h.beta1, h.beta2
    decay = 1 - h.lr * h.weight_decay
    block, num_warps = tiles or (BLOCK, NUM_WARPS)
    amax = amax or [None] * len(params)
    for p, st, master_weights, seed, am in zip(params, states, modes, seeds, amax):
        if am is not None and (master_weights == "fp32" or am.dtype != torch.int32):
            raise ValueError(f"lean AdamW kernel: an amax is made for bf16 parameters into an "
                             f"int32 tensor, got master_weights={master_weights}, {am.dtype}")
        for name, t in (("param", p), ("grad", p.grad), ("exp_avg", st["exp_avg"]),
                        ("exp_avg_sq", st["exp_avg_sq"])):
            if not t.is_contiguous():
                raise ValueError(f"lean AdamW kernel: {name} of shape {tuple(t.shape)} is not "
                                 f"contiguous")
        rem = st.get("remainder")
        n = p.numel()
        fast = master_weights == "bf16_stochastic"
        _lean_adamw_kernel[(triton.cdiv(n, block),)](
            _bits(p.data), p.grad, st["exp_avg"], st["exp_avg_sq"],
            rem if rem is not None else st["exp_avg"], st["step"], scal,
            grad_scale if grad_scale is not None else scal,
            found_inf if found_inf is not None else scal,
            am if am is not None else scal, n, decay, w1, beta2, 1 - beta2, h.eps, seed % (2 ** 31),
            MASTER=_MASTER_CODE[master_weights],
            BF16_MOMENTS=st["exp_avg"].dtype == torch.bfloat16, AMAX=am is not None,
            HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
            HAS_DECAY=h.weight_decay != 0, SMALL_W1=w1 < 0.5,
            NEED_NOISE=master_weights == "bf16_stochastic" or st["exp_avg"].dtype == torch.bfloat16,
            FAST_MATH=fast, BLOCK=block, **rounding,
            num_warps=num_warps, enable_fp_fusion=fast)
