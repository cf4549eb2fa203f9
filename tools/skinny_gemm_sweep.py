"""Time the wgmma FP8 decode GEMM's configurations (r1mega/precision/wgmma_gemm.py) and, with
``--triton``, the split-K Triton kernel's (r1mega/precision/triton_skinny_gemm.py) against cuBLAS's
tensorwise kernel (``torch._scaled_mm``, the FP8 rollout's GEMM today) on the 852M shape's four
linears at decode rows, each config in one CUDA graph replaying a call per layer (16 layers,
each its own weights, so the weights come from HBM as in a decode step). Prints µs a call and
the error against the float64 product of the dequantised operands; last line one JSON object.

  python tools/skinny_gemm_sweep.py [--rows 256] [--budget-s 240] [--triton]
  (the budget is split evenly over the four linears; the wgmma rows come first)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

LINEARS = {"qkv": (3072, 2048), "proj": (2048, 2048), "fc1": (11264, 2048), "fc2": (2048, 5632)}
LAYERS = 16


def candidates(m: int, n: int, k: int) -> list[str]:
    out = []
    for bm, bn, split, (warps, stages) in itertools.product(
            (128, 64, 256), (128, 64), (1, 2, 4, 8), ((4, 4), (8, 3), (4, 3))):
        kb = k // 128
        if kb % split or kb // split < 2 or (bm == 64 and m > 128 and warps == 8):
            continue
        if bm == 256 and (warps != 8 or bn == 128 and stages > 3):  # registers, shared memory
            continue
        tiles = -(-m // bm) * -(-n // bn)
        if tiles * split > 4 * 132 or (split > 1 and tiles * split < 64):
            continue
        out.append((abs(tiles * split - 128), f"{bm},{bn},128,{split},{warps},{stages}"))
    # the grids nearest one CTA an SM first: a budget cut leaves the least promising out
    return [c for _, c in sorted(out, key=lambda pc: pc[0])]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--triton", action="store_true", help="also the split-K Triton kernel's configs")
    args = ap.parse_args()
    from r1mega.bench.timing import graph_ms
    from r1mega.precision import triton_skinny_gemm as sk
    from r1mega.precision import wgmma_gemm as wg
    from r1mega.precision.gemm import _unit_scale
    from r1mega.precision.quantize import quantize

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    m = args.rows
    sk.counters_ready(dev)
    results = {}
    for name, (n, k) in LINEARS.items():
        t_end = time.time() + args.budget_s / len(LINEARS)
        ws = [quantize((torch.randn(n, k, device=dev, generator=g) * 0.02).bfloat16(), "tensor",
                       "e4m3", False) for _ in range(LAYERS)]
        a = quantize(torch.randn(m, k, device=dev, generator=g).bfloat16(), "row", "e4m3", True)
        one = _unit_scale(dev)
        ref = (a.data.double() @ (ws[0].data.double() * ws[0].scale.double()).t())
        row = {}

        def cublas():
            for w in ws:
                torch._scaled_mm(a.data, w.data.t(), scale_a=one, scale_b=w.scale.reshape(()),
                                 out_dtype=torch.bfloat16, use_fast_accum=True)
        row["cublas"] = {"us": graph_ms(cublas, 1) * 1e3 / LAYERS}
        y = torch._scaled_mm(a.data, ws[0].data.t(), scale_a=one, scale_b=ws[0].scale.reshape(()),
                             out_dtype=torch.bfloat16, use_fast_accum=True)
        row["cublas"]["rel_err"] = float((y.double() - ref).abs().max() / ref.abs().max())
        ext = wg._EXT.get() if wg.ready(dev) else None
        for i, pw in itertools.product(range(len(wg.CONFIGS)) if ext is not None else (), (False, True)):
            if not wg.usable(i, m, n, k):
                continue
            name_i = "wgmma%s:%d %s" % ("-ws" if pw else "", i, ",".join(map(str, wg.CONFIGS[i])))
            try:
                y = ext.fp8_wgmma_gemm(a.data, ws[0].data, ws[0].scale.reshape(()), None, i, pw)
                err = float((y.double() - ref).abs().max() / ref.abs().max())
                same = bool(torch.equal(y, ext.fp8_wgmma_gemm(a.data, ws[0].data, ws[0].scale.reshape(()), None, i, pw)))

                def wgmma(i=i, pw=pw):
                    for w in ws:
                        ext.fp8_wgmma_gemm(a.data, w.data, w.scale.reshape(()), None, i, pw)
                row[name_i] = {"us": graph_ms(wgmma, 1) * 1e3 / LAYERS, "rel_err": err, "repeatable": same}
            except Exception as e:
                row[name_i] = {"us": None, "why": f"{type(e).__name__}: {str(e)[:160]}"}
        if ext is None:
            row["wgmma"] = {"us": None, "why": f"not loaded: {wg._EXT.load_error()}"}
        pick = wg.config(m, n, k, torch.cuda.get_device_properties(dev).multi_processor_count)
        for cfg in (candidates(m, n, k) if args.triton else ()):
            if time.time() > t_end:
                row[cfg] = {"us": None, "why": "sweep budget spent"}
                continue
            os.environ["R1MEGA_FP8_SKINNY_CONFIG"] = cfg
            try:
                y = sk.skinny_gemm_triton(a.data, ws[0].data, ws[0].scale, torch.bfloat16)
                err = float((y.double() - ref).abs().max() / ref.abs().max())
                y2 = sk.skinny_gemm_triton(a.data, ws[0].data, ws[0].scale, torch.bfloat16)
                same = bool(torch.equal(y, y2))

                def skinny():
                    for w in ws:
                        sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.bfloat16)
                us = graph_ms(skinny, 1) * 1e3 / LAYERS
                y3 = sk.skinny_gemm_triton(a.data, ws[0].data, ws[0].scale, torch.bfloat16)
                row[cfg] = {"us": us, "rel_err": err, "repeatable": same and bool(torch.equal(y, y3))}
            except Exception as e:  # a config Triton cannot build (shared memory, registers)
                row[cfg] = {"us": None, "why": f"{type(e).__name__}: {str(e)[:120]}"}
            finally:
                os.environ.pop("R1MEGA_FP8_SKINNY_CONFIG", None)
        os.environ.pop("R1MEGA_FP8_SKINNY_CONFIG", None)
        y = sk.skinny_gemm_triton(a.data, ws[0].data, ws[0].scale, torch.bfloat16)
        dflt = "default " + ",".join(str(v) for v in sk.config(m, n, k))
        timed = {c: r for c, r in row.items() if r.get("us")}
        best = min((c for c in timed if c != "cublas"), key=lambda c: timed[c]["us"], default=None)
        pick_name = None if pick is None else "wgmma%s:%d %s" % ("-ws" if wg.PRODUCER_WARP else "", pick,
                                                                ",".join(map(str, wg.CONFIGS[pick])))
        results[name] = {"m": m, "n": n, "k": k, "cublas_us": row["cublas"]["us"],
                         "wgmma_pick": pick_name, "wgmma_pick_us": row.get(pick_name, {}).get("us"),
                         "best": best, "best_us": timed[best]["us"] if best else None,
                         "default": dflt, "default_us": row.get(dflt.split()[1], {}).get("us"),
                         "configs": row}
        print(f"{name:>5} {m}x{n}x{k}: cuBLAS {row['cublas']['us']:.2f} us (err {row['cublas']['rel_err']:.1e}); "
              f"best {best} {timed[best]['us'] if best else float('nan'):.2f} us; wgmma pick {pick_name} "
              f"{results[name]['wgmma_pick_us'] or float('nan'):.2f} us", flush=True)
        for c, r in sorted(timed.items(), key=lambda cr: cr[1]["us"])[:8]:
            print(f"        {c:<20} {r['us']:7.2f} us  err {r.get('rel_err', 0):.1e}  "
                  f"repeatable {r.get('repeatable', '-')}", flush=True)
        bad = [f"{c}: {r['why']}" for c, r in row.items() if r.get("why") and "budget" not in r["why"]]
        if bad:
            print("        failed: " + "; ".join(bad[:4]))
        del ws
        torch.cuda.empty_cache()
    print(json.dumps({"tool": "skinny_gemm_sweep", "device": torch.cuda.get_device_name(),
                      "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
