"""Times the fused FP8 quantisers on the GEMM-heavier shape's operands (GPU): quantize_dual for
each granularity and warp count (a program a block, and persistent), csrc's CUDA kernel beside
them where r1mega_fp8_cuda loads (a CTA a block, and persistent; both kernels' tensorwise rows
include the amax pass), the tensorwise
amax, and the old separate passes; every timed variant is checked bit for bit against the PyTorch
reference first. Prints a table, then one JSON line. Run: python tools/fp8_quant_sweep.py"""
from __future__ import annotations

import functools
import json

import torch

from r1mega.precision import cuda_quant as cq
from r1mega.precision import triton_quant as tq
from r1mega.precision.quantize import quantize_reference

# tokens x features of the linears' inputs and output gradients (8 x 2,048 tokens, hidden 4096,
# FFN 14,336, 8 KV heads of 128) and one weight
SHAPES = {"x 16384x4096": (16384, 4096), "x 16384x14336": (16384, 14336),
          "dy 16384x28672": (16384, 28672), "w 28672x4096": (28672, 4096)}


def _time(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _same(got, ref) -> bool:
    return (torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
            and torch.equal(got.scale.nan_to_num(-1.0), ref.scale.nan_to_num(-1.0)))


def _dual_row(rows, results, name, refs, floor_ms, var, quantize_dual, x, gran) -> None:
    """One quantiser's row: its bits against the reference's, then its time."""
    q, qt = quantize_dual(x, gran, "e4m3")
    ok = _same(q, refs[0]) and _same(qt, refs[1])
    ms = _time(lambda: quantize_dual(x, gran, "e4m3"))
    rows.append((name, var, ms, floor_ms, ok))
    results[f"{name}|{var}"] = {"ms": ms, "bit_equal": ok}


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, results = [], {}
    for name, (r, c) in SHAPES.items():
        x = torch.randn(r, c, device="cuda", generator=g).bfloat16()
        floor_ms = r * c * 4 / 4.0e9          # read 2 B + write 2 x 1 B at 4.0 TB/s
        for gran in ("tensor", "tile", "block"):
            refs = (quantize_reference(x, gran, "e4m3"), quantize_reference(x.t(), gran, "e4m3"))
            row = (rows, results, name, refs, floor_ms)
            default = tq._DUAL_WARPS[gran]
            for warps in (4, 8, 16):
                tq._DUAL_WARPS[gran] = warps
                _dual_row(*row, f"dual {gran} w{warps}", tq.quantize_dual_triton, x, gran)
            tq._DUAL_WARPS[gran] = default
            if gran != "block":   # the persistent launch: warps, programs an SM, pipeline stages
                chosen = dict(tq._PERSISTENT)
                for warps, per_sm, stages in ((8, 1, 2), (8, 1, 3), (16, 1, 2), (4, 2, 2), (8, 2, 2)):
                    tq._PERSISTENT.update(warps=warps, per_sm=per_sm, stages=stages)
                    _dual_row(*row, f"dual {gran} persistent w{warps} x{per_sm} s{stages}",
                              functools.partial(tq.quantize_dual_triton, persistent=True), x, gran)
                tq._PERSISTENT.update(chosen)
            if cq.get() is not None:   # csrc/fp8_quant_kernel.cu, a CTA a block and persistent
                for persistent in (False, True):
                    _dual_row(*row, f"dual {gran} cuda{' persistent' if persistent else ''}",
                              functools.partial(cq.quantize_dual_cuda, persistent=persistent), x, gran)
            del refs
        ms = _time(lambda: tq.tensor_amax(x))
        rows.append((name, "amax", ms, r * c * 2 / 4.0e9, True))
        ms = _time(lambda: (tq.quantize_triton(x, "tensor"), tq.quantize_triton(x.t(), "tensor")))
        rows.append((name, "tensor x, x.T separately", ms, floor_ms * 1.5, True))
        del x
        torch.cuda.empty_cache()
    print(f"{'operand':18} {'variant':28} {'ms':>8} {'floor ms':>9} {'of floor':>8}  bits")
    for name, var, ms, floor, ok in rows:
        print(f"{name:18} {var:28} {ms:8.3f} {floor:9.3f} {floor / ms:8.0%}  {'equal' if ok else 'DIFFER'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
