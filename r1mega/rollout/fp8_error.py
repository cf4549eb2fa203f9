"""How far the FP8 KV cache moves decode attention: the error e4m3 predicts, from the format alone.

Tests of the FP8 decode path compare against attention over the *unquantised* K/V, where a fixed
tolerance would be a guess: the error depends on the scores' spread, the context length and the
row scales. This module predicts it instead, element by element, for the unquantised inputs.

Rounding model. :func:`r1mega.rollout.kv_cache.quantize_rows` stores x as ``s * round(x / s)``
with s = the row's amax / 448, rounding to the e4m3 grid: steps of 2^(e-3) in the binade
[2^e, 2^(e+1)) (3 mantissa bits), 2^-9 below 2^-6 (subnormals). Round to nearest makes each
element's error uniform on +-half a step, independent across elements: variance
``(s * step)^2 / 12``.

First order. With p = softmax(c q.k_j) and o = sum_j p_j v_j, key errors move each score by
d_j = c q.(k^_j - k_j), and to first order in d and in the value errors e_j,

    o^ - o ~= sum_j p_j d_j (v_j - o) + sum_j p_j e_j          (the mean shift of d cancels,
                                                                since sum_j p_j (v_j - o) = 0)

so Var(o^ - o) = sum_j p_j^2 (Var(d_j) (v_j - o)^2 + Var(e_j)), Var(d_j) = c^2 sum_d q_d^2 Var(k_jd).
The terms are independent across keys and d_j is a sum of D independent roundings, so the error
is close to Gaussian with this standard deviation: tests bound each element by a few sigma and
the error's RMS to within a band of the predicted RMS (it is neither larger nor, which would mean
the cache was not rounded at all, much smaller).
"""
from __future__ import annotations

import torch

from r1mega.rollout.kv_cache import FP8_MAX

E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_SUBNORMAL_STEP = 2.0 ** -9


def e4m3_step(y: torch.Tensor) -> torch.Tensor:
    """Spacing of the e4m3 grid around y (|y| <= 448), float64, same shape."""
    a = y.double().abs()
    binade = torch.floor(torch.log2(a.clamp_min(E4M3_MIN_NORMAL)))  # e of [2^e, 2^(e+1))
    return torch.where(a < E4M3_MIN_NORMAL, torch.full_like(a, E4M3_SUBNORMAL_STEP), 2.0 ** (binade - 3))


def rounding_variance(x: torch.Tensor) -> torch.Tensor:
    """(..., D) rows -> (..., D) float64 variance of each element's error in quantize_rows
    (uniform on +-half a step, times the row's scale). The row's largest element lands on 448
    itself: its only error is the float32 rounding of the scale and of the dequantising product,
    at most 2^-23 of it."""
    x = x.double()
    amax = x.abs().amax(-1, keepdim=True)  # (..., 1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    var = (s * e4m3_step(x / s)) ** 2 / 12
    return torch.where(x.abs() == amax, (amax * 2.0 ** -23) ** 2 / 3, var)


def decode_error_model(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float):
    """Decode attention over the *unquantised* paged K/V and the first-order standard deviation
    of the error an e4m3 cache of them adds (module docstring).

    q (B, Hq, D); caches (N, bs, Hkv, D) unquantised; block_tables (B, W); ctx_lens (B,).
    Returns (exact (B, Hq, D), sigma (B, Hq, D)), both float64. Query head h reads KV head
    h // (Hq / Hkv), as the kernels and SDPA's enable_gqa do."""
    bs, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rep = q.shape[1] // hkv
    width = block_tables.shape[1] * bs
    j = torch.arange(width, device=q.device)
    slots = block_tables.long()[:, j // bs] * bs + j % bs  # (B, L)
    k = k_cache.reshape(-1, hkv, d)[slots].double()  # (B, L, Hkv, D)
    v = v_cache.reshape(-1, hkv, d)[slots].double()
    var_k = rounding_variance(k).repeat_interleave(rep, 2)  # (B, L, Hq, D)
    var_v = rounding_variance(v).repeat_interleave(rep, 2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    qd = q.double()
    s = torch.einsum("bhd,blhd->bhl", qd, k) * scale  # (B, Hq, L)
    live = (j[None, :] < ctx_lens.long()[:, None])[:, None, :]  # (B, 1, L)
    p = s.masked_fill(~live, float("-inf")).softmax(-1)  # (B, Hq, L)
    o = torch.einsum("bhl,blhd->bhd", p, v)  # (B, Hq, D)
    var_score = scale ** 2 * torch.einsum("bhd,blhd->bhl", qd * qd, var_k)  # Var(d_j): (B, Hq, L)
    w2 = (v - o[:, None]) ** 2  # (B, L, Hq, D)
    var = torch.einsum("bhl,blhd->bhd", p * p * var_score, w2) + torch.einsum("bhl,blhd->bhd", p * p, var_v)
    return o, var.sqrt()
