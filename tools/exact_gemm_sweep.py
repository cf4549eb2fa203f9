"""Times tile configurations of the batch-invariant GEMM (r1mega/ops/triton_batch_invariant.py)
at the 852M shape's training (16,384 rows) and decode (256 rows) shapes, beside torch.mm, on
CUDA. Prints a table; the last line is the configuration with the least training time whose
decode time is within 10 % of the best decode time (for R1MEGA_EXACT_GEMM_TILES)."""
from __future__ import annotations

import torch

from r1mega.ops import triton_batch_invariant as tbi

CONFIGS = ["64,128,64,4,3", "64,128,64,4,4", "128,128,64,8,3", "128,128,64,4,4",
           "128,256,64,8,3", "64,64,64,4,4", "128,64,64,4,4", "64,256,64,8,3"]
# (K, N) of the 852M layer's GEMMs (qkv, fc1, fc2, proj) and the output layer
SHAPES = [(2048, 3072), (2048, 11264), (5632, 2048), (2048, 2048), (2048, 32000)]
WEIGHT = [16, 16, 16, 16, 1]  # calls per forward


def _time(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    torch.manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for k, n in SHAPES]
    xs = {m: [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k, _ in SHAPES]
          for m in (16384, 256)}
    rows = {}
    for name in ["torch.mm"] + CONFIGS:
        if name != "torch.mm":
            tbi.set_tiles(name)
        tot = {}
        for m in (16384, 256):
            t = 0.0
            for w, x, c in zip(ws, xs[m], WEIGHT):
                fn = (lambda x=x, w=w: x @ w.t()) if name == "torch.mm" else \
                    (lambda x=x, w=w: tbi.matmul(x, w.t()))
                t += c * _time(fn)
            tot[m] = t
        rows[name] = tot
        print(f"{name:<18} train fwd GEMMs {tot[16384]:8.2f} ms   decode step GEMMs {tot[256]:7.3f} ms",
              flush=True)
    cands = {k: v for k, v in rows.items() if k != "torch.mm"}
    best_dec = min(v[256] for v in cands.values())
    ok = {k: v for k, v in cands.items() if v[256] <= 1.1 * best_dec}
    print(min(ok, key=lambda k: ok[k][16384]))


if __name__ == "__main__":
    main()
