"""`r1mega bench fp8-decode-gemm`: a decode step's GEMMs, bf16 against each FP8 rollout route.

For the 852M shape's linears (qkv, proj, fc1, fc2; 16 layers, each its own weights) at decode
row counts it times,
from one CUDA graph replay of all 64 calls (as a captured decode step runs them), in this run:

  bf16             torch.mm on the bf16 weights (the bf16 rollout's GEMMs)
  RECIPE+quantize  the activation quantiser kernel, then cuBLAS's scaled matmul (the FP8
                   rollout's route today), for tensorwise, rowwise and blockwise
  RECIPE+fused     r1mega/precision/triton_act_gemm.py: x quantised inside the GEMM in 1x128
                   tiles (``R1MEGA_FP8_ROLLOUT_GEMM=fused``), for blockwise and tensorwise
  tensorwise-row   the rollout's default for tensorwise weights: x's rows quantised by the
                   one-pass kernel, cuBLAS's tensorwise GEMM, the row scales on its output
  ...+lt           the same through r1mega/precision/fp8_gemm_lt.py: cuBLASLt's algorithm
                   chosen by timing (``R1MEGA_FP8_GEMM_LT=1``); each problem's timings printed
  ...+skinny       the same through r1mega/precision/triton_skinny_gemm.py: K split across
                   CTAs (``R1MEGA_FP8_SKINNY=1``)

and reports ms per 64 calls, the ratio to bf16, and each FP8 route's largest difference from
the float32 product of the unquantised operands next to bf16's. ``--smoke``: tiny shapes on the
CPU under Triton's interpreter (the harness and the JSON line, not the numbers).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

# (N, K) of the 852M layer's linears and calls per decode step
LINEARS = [(3072, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]
LAYERS = 16


def x_on_gpu_or_interpreted() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _routes(recipes: list[str]):
    """name -> (weight -> its copy, (x, copy) -> y): the rollout's own GEMM (decode_gemm)."""
    from r1mega.precision.linear import RECIPE_GRANULARITY
    from r1mega.precision.policy import Fp8Policy
    from r1mega.precision.quantize import quantize
    from r1mega.precision import fp8_gemm_lt, triton_skinny_gemm
    from r1mega.precision.rollout import decode_gemm

    def route(recipe, fused):
        act, wgt, _ = RECIPE_GRANULARITY[recipe]
        power2 = Fp8Policy(recipe=recipe, backend="native").power2_scales
        return (lambda w: quantize(w, wgt, "e4m3", power2),
                lambda x, wq: decode_gemm(x, wq, act, power2, not x.is_cuda, fused))

    def switched(module, prep_run):  # the route with module's switch on
        prep, run = prep_run

        def run_on(x, wq):
            with module.enabled():
                return run(x, wq)
        return prep, run_on

    def row_route():  # the rollout's default for tensorwise weights: per-row activation scales
        prep, _ = route("tensorwise", False)
        return prep, lambda x, wq: decode_gemm(x, wq, "row", True, not x.is_cuda, False, rows_kernel=True)

    out = {"bf16": (lambda w: w, lambda x, w: x @ w.t())}
    for recipe in recipes:
        out[f"{recipe}+quantize"] = route(recipe, False)
    if "tensorwise" in recipes:
        out["tensorwise+lt"] = switched(fp8_gemm_lt, route("tensorwise", False))
        out["tensorwise-row"] = row_route()
        out["tensorwise-row+lt"] = switched(fp8_gemm_lt, row_route())
        if x_on_gpu_or_interpreted():
            out["tensorwise-row+skinny"] = switched(triton_skinny_gemm, row_route())
    for recipe in ("tensorwise", "blockwise"):
        if recipe in recipes:
            out[f"{recipe}+fused"] = route(recipe, True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench fp8-decode-gemm", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="16,64,256,512", help="decode batch sizes (GEMM M)")
    ap.add_argument("--recipes", default="tensorwise,rowwise,blockwise")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    args = ap.parse_args(argv)
    from r1mega.bench.timing import graph_ms, median_ms

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    linears = [(256, 128), (128, 384)] if args.smoke else LINEARS
    layers = 1 if args.smoke else LAYERS
    rows = [5] if args.smoke else [int(r) for r in args.rows.split(",")]
    routes = _routes([r for r in args.recipes.split(",") if r])
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        for name in [r for r in routes if r.endswith("+fused")]:  # Triton: on a CPU only interpreted
            routes.pop(name)
            print(f"({name} left out: no GPU and TRITON_INTERPRET is not 1)")
    g = torch.Generator(device=device).manual_seed(0)
    # each layer its own weights, as the model's: 16 layers of one layer's 45 MB of FP8 weights
    # would be read from L2 (50 MB on an H100) after the first, where a decode step reads HBM
    weights = [[(torch.randn(n, k, device=device, generator=g) * 0.02).to(dtype) for n, k in linears]
               for _ in range(layers)]
    results: dict = {}
    print(f"{'route':<20} " + " ".join(f"{'M=' + str(m):>12}" for m in rows) + "   (ms per decode step's GEMMs)")
    for name, (prep, run) in routes.items():
        wq = [[prep(w) for w in layer] for layer in weights]
        results[name] = {}
        for m in rows:
            xs = [torch.randn(m, k, device=device, generator=g).to(dtype) for _, k in linears]

            def step():
                for layer in wq:
                    for x, w in zip(xs, layer):
                        run(x, w)
            ms = graph_ms(step, 1) if cuda else median_ms(step, 1, 0, False)
            err = max(float((run(x, w).float() - x.float() @ w0.float().t()).abs().max()
                            / (x.float() @ w0.float().t()).abs().max())
                      for x, w, w0 in zip(xs, wq[0], weights[0]))
            results[name][m] = {"ms": ms, "max_rel_err": err}
        print(f"{name:<20} " + " ".join(f"{results[name][m]['ms']:>12.3f}" for m in rows))
    for name in routes:
        if name != "bf16":
            print(f"{name:<20} " + " ".join(
                f"{results['bf16'][m]['ms'] / results[name][m]['ms']:>11.2f}x" for m in rows)
                + "   (bf16 / route)")
    print("max |y - x w^T| / max |x w^T| (float32 product of the unquantised operands): "
          + ", ".join(f"{n} {max(v['max_rel_err'] for v in r.values()):.1e}" for n, r in results.items()))
    from r1mega.precision import fp8_gemm_lt

    lt = {f"{m}x{n}x{k}": t for (_, m, n, k, _), t in fp8_gemm_lt.timings.items()}
    for problem, t in lt.items():  # what the +lt routes' choice saw, ms a call
        best = min(t, key=t.get)
        print(f"cuBLASLt FP8 {problem}: torch {t['torch'] * 1e3:.1f} us, best {best} {t[best] * 1e3:.1f} us "
              f"of {len(t) - 1} algorithms")
    print(json.dumps({"bench": "fp8-decode-gemm", "device": device, "smoke": args.smoke,
                      "layers": layers, "linears": linears, "routes": results, "lt_timings_ms": lt}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
