"""Times every algorithm cuBLASLt's heuristic lists for the blockwise FP8 recipe's GEMMs (GPU) on
the GEMM-heavier training shape (8 x 2,048 tokens, hidden 4,096, FFN 14,336, 8 KV heads of 128)
against torch.nn.functional.scaled_mm, which runs the heuristic's first: forward and dgrad (1x128
tiles x 128x128 blocks) and wgrad (1x128 x 1x128 along the tokens, the step's slowest GEMMs on an
H100). The first algorithm must give torch's bits (same kernel, same descriptors); the others are
held to the float32-accumulation difference. Prints a table, then one JSON line.
Run: python tools/blockwise_lt_sweep.py [--max-algos 16] [--reps 10]"""
from __future__ import annotations

import argparse
import json

import torch

from r1mega.bench.shapes import GEMM_HEAVY, linear_gemms
from r1mega.bench.timing import median_ms
from r1mega.ops import cublaslt_gemm
from r1mega.precision.gemm import _block_scale_b, _blockwise_mm, _colmajor
from r1mega.precision.quantize import quantize

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-algos", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    ext = cublaslt_gemm.get()
    if ext is None or not hasattr(ext, "fp8_algos"):
        raise SystemExit(f"r1mega_gemm_cuda unavailable: {cublaslt_gemm.load_error()}")
    g = torch.Generator(device="cuda").manual_seed(0)
    results, total = {}, {"torch": 0.0, "best": 0.0}
    print(f"{'GEMM':<14}{'M x N x K':>22}{'torch ms':>10}{'lt0 ms':>9}{'best ms':>9}{'best':>6}{'algos':>7}"
          f"{'lt0 bits':>10}{'max rel diff':>14}")
    for name, m, n, k, block in linear_gemms(GEMM_HEAVY, 16384):
        a = quantize(torch.randn(m, k, device="cuda", generator=g).bfloat16(), "tile")
        w = quantize(torch.randn(n, k, device="cuda", generator=g).bfloat16() * 0.05, "block" if block else "tile")
        mode = 2 if block else 1
        sa = _colmajor(a.scale)
        sw = _block_scale_b(w.scale) if block else _colmajor(w.scale)
        ref = _blockwise_mm(a.data, a.scale, w.data, w.scale, block, torch.bfloat16)
        t_torch = median_ms(lambda: _blockwise_mm(a.data, a.scale, w.data, w.scale, block, torch.bfloat16),
                            args.reps, 1, True)
        blobs = ext.fp8_algos(m, n, k, torch.bfloat16, args.max_algos, 32 << 20, mode)
        times, worst, same0 = [], 0.0, None
        for i, blob in enumerate(blobs):
            try:
                y = ext.fp8_matmul(a.data, sa, w.data, sw, torch.bfloat16, blob, mode)
            except RuntimeError as exc:  # an algorithm the problem refuses: reported, not timed
                times.append(None)
                print(f"  {name} algorithm {i}: {str(exc).splitlines()[0][:120]}")
                continue
            if i == 0:
                same0 = bool(torch.equal(y, ref))
            worst = max(worst, ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
            times.append(median_ms(lambda: ext.fp8_matmul(a.data, sa, w.data, sw, torch.bfloat16, blob, mode),
                                   args.reps, 1, True))
        ran = [(t, i) for i, t in enumerate(times) if t is not None]
        best_t, best_i = min(ran) if ran else (float("nan"), -1)
        lt0 = times[0] if times and times[0] is not None else float("nan")
        configs = {i: ext.describe(blobs[i]) for _, i in ran}
        results[name] = {"mnk": [m, n, k], "torch_ms": t_torch, "lt0_ms": lt0, "best_ms": best_t,
                         "best_algo": best_i, "algos": len(blobs), "lt0_bits_equal_torch": same0,
                         "max_rel_diff": worst, "ms": times, "configs": configs,
                         "tflops_torch": 2 * m * n * k / t_torch / 1e9, "tflops_best": 2 * m * n * k / best_t / 1e9}
        total["torch"] += t_torch
        total["best"] += min(best_t, t_torch)
        print(f"{name:<14}{f'{m} x {n} x {k}':>22}{t_torch:>10.3f}{lt0:>9.3f}{best_t:>9.3f}{best_i:>6}"
              f"{len(blobs):>7}{str(same0):>10}{worst:>14.2e}")
    print(f"sum of the 12 GEMMs (x 8 layers a step): torch {total['torch']:.3f} ms, with the best of each "
          f"{total['best']:.3f} ms")
    print(json.dumps({"problems": results, "sum_ms": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
