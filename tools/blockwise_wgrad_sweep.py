"""Times the blockwise recipe's weight-gradient GEMMs (1x128 tiles along the tokens on both
operands) on the GEMM-heavier training shape (GPU): cuBLAS through torch.nn.functional.scaled_mm
against r1mega's Triton kernel (r1mega/precision/triton_blockwise_gemm.py) in each tile
configuration, with cuBLAS's tensorwise GEMM of the same size as the rate to reach. Every Triton
result is checked against cuBLAS's (the same FP8 operands: float32 summation order apart) before
it is timed. Prints a table, then one JSON line.
Run: python tools/blockwise_wgrad_sweep.py [--reps 10]"""
from __future__ import annotations

import argparse
import json

import torch

from r1mega.bench.timing import median_ms
from r1mega.precision.gemm import _blockwise_mm, scaled_gemm
from r1mega.precision.quantize import quantize
from r1mega.precision.triton_blockwise_gemm import CONFIGS, gemm_1d1d, problems

T, H, F, QKV = 16384, 4096, 14336, 4096 + 2 * 8 * 128
LINEARS = {"qkv": (QKV, H), "o_proj": (H, H), "fc1": (2 * F, H), "fc2": (H, F)}   # (out, in)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    results, total = {}, {"cublas": 0.0, "tensorwise": 0.0, **{c: 0.0 for c in CONFIGS}}
    print(f"{'wgrad':<8}{'M x N x K':>22}{'cuBLAS 1x128':>14}{'tensorwise':>12}"
          + "".join(f"{c:>12}" for c in CONFIGS) + "   (ms; TFLOP/s of the best below)")
    for name, (out, inp) in LINEARS.items():
        # dy.T (out, T) and x.T (in, T), tiles along the tokens
        a = quantize((torch.randn(out, T, device="cuda", generator=g) * 1e-3).bfloat16(), "tile")
        b = quantize(torch.randn(inp, T, device="cuda", generator=g).bfloat16(), "tile")
        flop = 2 * out * inp * T
        ref = _blockwise_mm(a.data, a.scale, b.data, b.scale, False, torch.bfloat16)
        row = {"mnk": [out, inp, T],
               "cublas_ms": median_ms(lambda: _blockwise_mm(a.data, a.scale, b.data, b.scale, False,
                                                            torch.bfloat16), args.reps, 2, True)}
        at = quantize(a.data.float().bfloat16(), "tensor")  # any tensorwise operands of the size
        bt = quantize(b.data.float().bfloat16(), "tensor")
        row["tensorwise_ms"] = median_ms(lambda: scaled_gemm(at, bt, torch.bfloat16), args.reps, 2, True)
        for c in CONFIGS:
            bm, bn = CONFIGS[c][:2]
            if problems(a, b, bm, bn):
                row[c] = None
                continue
            y = gemm_1d1d(a, b, torch.bfloat16, c)
            rel = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row[f"{c}_max_rel_diff"] = rel
            row[c] = (median_ms(lambda: gemm_1d1d(a, b, torch.bfloat16, c), args.reps, 2, True)
                      if rel < 1e-2 else None)  # a wrong kernel is reported, not timed
        results[name] = row
        total["cublas"] += row["cublas_ms"]
        total["tensorwise"] += row["tensorwise_ms"]
        for c in CONFIGS:
            total[c] += row[c] if row[c] is not None else float("nan")
        best = min([row[c] for c in CONFIGS if row[c] is not None] or [float("nan")])
        print(f"{name:<8}{f'{out} x {inp} x {T}':>22}{row['cublas_ms']:>14.3f}{row['tensorwise_ms']:>12.3f}"
              + "".join(f"{row[c]:>12.3f}" if row[c] is not None else f"{'wrong/na':>12}" for c in CONFIGS)
              + f"   cuBLAS {flop / row['cublas_ms'] / 1e9:.0f}, Triton best {flop / best / 1e9:.0f}"
              + "".join(f"  {c} diff {row[c + '_max_rel_diff']:.1e}" for c in CONFIGS
                        if c + "_max_rel_diff" in row and row[c] is None))
    print("sum of the 4 wgrad GEMMs (x 8 layers a step), ms: "
          + ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    print(json.dumps({"problems": results, "sum_ms": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
