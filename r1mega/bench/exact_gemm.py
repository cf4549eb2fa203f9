"""`r1mega bench exact-gemm`: the exact mode's batch-invariant GEMM, tile configurations side by side.

For every candidate tile configuration "BM,BN,BK,WARPS,STAGES" of the Triton GEMM
(r1mega/ops/triton_batch_invariant.py) and every row count M of ``--rows`` it times the forward
GEMMs of one 852M layer stack (qkv, fc1, fc2, proj, 16 each, and the output layer; on CUDA one
graph replay of them all, as a decode step runs them), beside
cuBLAS (``torch.mm``, the default mode's GEMM, not batch-invariant) in the same run, and checks
each candidate's bits against the reference configuration's on the same inputs. A candidate whose
bits equal the reference's at every shape and M computes every output element the same way, so
it may serve some row counts while the reference (or another equal one) serves others without
breaking batch invariance. The row ``auto`` is what the exact mode runs (each shape's fastest
bit-checked small-M candidate, timed on first use). The last line names the fastest bit-equal
candidate at the smallest and at the largest M.

``--smoke``: tiny shapes on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``; the
harness and the JSON line, not the numbers).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from r1mega.bench.timing import median_ms

REFERENCE = "128,128,64,8,3"
# Small-M candidates stream the weight once per row block: one wide row block (BM 256) with thin
# column blocks keeps every weight read single, deep K blocks keep more loads in flight.
CANDIDATES = [REFERENCE, "256,128,64,8,3", "64,64,128,4,3", "64,128,64,4,3", "128,64,64,4,4",
              "256,32,128,4,4", "256,64,64,8,4", "128,32,128,4,4", "64,32,128,4,5", "64,64,64,4,5",
              "128,256,64,8,3", "64,256,64,4,3", "64,128,128,4,3", "128,64,128,4,3",
              # TMA variants (a sixth field 1: Hopper's tensor memory accelerator loads the tiles)
              "128,128,64,8,3,1", "64,64,128,4,3,1", "64,128,64,4,3,1", "64,128,128,4,3,1",
              "64,32,128,4,5,1",
              # warp-specialised TMA variants (a seventh field 1; Triton engages it at 4 warps)
              "64,128,128,4,3,1,1", "64,64,128,4,3,1,1", "64,128,64,4,3,1,1", "64,32,128,4,5,1,1",
              "128,128,64,4,3,1,1", "128,256,64,4,3,1,1",
              # split variants (an eighth field 1): with R1MEGA_EXACT_GEMM_KCHUNKS=S every
              # candidate sums K in S chunks, and these give each chunk a program of its own
              # plus a summing kernel (without it they run as their unsplit twins)
              "64,128,64,4,3,0,0,1", "64,64,128,4,3,1,0,1", "64,128,64,4,3,1,0,1",
              "64,32,128,4,5,1,0,1", "128,128,64,8,3,1,0,1",
              # cuBLASLt with a fixed algorithm per weight shape: the I-th of its heuristic's
              # no-split ones (r1mega/ops/cublaslt_gemm.py; skipped where the extension is absent)
              "cublaslt:0", "cublaslt:1", "cublaslt:2", "cublaslt:3",
              # R1MEGA_EXACT_GEMM=cublaslt: cuBLASLt alone, its own reference per weight shape
              # (r1mega/ops/cublaslt_exact.py; its bits need not be the Triton reference's)
              "lt-exact", "auto"]
# what the exact mode runs: per shape and row bucket the fastest bit-checked candidate
AUTO = "auto"
# (K, N) of the 852M layer's GEMMs (qkv, fc1, fc2, proj) and the output layer; calls per forward
SHAPES = [(2048, 3072), (2048, 11264), (5632, 2048), (2048, 2048), (2048, 32000)]
CALLS = [16, 16, 16, 16, 1]


def _run(tiles: str, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from r1mega.ops import cublaslt_exact
    from r1mega.ops import triton_batch_invariant as tbi

    if tiles == "lt-exact":
        if not cublaslt_exact.supported(a):
            why = tbi.clt.load_error() if tbi.clt.get() is None else f"{a.device}, {a.dtype}"
            raise RuntimeError(f"the cuBLASLt-only mode takes CUDA bf16/fp16 with the extension ({why})")
        return cublaslt_exact.matmul(a, w.t())

    if tiles.startswith("cublaslt:"):
        if not a.is_cuda:
            raise RuntimeError("cuBLASLt needs CUDA")
        if tbi.clt.get() is None:
            raise RuntimeError(f"no cuBLASLt extension: {tbi.clt.load_error()}")
        found = tbi.clt.algos_for(w.shape[0], w.shape[1], a.dtype, a.device)
        i = int(tiles.split(":")[1])
        if i >= len(found):
            raise RuntimeError(f"cuBLASLt offers {len(found)} algorithms for {tuple(w.shape)}")
        return tbi.matmul(a, w.t(), tiles=found[i])
    return tbi.matmul(a, w.t(), tiles=None if tiles == AUTO else tbi.parse_tiles(tiles))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench exact-gemm", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="256,1024,4096,16384", help="comma list of M")
    ap.add_argument("--tiles", default=";".join(CANDIDATES),
                    help="candidates 'BM,BN,BK,W,S;...' or 'auto' (the exact mode's own per-shape choice); "
                         "the first is the reference")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--per-shape", action="store_true",
                    help="also time each (K, N) shape alone at each M: which tiles serve which shape")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU harness check)")
    args = ap.parse_args(argv)
    from r1mega.ops import triton_batch_invariant as tbi

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("exact-gemm needs CUDA (or --smoke)", file=sys.stderr)
        return 2
    if not tbi.HAVE_TRITON:
        print("exact-gemm needs Triton", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes, ms = (SHAPES, [int(x) for x in args.rows.split(",")]) if not args.smoke else \
        ([(40, 24), (72, 16)], [3, 17])
    cands = [c.strip() for c in args.tiles.split(";") if c.strip()]
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5 for k, n in shapes]
    xs = {m: [torch.randn(m, k, device=device, dtype=dtype, generator=gen) for k, _ in shapes] for m in ms}
    ref = {m: [_run(cands[0], x, w) for x, w in zip(xs[m], ws)] for m in ms}
    reps, warm = (args.reps, 2) if cuda else (1, 0)

    def forward(fn, m, only=None):
        for i, (x, w, c) in enumerate(zip(xs[m], ws, CALLS[:len(shapes)])):
            for _ in range(c if only is None or only == i else 0):
                fn(x, w)

    def total_ms(fn, m, only=None):
        """One forward's GEMMs at M rows: on CUDA replayed from one CUDA graph, as the rollout's
        decode runs them (per-call launch latency would hide the small-M kernels' times)."""
        if not cuda:
            return sum(c * median_ms(lambda x=x, w=w: fn(x, w), reps, warm, cuda)
                       for i, (x, w, c) in enumerate(zip(xs[m], ws, CALLS[:len(shapes)]))
                       if only is None or only == i)
        forward(fn, m, only)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(fn, m, only)
        ms_ = median_ms(graph.replay, reps, warm, cuda)
        del graph
        torch.cuda.empty_cache()
        return ms_

    rows = {"torch.mm": {"ms": {m: total_ms(lambda x, w: x @ w.t(), m) for m in ms},
                         "bit_equal": None}}
    print(f"{'candidate':<20}" + "".join(f"{'M=' + str(m):>12}" for m in ms) + "   bits = reference")
    for cand in ["torch.mm"] + cands:
        if cand != "torch.mm":
            try:
                equal = all(torch.equal(_run(cand, x, w), r)
                            for m in ms for x, w, r in zip(xs[m], ws, ref[m]))
                rows[cand] = {"ms": {m: total_ms(lambda x, w, c=cand: _run(c, x, w), m) for m in ms},
                              "bit_equal": equal}
            except Exception as exc:  # a configuration the compiler refuses: reported, not fatal
                rows[cand] = {"ms": {}, "bit_equal": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
        r = rows[cand]
        print(f"{cand:<20}" + "".join(f"{r['ms'].get(m, float('nan')):>12.3f}" for m in ms)
              + f"   {r['bit_equal']}" + (f"  {r['error']}" if "error" in r else ""), flush=True)
    equal = {c: r for c, r in rows.items() if r["bit_equal"]}
    per_shape = {}
    if args.per_shape:
        for m in ms:
            print(f"-- M={m}, ms per shape (K,N) x calls: " + "  ".join(
                f"{k},{n}x{c}" for (k, n), c in zip(shapes, CALLS)))
            per_shape[str(m)] = {}
            for cand in ["torch.mm"] + list(c for c in equal if c != "torch.mm"):
                fn = (lambda x, w: x @ w.t()) if cand == "torch.mm" else \
                    (lambda x, w, c=cand: _run(c, x, w))
                t = [total_ms(fn, m, only=i) for i in range(len(shapes))]
                per_shape[str(m)][cand] = t
                print(f"{cand:<20}" + "".join(f"{v:>12.3f}" for v in t), flush=True)
            best = [min((c for c in per_shape[str(m)] if c != "torch.mm"),
                        key=lambda c: per_shape[str(m)][c][i]) for i in range(len(shapes))]
            print(f"best bit-equal per shape at M={m}: {best}; their sum "
                  f"{sum(per_shape[str(m)][c][i] for i, c in enumerate(best)):.3f} ms")
    best = {m: min(equal, key=lambda c: equal[c]["ms"][m]) for m in (ms[0], ms[-1])}
    out = {"rows": {c: {"ms": {str(m): v for m, v in r["ms"].items()}, "bit_equal": r["bit_equal"],
                        **({"error": r["error"]} if "error" in r else {})} for c, r in rows.items()},
           "reference": cands[0], "best_small_m": best[ms[0]], "best_large_m": best[ms[-1]],
           **({"per_shape_ms": per_shape} if per_shape else {}),
           "all_bit_equal": all(r["bit_equal"] for c, r in rows.items() if c != "torch.mm"),
           "device": torch.cuda.get_device_name() if cuda else "cpu",
           "k_chunks": tbi.K_CHUNKS}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
