"""Times DeepGEMM's blockwise FP8 GEMMs (the optional deep_gemm package) against cuBLAS's (torch's
scaled_mm) on the GEMM-heavier training shape's twelve GEMMs a layer (GPU): forward and dgrad
(1x128 tiles x 128x128 blocks, DeepGEMM's 1d2d kernel, bf16 out), wgrad (1x128 x 1x128 along the
tokens: DeepGEMM's 1d1d kernel, which adds into a float32 output: timed as d += a b.T, what
accumulating into a float32 main gradient would cost), with cuBLAS's tensorwise GEMM of each size
as the rate to reach. Each DeepGEMM result is checked against cuBLAS's first (a wrong one is
reported, not timed); its first call's time is reported. ``--jit-jobs N`` first compiles the
twelve kernels in N processes at once (DeepGEMM compiles each on first use, one after another;
its cache, DG_JIT_CACHE_DIR, then serves this process and later runs). Prints a table, then one
JSON line.
Run: python tools/blockwise_deepgemm_sweep.py [--reps 10] [--jit-jobs 12]"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import time

import torch

from r1mega.bench.shapes import GEMM_HEAVY, linear_gemms
from r1mega.bench.timing import median_ms
from r1mega.ops import deepgemm_blockwise
from r1mega.precision.gemm import _blockwise_mm, _colmajor, scaled_gemm
from r1mega.precision.quantize import quantize


def _call(dg, a, b, block):
    """DeepGEMM's product of a and b: bf16 for tiles x blocks, d += a b.T in float32 for tiles x tiles."""
    sa = _colmajor(a.scale)
    if block:
        return lambda: deepgemm_blockwise.blockwise_gemm(a.data, sa, b.data, b.scale, torch.bfloat16)
    sb = _colmajor(b.scale)
    acc = torch.zeros(a.data.shape[0], b.data.shape[0], dtype=torch.float32, device="cuda")

    def run():
        dg.fp8_gemm_nt((a.data, sa), (b.data, sb), acc, c=acc, recipe=(1, 1, 128))
        return acc
    return run


def _compile_one(m: int, n: int, k: int, block: bool) -> float:
    """One process's first call of one kernel (the JIT's compile), in seconds."""
    dg = deepgemm_blockwise.get()
    a = quantize(torch.ones(m, k, device="cuda").bfloat16(), "tile")
    b = quantize(torch.ones(n, k, device="cuda").bfloat16(), "block" if block else "tile")
    t0 = time.perf_counter()
    _call(dg, a, b, block)()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--jit-jobs", type=int, default=0)
    args = ap.parse_args(argv)
    dg = deepgemm_blockwise.get()
    if dg is None:
        raise SystemExit(f"deep_gemm unavailable: {deepgemm_blockwise.load_error()}")
    gemms = list(linear_gemms(GEMM_HEAVY, 16384))
    if args.jit_jobs:
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jit_jobs, mp_context=ctx) as pool:
            each = list(pool.map(_compile_one, *zip(*[(m, n, k, blk) for _, m, n, k, blk in gemms])))
        print(f"JIT: {len(gemms)} kernels in {time.perf_counter() - t0:.1f} s "
              f"({args.jit_jobs} processes; each {min(each):.1f}-{max(each):.1f} s)")
    g = torch.Generator(device="cuda").manual_seed(0)
    results, total = {}, {"cublas": 0.0, "tensorwise": 0.0, "deepgemm": 0.0, "best": 0.0}
    print(f"{'GEMM':<14}{'M x N x K':>22}{'cuBLAS':>9}{'tensor':>9}{'DeepGEMM':>10}{'JIT s':>7}"
          "   TFLOP/s cuBLAS / DeepGEMM")
    for name, m, n, k, block in gemms:
        a = quantize(torch.randn(m, k, device="cuda", generator=g).bfloat16(), "tile")
        b = quantize((torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16(), "block" if block else "tile")
        ref = _blockwise_mm(a.data, a.scale, b.data, b.scale, block, torch.bfloat16)
        row = {"mnk": [m, n, k], "cublas_ms": median_ms(
            lambda: _blockwise_mm(a.data, a.scale, b.data, b.scale, block, torch.bfloat16), args.reps, 2, True)}
        at, bt = quantize(a.data.float().bfloat16(), "tensor"), quantize(b.data.float().bfloat16(), "tensor")
        row["tensorwise_ms"] = median_ms(lambda: scaled_gemm(at, bt, torch.bfloat16), args.reps, 2, True)
        try:
            run = _call(dg, a, b, block)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = run()
            torch.cuda.synchronize()
            row["jit_s"] = time.perf_counter() - t0
            rel = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row["max_rel_diff"] = rel
            row["deepgemm_ms"] = median_ms(run, args.reps, 2, True) if rel < 2e-2 else None
        except RuntimeError as exc:
            row["deepgemm_ms"], row["error"] = None, str(exc).splitlines()[0][:200]
        results[name] = row
        d = row["deepgemm_ms"]
        total["cublas"] += row["cublas_ms"]
        total["tensorwise"] += row["tensorwise_ms"]
        total["deepgemm"] += d if d is not None else float("nan")
        total["best"] += min(row["cublas_ms"], d) if d is not None else row["cublas_ms"]
        flop = 2 * m * n * k
        print(f"{name:<14}{f'{m} x {n} x {k}':>22}{row['cublas_ms']:>9.3f}{row['tensorwise_ms']:>9.3f}"
              + (f"{d:>10.3f}" if d is not None else f"{'fail':>10}") + f"{row.get('jit_s', 0):>7.1f}"
              + f"   {flop / row['cublas_ms'] / 1e9:.0f} / " + (f"{flop / d / 1e9:.0f}" if d else "-")
              + (f"  [{row.get('error', 'diff %.1e' % row.get('max_rel_diff', 0))}]" if d is None else ""))
    print("sum of the 12 GEMMs (x 8 layers a step), ms: " + ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    print(json.dumps({"problems": results, "sum_ms": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
