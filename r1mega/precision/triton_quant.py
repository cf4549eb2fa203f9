"""Fused Triton FP8 quantisers: one kernel reads each tile, computes its scale, writes FP8.

The PyTorch reference is :func:`r1mega.precision.quantize.quantize_reference` (its docstring
has the scale arithmetic); ``tests/gpu/test_fp8_gpu.py`` compares the two bit for bit.

  _quant_rows_kernel    grid (ceil(R/16), n_tiles): 16 rows x one tile per program, read in
                        (16, 128) blocks: 1x128 tiles; whole rows for the rowwise recipe (read
                        twice: amax, then scale and write); or every tile under a given amax
                        (tensorwise: the amax comes from one reduction kernel before).
  _quant_blocks_kernel  grid (ceil(R/128), ceil(C/128)): one 128x128 weight block (and, for
                        quantize_dual, the same block of w.T: the dgrad copy from one read).
  _quant_dual_kernel    grid (ceil(R/128), ceil(C/128)): x and x.T from one read of a block
                        (the FP8 linear's activation and gradient: forward/dgrad want them
                        quantised along features, wgrad along tokens); tensor or tile scales.
  _quant_dual_persistent_kernel  the same, a program an SM walking the blocks, the next
                        ones copied into shared memory by the loop's software pipeline
                        (``R1MEGA_FP8_QUANT_PERSISTENT``).
  _amax_kernel          the tensorwise recipe's amax: one read of a dense tensor, each program
                        folds its chunks into one integer atomic max (a non-negative float's bits
                        order like the float, and a NaN's above inf, so NaN propagates).

Both take the input's strides (a transposed view is quantised without a copy: wgrad's
operands are dy.T and x.T) and the scale tensor's strides, so the scales are written straight
into the column-major layout cuBLAS wants (r1mega/precision/gemm.py allocates it).

Bit-exactness with the reference: ``fmax / amax`` and ``1 / mult`` use IEEE division
(``div_rn``; Triton's ``/`` is the approximate ``div.full``); the power-of-2 rounding is the
same mantissa-clearing bit operation; the clamp keeps NaN; fp32 -> fp8 rounds to nearest even
in both (``cvt.rn.satfinite``, and the clamp makes saturation moot). ``tl.max`` on floats may
drop NaN, so amaxes are integer maxima of |x|'s bits (``_abs_bits``), which keep it. Triton's ``div_rn`` flushes denormal
results, so a tile whose amax is below about 1e-36 (its scale 1/mult denormal) may differ.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega import switches
from r1mega.precision.quantize import (BLOCK, FP8_DTYPES, FP8_MAX, Fp8Tensor, _check_given_amax,
                                       check_out, scale_shape)

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU machines without Triton
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON and torch.cuda.is_available()


def persistent_launch() -> bool:
    """``R1MEGA_FP8_QUANT_PERSISTENT``: the dual quantisers (this Triton one and csrc's CUDA one)
    launched persistent, a few programs an SM walking the blocks and each loading its next block
    while it works on one, against one program a block (tools/fp8_quant_sweep.py times both).
    Read at each call, so that a bench row may set it."""
    return switches.flag("R1MEGA_FP8_QUANT_PERSISTENT", False,
                         "the dual quantisers' persistent launch, the next block prefetched")


if _HAVE_TRITON:
    try:
        _div_rn = tl.math.div_rn
    except AttributeError:  # pragma: no cover - older Triton keeps it in libdevice
        from triton.language.extra.cuda.libdevice import div_rn as _div_rn

    @triton.jit
    def _multiplier(amax, FMAX: tl.constexpr, POWER2: tl.constexpr):
        """The scale arithmetic of quantize.multiplier_from_amax, per tile (fp32, any shape)."""
        mult = tl.math.div_rn(tl.zeros_like(amax) + FMAX, amax)
        FLT_MAX: tl.constexpr = 3.4028234663852886e38
        mult = tl.where(mult > FLT_MAX, FLT_MAX, mult)
        if POWER2:
            bits = mult.to(tl.int32, bitcast=True) & 0x7F800000
            mult = tl.where(mult == mult, bits.to(tl.float32, bitcast=True), mult)
        return tl.where(amax == 0.0, 1.0, mult)

    @triton.jit
    def _abs_bits(v):
        """|v| (fp32) as int32 bits: they order like the floats, a NaN's above inf, so an integer
        max is the amax with NaN propagated (tl.max on floats may drop NaN)."""
        return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF

    @triton.jit
    def _q_vals(v, mult, FMAX: tl.constexpr, dtype: tl.constexpr):
        v = v * mult
        v = tl.where(v > FMAX, FMAX, v)
        v = tl.where(v < -FMAX, -FMAX, v)
        return v.to(dtype)

    @triton.jit
    def _store_q(q_ptr, offs, mask, v, mult, FMAX: tl.constexpr):
        tl.store(q_ptr + offs, _q_vals(v, mult, FMAX, q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, R, C, TILE_C: tl.constexpr,
                           sxr, sxc, sqr, ssr, sst,
                           FMAX: tl.constexpr, POWER2: tl.constexpr, RB: tl.constexpr,
                           CHUNK: tl.constexpr, GIVEN_AMAX: tl.constexpr):
        # RB rows x one tile of TILE_C columns per program, read as (RB, CHUNK) blocks: whichever
        # of the two strides is 1, Triton's coalescing follows it (a transposed view included).
        pr = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1).to(tl.int64)
        rows = pr * RB + tl.arange(0, RB)                                  # (RB,)
        rmask = rows < R
        start = tile * TILE_C
        if GIVEN_AMAX:
            amax = tl.zeros([RB], tl.float32) + tl.load(amax_ptr).to(tl.float32)
        else:
            bits = tl.zeros([RB], tl.int32)
            for c0 in range(0, TILE_C, CHUNK):
                cols = start + c0 + tl.arange(0, CHUNK)
                m = rmask[:, None] & ((cols < C) & (cols < start + TILE_C))[None, :]
                v = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxc, mask=m, other=0.0)
                bits = tl.maximum(bits, tl.max(_abs_bits(v.to(tl.float32)), axis=1))
            amax = bits.to(tl.float32, bitcast=True)
        mult = _multiplier(amax, FMAX, POWER2)                                # (RB,)
        for c0 in range(0, TILE_C, CHUNK):
            cols = start + c0 + tl.arange(0, CHUNK)
            m = rmask[:, None] & ((cols < C) & (cols < start + TILE_C))[None, :]
            v = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxc, mask=m, other=0.0)
            _store_q(q_ptr, rows[:, None] * sqr + cols[None, :], m, v.to(tl.float32),
                     mult[:, None], FMAX)
        scale = tl.math.div_rn(tl.zeros_like(mult) + 1.0, mult)
        if GIVEN_AMAX:
            # one scale for the tensor: every program computed it, one lane of one writes it
            lane = tl.arange(0, RB)
            if (pr == 0) & (tile == 0):
                tl.store(s_ptr + lane * 0, scale, mask=lane == 0)
        else:
            tl.store(s_ptr + rows * ssr + tile * sst, scale, mask=rmask)

    @triton.jit
    def _load_tile(x_ptr, rows, cols, R, C, sxr, sxc):
        """x[rows][:, cols] as float32 (0 outside the R x C matrix) and its in-bounds mask."""
        m = (rows[:, None] < R) & (cols[None, :] < C)
        v = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxc, mask=m,
                    other=0.0).to(tl.float32)
        return m, v

    @triton.jit
    def _load_block(x_ptr, R, C, sxr, sxc, B: tl.constexpr):
        """Block (program_id(0), program_id(1)) of B x B: its rows, cols, mask, float32 values."""
        rows = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
        cols = tl.program_id(1).to(tl.int64) * B + tl.arange(0, B)
        m, v = _load_tile(x_ptr, rows, cols, R, C, sxr, sxc)
        return rows, cols, m, v

    @triton.jit
    def _quant_blocks_kernel(x_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, R, C, sxr, sxc, sqr, sqtr, ssr,
                             sst, stsr, stst, FMAX: tl.constexpr, POWER2: tl.constexpr,
                             B: tl.constexpr, DUAL: tl.constexpr):
        # DUAL: also x.T, whose (c, r) block is the (r, c) block transposed, same amax.
        br = tl.program_id(0).to(tl.int64)
        bc = tl.program_id(1).to(tl.int64)
        rows, cols, m, v = _load_block(x_ptr, R, C, sxr, sxc, B)              # v (B, B)
        amax = tl.max(tl.max(_abs_bits(v), axis=1), axis=0).to(tl.float32, bitcast=True)
        mult = _multiplier(amax, FMAX, POWER2)
        scale = tl.math.div_rn(tl.zeros_like(mult) + 1.0, mult)
        q_vals = _q_vals(v, mult, FMAX, q_ptr.dtype.element_ty)
        tl.store(q_ptr + rows[:, None] * sqr + cols[None, :], q_vals, mask=m)
        tl.store(s_ptr + br * ssr + bc * sst, scale)
        if DUAL:
            tl.store(qt_ptr + cols[:, None] * sqtr + rows[None, :], tl.trans(q_vals),
                     mask=tl.trans(m))
            tl.store(st_ptr + bc * stsr + br * stst, scale)

    @triton.jit
    def _dual_block(q_ptr, qt_ptr, s_ptr, st_ptr, amax_ptr, br, bc, rows, cols, m, v, R, C, sqr,
                    sqtr, ssr, sst, stsr, stst, FMAX: tl.constexpr, POWER2: tl.constexpr,
                    TENSOR: tl.constexpr):
        # One (B, B) block's values v (B rows, B cols, float32) written twice: q = x quantised
        # along its rows (1xB tiles, or under the tensor's amax) and qt = x.T quantised along its
        # rows, i.e. x's columns.
        if TENSOR:
            amax_r = tl.load(amax_ptr).to(tl.float32)                           # one scalar
            amax_c = amax_r
        else:
            bits = _abs_bits(v)
            amax_r = tl.max(bits, axis=1).to(tl.float32, bitcast=True)         # per row of x
            amax_c = tl.max(bits, axis=0).to(tl.float32, bitcast=True)         # per column of x
        mult_r = _multiplier(amax_r, FMAX, POWER2)
        mult_c = _multiplier(amax_c, FMAX, POWER2)
        if TENSOR:
            q_vals = _q_vals(v, mult_r, FMAX, q_ptr.dtype.element_ty)
            qt_vals = q_vals
        else:
            q_vals = _q_vals(v, mult_r[:, None], FMAX, q_ptr.dtype.element_ty)
            qt_vals = _q_vals(v, mult_c[None, :], FMAX, qt_ptr.dtype.element_ty)
        tl.store(q_ptr + rows[:, None] * sqr + cols[None, :], q_vals, mask=m)
        # x.T quantised in x's layout and transposed as FP8 (1 byte an element through shared
        # memory, not the 4 of the float32 block)
        tl.store(qt_ptr + cols[:, None] * sqtr + rows[None, :], tl.trans(qt_vals),
                 mask=tl.trans(m))
        scale_r = tl.math.div_rn(tl.zeros_like(mult_r) + 1.0, mult_r)
        scale_c = tl.math.div_rn(tl.zeros_like(mult_c) + 1.0, mult_c)
        if TENSOR:
            if (br == 0) & (bc == 0):
                tl.store(s_ptr, scale_r)
                tl.store(st_ptr, scale_c)
        else:
            tl.store(s_ptr + rows * ssr + bc * sst, scale_r, mask=rows < R)
            tl.store(st_ptr + cols * stsr + br * stst, scale_c, mask=cols < C)

    @triton.jit
    def _quant_dual_kernel(x_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, amax_ptr, R, C, sxr, sxc, sqr,
                           sqtr, ssr, sst, stsr, stst, FMAX: tl.constexpr, POWER2: tl.constexpr,
                           B: tl.constexpr, TENSOR: tl.constexpr):
        # grid (ceil(R / B), ceil(C / B)): one block a program
        rows, cols, m, v = _load_block(x_ptr, R, C, sxr, sxc, B)              # v (B rows, B cols)
        _dual_block(q_ptr, qt_ptr, s_ptr, st_ptr, amax_ptr, tl.program_id(0).to(tl.int64),
                    tl.program_id(1).to(tl.int64), rows, cols, m, v, R, C, sqr, sqtr, ssr, sst,
                    stsr, stst, FMAX, POWER2, TENSOR)

    @triton.jit
    def _quant_dual_persistent_kernel(x_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, amax_ptr, R, C, sxr,
                                      sxc, sqr, sqtr, ssr, sst, stsr, stst, n_blocks, nc,
                                      FMAX: tl.constexpr, POWER2: tl.constexpr, B: tl.constexpr,
                                      TENSOR: tl.constexpr, STAGES: tl.constexpr):
        # A program walks blocks pid, pid + programs, ... (row-major over the block grid); the
        # loop's software pipeline copies the next blocks into shared memory (cp.async, STAGES
        # deep) while the program reduces, quantises and stores the one it holds.
        pid = tl.program_id(0)
        for blk in tl.range(pid, n_blocks, tl.num_programs(0), num_stages=STAGES):
            br = (blk // nc).to(tl.int64)
            bc = (blk % nc).to(tl.int64)
            rows = br * B + tl.arange(0, B)
            cols = bc * B + tl.arange(0, B)
            m, v = _load_tile(x_ptr, rows, cols, R, C, sxr, sxc)
            _dual_block(q_ptr, qt_ptr, s_ptr, st_ptr, amax_ptr, br, bc, rows, cols, m, v, R, C,
                        sqr, sqtr, ssr, sst, stsr, stst, FMAX, POWER2, TENSOR)


    @triton.jit
    def _round_e4m3(y):
        # float32 |y| <= 448 -> the nearest e4m3 value (ties to even), still float32. Rounding
        # here, not in the conversion, makes the stored byte independent of how a Triton build
        # lowers fp32 -> fp8 (its interpreter mis-rounds values that carry into the next binade).
        bits = y.to(tl.uint32, bitcast=True)
        # Normal range: keep 3 of the 23 mantissa bits, round to nearest even (a carry moves
        # into the exponent, which is right).
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        # Subnormal range (|y| < 2^-6): multiples of 2^-9. Adding 1.5 * 2^14 (whose float32 ulp
        # is 2^-9) rounds |y| to that grid, ties to even; y's sign bit goes back on after, so a
        # negative value that rounds to zero is -0 as in torch's cast (a bit op, as
        # r1mega/rollout/triton_rope_kv.py's _negate explains).
        a = tl.abs(y)
        sub = ((a + 24576.0) - 24576.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
        return tl.where(a < 0.015625, sub.to(tl.float32, bitcast=True), normal)

    @triton.jit
    def _amax_kernel(x_ptr, out_ptr, n, iters, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        base = pid * iters * BLOCK_N
        acc = tl.zeros([BLOCK_N], tl.int32)
        for i in range(0, iters):
            offs = base + i * BLOCK_N + tl.arange(0, BLOCK_N)
            v = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        tl.atomic_max(out_ptr, tl.max(acc, axis=0))


_ROWS_PER_PROGRAM = 16
_DUAL_WARPS = {"tensor": 4, "tile": 4, "block": 8}   # per 128x128 block; tools/fp8_quant_sweep.py
# the persistent dual kernel: 8 warps of ~255 registers (ptxas, Triton 3.6, sm_90) fill an SM's
# register file, so one program an SM; its loop's pipeline depth (tools/fp8_quant_sweep.py)
_PERSISTENT = {"warps": 8, "per_sm": 1, "stages": 2}
_AMAX_BLOCK = 4096
_AMAX_PROGRAMS = 2048   # enough to fill the GPU many times over; few enough that the one
                        # address's atomics stay negligible


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 (1,) tensor on x's device, NaN if x holds one, no host sync."""
    flat = x if x.is_contiguous() else x.t() if x.dim() == 2 and x.t().is_contiguous() else None
    if flat is None or x.numel() == 0:
        return torch.linalg.vector_norm(x, ord=float("inf")).float().reshape(1)
    n = flat.numel()
    iters = triton.cdiv(triton.cdiv(n, _AMAX_BLOCK), _AMAX_PROGRAMS)
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    _amax_kernel[(triton.cdiv(n, _AMAX_BLOCK * iters),)](flat, out, n, iters, BLOCK_N=_AMAX_BLOCK,
                                                          num_warps=8)
    return out.view(torch.float32)


def new_scale(rows: int, cols: int, granularity: str, device) -> torch.Tensor:
    """Scale tensor of ``scale_shape``, column-major for tiles (cuBLAS: "strides (1, M)")."""
    r, c = scale_shape(rows, cols, granularity)
    if granularity == "tile":
        return torch.empty(c, r, dtype=torch.float32, device=device).t()   # (R, nt), strides (1, R)
    return torch.empty(r, c, dtype=torch.float32, device=device)


def out_buffers(out: Optional[Fp8Tensor], r: int, c: int, granularity: str, fmt: str, device):
    """(data, scale) to write: ``out``'s (checked by quantize.check_out), else new ones."""
    if out is not None:
        check_out(out, (r, c), granularity, fmt, device, kernel_layout=True)
        return out.data, out.scale
    return torch.empty(r, c, dtype=FP8_DTYPES[fmt], device=device), new_scale(r, c, granularity, device)


def quantize_triton(x: torch.Tensor, granularity: str, fmt: str = "e4m3",
                    power2: bool = False, amax: Optional[torch.Tensor] = None,
                    out: Optional[Fp8Tensor] = None) -> Fp8Tensor:
    """The fused quantiser: same result as ``quantize_reference``, bit for bit (``amax``: the
    caller's max |x|, tensorwise only; ``out``: write into this Fp8Tensor's tensors)."""
    _check_given_amax(granularity, amax)
    if x.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D (rows, contraction) matrix, got {tuple(x.shape)}")
    r, c = x.shape
    q, s = out_buffers(out, r, c, granularity, fmt, x.device)
    if r == 0 or c == 0:
        s.fill_(1.0)
        return Fp8Tensor(q, s, granularity, fmt)
    fmax = FP8_MAX[fmt]
    if granularity == "block":
        grid = (triton.cdiv(r, BLOCK), triton.cdiv(c, BLOCK))
        _quant_blocks_kernel[grid](x, q, q, s, s, r, c, x.stride(0), x.stride(1), q.stride(0),
                                   q.stride(0), s.stride(0), s.stride(1), s.stride(0), s.stride(1),
                                   FMAX=fmax, POWER2=power2, B=BLOCK, DUAL=False, num_warps=8)
        return Fp8Tensor(q, s, granularity, fmt)
    if granularity == "tensor":
        # One reduction (unless the caller made it), then every tile quantised under that amax.
        amax = tensor_amax(x) if amax is None else amax.float().reshape(1)
        tiles, tile_c, given = triton.cdiv(c, BLOCK), BLOCK, True
    elif granularity == "row":
        amax, tiles, tile_c, given = s, 1, c, False
    else:
        amax, tiles, tile_c, given = s, triton.cdiv(c, BLOCK), BLOCK, False
    grid = (triton.cdiv(r, _ROWS_PER_PROGRAM), tiles)
    _quant_rows_kernel[grid](x, q, s, amax, r, c, tile_c, x.stride(0), x.stride(1), q.stride(0),
                             s.stride(0), s.stride(1), FMAX=fmax, POWER2=power2,
                             RB=_ROWS_PER_PROGRAM, CHUNK=BLOCK, GIVEN_AMAX=given, num_warps=4)
    return Fp8Tensor(q, s, granularity, fmt)


def quantize_dual_triton(x: torch.Tensor, granularity: str, fmt: str = "e4m3",
                         power2: bool = False, amax: Optional[torch.Tensor] = None,
                         out: Optional[tuple[Fp8Tensor, Fp8Tensor]] = None,
                         persistent: Optional[bool] = None) -> tuple[Fp8Tensor, Fp8Tensor]:
    """``(quantize(x), quantize(x.t()))`` from one read of ``x``, bit for bit the reference's;
    tensor, tile or block granularity (a row scale of x.T would need whole columns of x);
    ``amax``: the caller's max |x|, tensorwise only; ``persistent``: tensor and tile through the
    persistent kernel (default ``R1MEGA_FP8_QUANT_PERSISTENT``)."""
    _check_given_amax(granularity, amax)
    if granularity not in ("tensor", "tile", "block"):
        raise ValueError(f"quantize_dual: granularity {granularity!r} is not tensor, tile or block")
    if x.dim() != 2:
        raise ValueError(f"quantize_dual: expected a 2-D matrix, got {tuple(x.shape)}")
    r, c = x.shape
    q, s = out_buffers(out[0] if out else None, r, c, granularity, fmt, x.device)
    qt, st = out_buffers(out[1] if out else None, c, r, granularity, fmt, x.device)
    if r == 0 or c == 0:
        s.fill_(1.0)
        st.fill_(1.0)
        return Fp8Tensor(q, s, granularity, fmt), Fp8Tensor(qt, st, granularity, fmt)
    grid = (triton.cdiv(r, BLOCK), triton.cdiv(c, BLOCK))
    if granularity == "block":
        _quant_blocks_kernel[grid](x, q, qt, s, st, r, c, x.stride(0), x.stride(1), q.stride(0),
                                   qt.stride(0), s.stride(0), s.stride(1), st.stride(0),
                                   st.stride(1), FMAX=FP8_MAX[fmt], POWER2=power2, B=BLOCK,
                                   DUAL=True, num_warps=_DUAL_WARPS["block"])
        return Fp8Tensor(q, s, granularity, fmt), Fp8Tensor(qt, st, granularity, fmt)
    tensor = granularity == "tensor"
    amax = (tensor_amax(x) if amax is None else amax.float().reshape(1)) if tensor else s
    args = (x, q, qt, s, st, amax, r, c, x.stride(0), x.stride(1), q.stride(0), qt.stride(0),
            s.stride(0), s.stride(1), st.stride(0), st.stride(1))
    meta = dict(FMAX=FP8_MAX[fmt], POWER2=power2, B=BLOCK, TENSOR=tensor,
                num_warps=_DUAL_WARPS[granularity])
    if persistent is None:
        persistent = persistent_launch()
    if persistent:
        n_blocks = grid[0] * grid[1]
        programs = min(n_blocks, _PERSISTENT["per_sm"] * _sm_count(x.device))
        meta.update(num_warps=_PERSISTENT["warps"], STAGES=_PERSISTENT["stages"])
        _quant_dual_persistent_kernel[(programs,)](*args, n_blocks, grid[1], **meta)
    else:
        _quant_dual_kernel[grid](*args, **meta)
    return Fp8Tensor(q, s, granularity, fmt), Fp8Tensor(qt, st, granularity, fmt)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a few where Triton interprets on the CPU, so that
    the persistent walk takes several blocks a program there too)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count
