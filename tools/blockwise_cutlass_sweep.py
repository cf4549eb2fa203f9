"""Times CUTLASS's blockwise FP8 GEMMs (csrc/fp8_blockwise_gemm.cu) against cuBLAS's (torch's
scaled_mm) on the GEMM-heavier training shape's twelve GEMMs a layer (GPU): forward and dgrad
(1x128 tiles x 128x128 blocks), wgrad (1x128 x 1x128 along the tokens), with cuBLAS's tensorwise
GEMM of each size as the rate to reach. Every CUTLASS result is checked against cuBLAS's first (a
wrong one is reported, not timed). Prints a table, then one JSON line.
Run: python tools/blockwise_cutlass_sweep.py [--reps 10]"""
from __future__ import annotations

import argparse
import json

import torch

from r1mega.bench.shapes import GEMM_HEAVY, linear_gemms
from r1mega.bench.timing import median_ms
from r1mega.ops import cutlass_blockwise
from r1mega.precision.gemm import _blockwise_mm, _colmajor, scaled_gemm
from r1mega.precision.quantize import quantize

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    ext = cutlass_blockwise.get()
    if ext is None:
        raise SystemExit(f"r1mega_cutlass_cuda unavailable: {cutlass_blockwise.load_error()}")
    names = list(ext.configs())
    g = torch.Generator(device="cuda").manual_seed(0)
    results = {}
    total = {"cublas": 0.0, "tensorwise": 0.0, "best": 0.0, **{c: 0.0 for c in names}}
    print(f"{'GEMM':<14}{'M x N x K':>22}{'cuBLAS':>9}{'tensor':>9}" + "".join(f"{c:>15}" for c in names)
          + "   TFLOP/s cuBLAS / best CUTLASS")
    for name, m, n, k, block in linear_gemms(GEMM_HEAVY, 16384):
        a = quantize(torch.randn(m, k, device="cuda", generator=g).bfloat16(), "tile")
        b = quantize((torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16(), "block" if block else "tile")
        sa, sb = _colmajor(a.scale), _colmajor(b.scale)
        ref = _blockwise_mm(a.data, a.scale, b.data, b.scale, block, torch.bfloat16)
        row = {"mnk": [m, n, k], "cublas_ms": median_ms(
            lambda: _blockwise_mm(a.data, a.scale, b.data, b.scale, block, torch.bfloat16), args.reps, 2, True)}
        at, bt = quantize(a.data.float().bfloat16(), "tensor"), quantize(b.data.float().bfloat16(), "tensor")
        row["tensorwise_ms"] = median_ms(lambda: scaled_gemm(at, bt, torch.bfloat16), args.reps, 2, True)
        for i, c in enumerate(names):
            try:
                y = ext.gemm(a.data, sa, b.data, sb, block, i)
            except RuntimeError as exc:
                row[c], row[c + "_error"] = None, str(exc).splitlines()[0][:160]
                continue
            rel = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row[c + "_max_rel_diff"] = rel
            row[c] = median_ms(lambda: ext.gemm(a.data, sa, b.data, sb, block, i), args.reps, 2, True) \
                if rel < 2e-2 else None
        ran = [row[c] for c in names if row[c] is not None]
        best = min(ran) if ran else float("nan")
        results[name] = row
        for key, v in (("cublas", row["cublas_ms"]), ("tensorwise", row["tensorwise_ms"]),
                       ("best", min(best, row["cublas_ms"])), *((c, row[c] if row[c] is not None else float("nan"))
                                                                 for c in names)):
            total[key] += v
        flop = 2 * m * n * k
        print(f"{name:<14}{f'{m} x {n} x {k}':>22}{row['cublas_ms']:>9.3f}{row['tensorwise_ms']:>9.3f}"
              + "".join(f"{row[c]:>15.3f}" if row[c] is not None else f"{'fail':>15}" for c in names)
              + f"   {flop / row['cublas_ms'] / 1e9:.0f} / {flop / best / 1e9:.0f}"
              + "".join(f"  [{c}: {row.get(c + '_error', 'diff %.1e' % row.get(c + '_max_rel_diff', 0))}]"
                        for c in names if row[c] is None))
    print("sum of the 12 GEMMs (x 8 layers a step), ms: " + ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    print(json.dumps({"configs": names, "problems": results, "sum_ms": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
