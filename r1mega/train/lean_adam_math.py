"""The math of the memory-lean AdamW (``optimizer.master_weights`` / ``optimizer.moments_dtype``):
pure PyTorch functions, the CPU path and the reference of the Triton kernel (r1mega/ops/lean_adam_triton.py).

bf16_remainder: the fp32 master is stored as the bf16 parameter (its top 16 bits, rounded) plus
an int16 remainder (its low 16 bits, signed), 2 extra bytes per parameter and exactly the fp32
master. The bf16 the model sees is the master rounded to nearest with ties *away from zero*, not
to even: a round-to-nearest-even bf16 has 65,537 fp32 values on an even bf16 (both ties) and
65,535 on an odd one, so no 16-bit remainder could rebuild every master; ties away from zero give
each bf16 exactly 65,536 masters, [hi - 2^15, hi + 2^15) in the bit pattern (Transformer
Engine's ``store_param_remainders`` makes the same choice). Truncation would also be exact but
bias the model's weights toward zero by half a bf16 step.

bf16_stochastic: no master; the update is computed in fp32 and written to bf16 with stochastic
rounding (a uniform 16-bit number added under the kept bits), so the stored weight is the fp32
result in expectation.

The update replays torch's single-tensor AdamW (``torch.optim.adam._single_tensor_adam``) op for
op in fp32, so that with fp32 moments the remainder mode is bit-identical to megatron's
fp32-master path; the only additions are the ``grad_scale`` division and ``found_inf`` skip of
torch's fused kernel (the sync-free clip, r1mega/train/device_step.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MASTER_MODES = ("fp32", "bf16_remainder", "bf16_stochastic")
MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (...) -> (bf16 (...), int16 (...)): nearest bf16 (ties away from zero) + remainder.

    Works on the bit pattern (sign | magnitude): adding 2^15 rounds the magnitude half up, the
    arithmetic shift keeps the top 16 bits, and the remainder is what those 16 bits miss, in
    [-2^15, 2^15). int64 so that no intermediate overflows."""
    bits = master.contiguous().view(torch.int32).to(torch.int64)             # (...)
    hi = torch.div(bits + 0x8000, 65536, rounding_mode="floor")                # (...) in int16 range
    lo = bits - hi * 65536                                                     # (...) in [-2^15, 2^15)
    # A NaN keeps its class: rounding would carry a mantissa of all ones (the GPU's canonical
    # NaN, 0x7FFFFFFF) into the sign and make it -0.0. Non-finite masters are truncated, a NaN
    # keeps a quiet bit, and their remainder is 0 (join_master gives the same class back).
    nonfinite = (bits & 0x7F800000) == 0x7F800000
    trunc = torch.div(bits, 65536, rounding_mode="floor") | torch.where(
        (bits & 0x7FFFFF) != 0, 0x40, 0)
    hi = torch.where(nonfinite, trunc, hi)
    lo = torch.where(nonfinite, 0, lo)
    return hi.to(torch.int16).view(torch.bfloat16), lo.to(torch.int16)


def join_master(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """(bf16 (...), int16 (...)) -> the exact fp32 master (...); inverse of :func:`split_master`."""
    hi = param.contiguous().view(torch.int16).to(torch.int64)
    bits = hi * 65536 + remainder.to(torch.int64)
    return bits.to(torch.int32).view(torch.float32)


def amax_bits(param: torch.Tensor) -> torch.Tensor:
    """bf16 (...) -> int32 (1,): max |param| as float32 bits (the magnitude's bf16 bits moved to
    float32's position). Integer order is float order for magnitudes, with NaN above inf, so a
    NaN gives NaN's bits: what the optimizer kernel reports (r1mega/ops/lean_adam_triton.py)."""
    mag = param.detach().reshape(-1).view(torch.int16).to(torch.int32) & 0x7FFF   # (n,)
    top = mag.amax() if mag.numel() else mag.new_zeros(())
    return (top << 16).reshape(1)


def stochastic_round_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 (...) -> bf16 (...), rounded up with probability (distance to the lower neighbour) /
    (bf16 step): ``noise`` (...) uniform integers in [0, 2^16). Unbiased: E[result] = x.

    The noise is added to the magnitude bits, so negative values round symmetrically; a carry
    into the exponent lands on the next bf16, which is the upper neighbour. Non-finite values
    keep their class (inf stays inf)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    hi = torch.div(bits + noise.to(torch.int64), 65536, rounding_mode="floor")
    out = hi.to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


def bf16_noise(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """(shape) int32 uniform in [0, 2^16) from a seeded generator: the CPU stand-in for the
    kernel's Philox stream (same distribution; the bits differ, which the stochastic mode allows)."""
    return torch.randint(0, 65536, tuple(shape), generator=generator, dtype=torch.int32,
                         device=device or generator.device)


@dataclass
class AdamHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def adamw_update_reference(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                           exp_avg_sq: torch.Tensor, step: int, h: AdamHyper,
                           grad_scale: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step in fp32 on fresh tensors: (master', exp_avg', exp_avg_sq'), all fp32 (...).

    master (...) fp32; grad (...) any float dtype; moments (...) fp32 or bf16, upcast exactly;
    ``step`` the count *after* this update (bias correction); ``grad_scale`` 0-d fp32, every
    gradient is divided by it (1 / clip coefficient). Op for op torch's single-tensor AdamW:
    python-float bias corrections, ``lerp`` for the first moment, ``mul + addcmul`` for the second."""
    g = grad.float()                                                            # (...)
    if grad_scale is not None:
        g = g / grad_scale
    p = master.clone()
    if h.weight_decay != 0:
        p.mul_(1 - h.lr * h.weight_decay)          # decoupled: the decay never enters the moments
    m = exp_avg.float().clone().lerp_(g, 1 - h.beta1)
    v = exp_avg_sq.float().clone().mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    bias_correction1 = 1 - h.beta1 ** step
    bias_correction2 = 1 - h.beta2 ** step
    step_size = h.lr / bias_correction1
    denom = (v.sqrt() / bias_correction2 ** 0.5).add_(h.eps)
    p.addcdiv_(m, denom, value=-step_size)
    return p, m, v


def store_moments(m: torch.Tensor, v: torch.Tensor, dtype: torch.dtype,
                  v_noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 moments -> storage dtype. bf16: exp_avg rounded to nearest (beta1 moves it by 10% a
    step, far above bf16's 0.4% resolution); exp_avg_sq stochastically (``v_noise``): beta2 = 0.999
    moves it by 0.1% a step, under half a bf16 step, so round-to-nearest would freeze it."""
    if dtype == torch.float32:
        return m, v
    return m.to(torch.bfloat16), stochastic_round_bf16(v, v_noise)


def lean_step_reference(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor, remainder: Optional[torch.Tensor], step: int,
                        h: AdamHyper, master_weights: str, *,
                        grad_scale: Optional[torch.Tensor] = None,
                        found_inf: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> dict:
    """The whole lean update of one tensor, as new tensors (the optimizer copies them back).

    param (...) bf16 (fp32 for master_weights=fp32); remainder (...) int16 or None; found_inf
    0-d, non-zero: everything comes back unchanged. Returns {param, exp_avg, exp_avg_sq,
    remainder}. ``generator`` feeds the stochastic roundings (bf16_stochastic, bf16 moments)."""
    if master_weights == "bf16_remainder":
        master = join_master(param, remainder)
    else:
        master = param.float()
    p, m, v = adamw_update_reference(master, grad, exp_avg, exp_avg_sq, step, h, grad_scale)
    need_noise = master_weights == "bf16_stochastic" or exp_avg_sq.dtype == torch.bfloat16
    if need_noise and generator is None:
        raise ValueError("lean_step_reference: stochastic rounding needs a seeded generator")
    v_noise = bf16_noise(v.shape, generator, v.device) if exp_avg_sq.dtype == torch.bfloat16 else None
    m, v = store_moments(m, v, exp_avg.dtype, v_noise)
    rem = None
    if master_weights == "bf16_remainder":
        new_param, rem = split_master(p)
    elif master_weights == "bf16_stochastic":
        new_param = stochastic_round_bf16(p, bf16_noise(p.shape, generator, p.device))
    else:
        new_param = p.to(param.dtype)
    out = {"param": new_param, "exp_avg": m, "exp_avg_sq": v, "remainder": rem}
    if found_inf is not None:
        skip = found_inf.reshape(()) != 0
        old = {"param": param, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "remainder": remainder}
        out = {k: (torch.where(skip, old[k], t) if t is not None else None) for k, t in out.items()}
    return out
