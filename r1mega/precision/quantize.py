"""FP8 quantisation: the scale arithmetic and the PyTorch reference of every granularity.

Every GEMM operand is a 2-D matrix whose *rows run along the contraction dimension*: the GEMM is
``out = a @ b.T`` with ``a`` (M, K) and ``b`` (N, K) (see r1mega/precision/gemm.py). The scale
granularities, all taken along K:

  tensor  one scale for the whole matrix            scale (1, 1)
  row     one scale per row                          scale (R, 1)
  tile    one scale per 1x128 run of a row           scale (R, ceil(C/128))
  block   one scale per 128x128 block                scale (ceil(R/128), ceil(C/128))

Ragged edges: a tile/block at the right or bottom edge holds fewer elements; its amax is taken
over the elements that exist (as if padded with zeros, which cannot raise an amax).

Scale arithmetic (per tile; ``fmax`` = the format's largest finite value):
  mult  = fmax / amax              maps the tile's largest magnitude onto the format's
  mult  = min(mult, FLT_MAX)       a denormal-tiny amax would make it inf
  mult  = 2^floor(log2(mult))      optional (power2): an exponent shift, exact to undo
  mult  = 1 where amax == 0        an all-zero tile; any scale works, 1 keeps it plain
  q     = clamp(x * mult, -fmax, fmax) -> fp8 (round to nearest even)
  scale = 1 / mult                 the *dequantisation* scale (what scaled_mm multiplies by)
A NaN in a tile makes its amax NaN and the whole tile NaN; an inf makes mult 0 and the tile's
dequantised values NaN. Bad numbers therefore surface (the step's non-finite check sees them)
rather than being saturated into plausible finite values.

``quantize`` dispatches to the fused Triton kernel (r1mega/precision/triton_quant.py) on CUDA,
``quantize_dual`` to it or to the CUDA one (r1mega/precision/cuda_quant.py, ``R1MEGA_FP8_QUANT``);
``quantize_reference`` here is their CPU path and their reference (tests/gpu compare them bitwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
GRANULARITIES = ("tensor", "row", "tile", "block")
BLOCK = 128  # DeepSeek-V3's tile length and block side; cuBLAS's blockwise kernels fix it too
_FLT_MAX = torch.finfo(torch.float32).max
_EXPONENT_BITS = 0x7F800000


@dataclass
class Fp8Tensor:
    """An FP8 matrix and its dequantisation scales: ``value ~= data.float() * expand(scale)``."""

    data: torch.Tensor   # (R, C) float8, row-major
    scale: torch.Tensor  # float32, shape per granularity (see module docstring), any strides
    granularity: str
    fmt: str             # "e4m3" | "e5m2"

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def scale_shape(rows: int, cols: int, granularity: str) -> tuple[int, int]:
    nb = lambda n: -(-n // BLOCK)  # noqa: E731  ceil(n / 128)
    return {"tensor": (1, 1), "row": (rows, 1), "tile": (rows, nb(cols)),
            "block": (nb(rows), nb(cols))}[granularity]


def multiplier_from_amax(amax: torch.Tensor, fmt: str, power2: bool) -> torch.Tensor:
    """Quantisation multiplier per tile from its float32 amax (see module docstring)."""
    amax = amax.float()
    mult = torch.full_like(amax, FP8_MAX[fmt]) / amax
    mult = torch.where(mult > _FLT_MAX, torch.full_like(mult, _FLT_MAX), mult)
    if power2:
        # 2^floor(log2(m)) by clearing the mantissa bits: exact, and the Triton kernel does the
        # same bit operation, so both agree to the bit. NaN (amax NaN) is kept as NaN.
        p2 = (mult.view(torch.int32) & _EXPONENT_BITS).view(torch.float32)
        mult = torch.where(mult == mult, p2, mult)
    return torch.where(amax == 0, torch.ones_like(mult), mult)


def _tile_amax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """(R, C) -> amax per tile, shaped like ``scale_shape`` (NaN propagates)."""
    r, c = x.shape
    a = x.float().abs()
    if granularity == "tensor":
        return a.amax().reshape(1, 1) if a.numel() else a.new_zeros(1, 1)
    if granularity == "row":
        return a.amax(dim=1, keepdim=True) if c else a.new_zeros(r, 1)
    rb, cb = scale_shape(r, c, granularity)
    pad_c = cb * BLOCK - c
    if granularity == "tile":
        a = torch.nn.functional.pad(a, (0, pad_c))                     # (R, cb*128)
        return a.view(r, cb, BLOCK).amax(dim=2)                         # (R, cb)
    a = torch.nn.functional.pad(a, (0, pad_c, 0, rb * BLOCK - r))       # (rb*128, cb*128)
    return a.view(rb, BLOCK, cb, BLOCK).amax(dim=(1, 3))                # (rb, cb)


def expand_scale(scale: torch.Tensor, rows: int, cols: int, granularity: str) -> torch.Tensor:
    """Per-tile values -> (R, C) (or broadcastable) per-element values."""
    if granularity in ("tensor", "row"):
        return scale.reshape(-1, 1) if granularity == "row" else scale.reshape(1, 1)
    s = scale.repeat_interleave(BLOCK, dim=1)[:, :cols]
    if granularity == "block":
        s = s.repeat_interleave(BLOCK, dim=0)[:rows]
    return s


def _check_given_amax(granularity: str, amax) -> None:
    if amax is not None and granularity != "tensor":
        raise ValueError(f"quantize: a given amax is one value for the whole tensor; granularity "
                         f"{granularity!r} takes its amaxes from the tiles")


def quantize_reference(x: torch.Tensor, granularity: str, fmt: str = "e4m3",
                       power2: bool = False, amax: Optional[torch.Tensor] = None) -> Fp8Tensor:
    """PyTorch quantiser: (R, C) float -> Fp8Tensor (any strides in; row-major data out).
    ``amax``: tensorwise only, max |x| computed by the caller (one float32 value, NaN if x
    holds one): what the compiled FP8 linear passes, fused into the op that made x."""
    if x.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D (rows, contraction) matrix, got {tuple(x.shape)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"quantize: granularity {granularity!r} is not one of {GRANULARITIES}")
    _check_given_amax(granularity, amax)
    r, c = x.shape
    tiles = _tile_amax(x, granularity) if amax is None else amax.float().reshape(1, 1)
    mult = multiplier_from_amax(tiles, fmt, power2)   # scale_shape
    fmax = FP8_MAX[fmt]
    v = x.float() * expand_scale(mult, r, c, granularity)
    v = torch.where(v > fmax, torch.full_like(v, fmax), v)
    v = torch.where(v < -fmax, torch.full_like(v, -fmax), v)
    data = v.to(FP8_DTYPES[fmt]).contiguous()
    return Fp8Tensor(data=data, scale=1.0 / mult, granularity=granularity, fmt=fmt)


def dequantize(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fp8Tensor -> (R, C) ``dtype`` (float32 product, then cast)."""
    r, c = q.data.shape
    return (q.data.float() * expand_scale(q.scale, r, c, q.granularity)).to(dtype)


def quantize(x: torch.Tensor, granularity: str, fmt: str = "e4m3", power2: bool = False,
             *, impl: str = "auto", amax: Optional[torch.Tensor] = None,
             out: Optional[Fp8Tensor] = None) -> Fp8Tensor:
    """Quantise ``x`` (R, C); ``impl`` auto = fused Triton kernel on CUDA, else the reference;
    ``amax``: tensorwise, the caller's max |x| (see :func:`quantize_reference`); ``out``: an
    Fp8Tensor of the same layout to write into (and return) instead of new tensors (checked
    by whichever path runs: the kernels' scale strides too)."""
    if impl == "triton" or (impl == "auto" and x.is_cuda):
        from r1mega.precision import triton_quant

        if triton_quant.available():
            return triton_quant.quantize_triton(x, granularity, fmt, power2, amax=amax, out=out)
        if impl == "triton":
            raise RuntimeError("quantize(impl='triton'): Triton is not importable here.")
    return _into(quantize_reference(x, granularity, fmt, power2, amax), out)


def out_problems(out: Fp8Tensor, shape, granularity: str, fmt: str, device,
                 kernel_layout: bool = False) -> list[str]:
    """What keeps ``out`` from holding what the quantiser makes (empty: nothing): same shape,
    format, granularity and device, row-major data; with ``kernel_layout`` also the fused
    kernels' scale strides (cuBLAS's column-major tiles), which they write through."""
    r, c = shape
    want = scale_shape(r, c, granularity)
    bad = []
    if (out.granularity, out.fmt) != (granularity, fmt):
        bad.append(f"granularity/format {out.granularity}/{out.fmt}, not {granularity}/{fmt}")
    if tuple(out.data.shape) != (r, c) or out.data.dtype != FP8_DTYPES[fmt] or not out.data.is_contiguous():
        bad.append(f"data {tuple(out.data.shape)} {out.data.dtype} (contiguous: "
                   f"{out.data.is_contiguous()}), not ({r}, {c}) {FP8_DTYPES[fmt]} row-major")
    strides = (1, want[0]) if granularity == "tile" else (want[1], 1)
    if tuple(out.scale.shape) != want or out.scale.dtype != torch.float32 or (
            kernel_layout and out.scale.numel() > 1 and tuple(out.scale.stride()) != strides):
        bad.append(f"scale {tuple(out.scale.shape)} {out.scale.dtype} strides {tuple(out.scale.stride())}, "
                   f"not {want} float32" + (f" strides {strides}" if kernel_layout else ""))
    if out.data.device != torch.device(device) or out.scale.device != torch.device(device):
        bad.append(f"device {out.data.device}, not {device}")
    return bad


def check_out(out: Fp8Tensor, shape, granularity: str, fmt: str, device, kernel_layout: bool = False) -> None:
    """Raises naming what keeps ``out`` from taking the result (see :func:`out_problems`)."""
    bad = out_problems(out, shape, granularity, fmt, device, kernel_layout)
    if bad:
        raise ValueError("quantize(out=...): " + "; ".join(bad))


def reusable(old: Optional[Fp8Tensor], src: torch.Tensor, granularity: str,
             fmt: str = "e4m3") -> Optional[Fp8Tensor]:
    """``old`` where :func:`quantize` of ``src`` can write into it (on CUDA with the fused
    kernels' scale strides), else None: a weight cache's stale copy, refreshed in place."""
    if old is None or out_problems(old, src.shape, granularity, fmt, src.device, kernel_layout=src.is_cuda):
        return None
    return old


def _into(q: Fp8Tensor, out: Optional[Fp8Tensor]) -> Fp8Tensor:
    """``q`` copied into ``out`` (the reference path's form of writing in place)."""
    if out is None:
        return q
    check_out(out, q.data.shape, q.granularity, q.fmt, q.data.device)
    out.data.copy_(q.data)
    out.scale.copy_(q.scale)
    return out


def quantize_dual(x: torch.Tensor, granularity: str, fmt: str = "e4m3", power2: bool = False,
                  *, impl: str = "auto", amax: Optional[torch.Tensor] = None,
                  out: Optional[tuple[Fp8Tensor, Fp8Tensor]] = None) -> tuple[Fp8Tensor, Fp8Tensor]:
    """``(quantize(x), quantize(x.t()))``; on CUDA one fused read (tensor, tile or block):
    ``impl`` auto = the kernel ``R1MEGA_FP8_QUANT`` names (r1mega/precision/cuda_quant.py) where
    it takes x, else Triton's; ``cuda`` / ``triton`` force one; ``reference`` the PyTorch path.
    ``out``: the pair of Fp8Tensors to write into (as :func:`quantize`'s)."""
    if impl == "cuda" or (impl == "auto" and x.is_cuda):
        from r1mega.precision import cuda_quant

        if impl == "cuda" or (cuda_quant.dual_impl() == "cuda"
                              and cuda_quant.why_not(x, granularity) is None
                              and cuda_quant.get() is not None):
            return cuda_quant.quantize_dual_cuda(x, granularity, fmt, power2, amax=amax, out=out)
    if impl == "triton" or (impl == "auto" and x.is_cuda):
        from r1mega.precision import triton_quant

        if triton_quant.available():
            return triton_quant.quantize_dual_triton(x, granularity, fmt, power2, amax=amax, out=out)
        if impl == "triton":
            raise RuntimeError("quantize_dual(impl='triton'): Triton is not importable here.")
    q = quantize_reference(x, granularity, fmt, power2, amax)
    qt = quantize_reference(x.t(), granularity, fmt, power2, amax)
    if out is None:
        return q, qt
    return _into(q, out[0]), _into(qt, out[1])
