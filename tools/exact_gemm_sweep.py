"""Times the batch-invariant GEMM's candidates (r1mega/ops/batch_invariant.py ``bi_mm``: Triton
tile configurations, cuBLAS on fixed row blocks) at the 852M shape's training (16,384 rows) and
decode (256 rows) shapes, beside plain torch.mm, on CUDA, and checks each for batch invariance
(a row's bits alone, shifted inside its block, and in the full batch). Prints a table; the last
line names the invariant candidate with the least training time whose decode time is within
10 % of the best decode time: "R1MEGA_EXACT_GEMM=... R1MEGA_EXACT_GEMM_TILES=..." (shell words)."""
from __future__ import annotations

import os

import torch

from r1mega.ops import triton_batch_invariant as tbi
from r1mega.ops.batch_invariant import bi_mm

CANDIDATES = ["cublas:256", "cublas:128", "triton 64,128,64,4,3", "triton 128,128,64,8,3"]
# (K, N) of the 852M layer's GEMMs (qkv, fc1, fc2, proj) and the output layer
SHAPES = [(2048, 3072), (2048, 11264), (5632, 2048), (2048, 2048), (2048, 32000)]
WEIGHT = [16, 16, 16, 16, 1]  # calls per forward


def _time(fn, reps=10):
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _select(cand: str) -> None:
    if cand.startswith("cublas"):
        os.environ["R1MEGA_EXACT_GEMM"] = cand
    else:
        os.environ["R1MEGA_EXACT_GEMM"] = "triton"
        tbi.set_tiles(cand.split()[1])


def _invariant(ws) -> bool:
    gen = torch.Generator(device="cuda").manual_seed(1)
    for (k, _), w in zip(SHAPES[:4], ws):
        x = torch.randn(1031, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        full = bi_mm(x, w.t())
        if not torch.equal(bi_mm(x[1:], w.t()), full[1:]) or \
                not torch.equal(bi_mm(x[500:503], w.t()), full[500:503]) or \
                not torch.equal(bi_mm(x[-1:], w.t()), full[-1:]):
            return False
    return True


def main():
    torch.manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for k, n in SHAPES]
    xs = {m: [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k, _ in SHAPES]
          for m in (16384, 256)}
    rows = {}
    for name in ["torch.mm"] + CANDIDATES:
        if name != "torch.mm":
            _select(name)
        tot = {}
        for m in (16384, 256):
            t = 0.0
            for w, x, c in zip(ws, xs[m], WEIGHT):
                fn = (lambda x=x, w=w: x @ w.t()) if name == "torch.mm" else \
                    (lambda x=x, w=w: bi_mm(x, w.t()))
                t += c * _time(fn)
            tot[m] = t
        inv = True if name == "torch.mm" else _invariant(ws)
        rows[name] = (tot, inv)
        print(f"{name:<24} train fwd GEMMs {tot[16384]:8.2f} ms   decode step GEMMs {tot[256]:7.3f} ms"
              f"   batch-invariant {inv}", flush=True)
    cands = {k: v[0] for k, v in rows.items() if k != "torch.mm" and v[1]}
    best_dec = min(v[256] for v in cands.values())
    ok = {k: v for k, v in cands.items() if v[256] <= 1.1 * best_dec}
    best = min(ok, key=lambda k: ok[k][16384])
    tiles = best.split()[1] if best.startswith("triton") else f"{tbi.BLOCK_M},{tbi.BLOCK_N},{tbi.BLOCK_K},{tbi.NUM_WARPS},{tbi.NUM_STAGES}"
    print(f"R1MEGA_EXACT_GEMM={best.split()[0]} R1MEGA_EXACT_GEMM_TILES={tiles}")


if __name__ == "__main__":
    main()
