"""`r1mega bench moe-dispatch`: MoE token dispatch, r1mega's kernels beside megatron-core's permute.

Measured in one run, on the same routes (distinct top-k of random scores) and tokens:
- r1mega: routing metadata (counts, offsets, row map; one launch), permute, unpermute + weighted
  combine (float32 accumulation), each forward and backward (r1mega/moe/dispatch.py; the CUDA
  kernels when the extension loads, else the PyTorch reference, which is what runs on CPU);
- megatron-core 0.16.1's unfused ``moe_utils.permute`` / ``unpermute`` (routing map + probs), whose
  permute includes its own index computation;
- the bytes floor of each copy at the measured device copy bandwidth: permute reads each token once
  and writes T*k rows; unpermute reads T*k rows and writes each token once (backward: + one more
  read or write of the T*k rows).
Time is the median of CUDA-event timings of calls queued back to back (wall clock on CPU); the
metadata is also timed as a CUDA-graph replay, its device time without the host's launch cost,
which is what the bar is judged on (the queued time is reported beside it).
Bars (issue 16, H200): permute and unpermute + combine forward each <= 1.3x their floor;
metadata <= 30 us.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from r1mega.bench.timing import copy_bandwidth, graph_ms, median_ms
from r1mega.moe import _cuda_ext
from r1mega.moe.dispatch import permute_tokens, routing_metadata, unpermute_tokens

BAR_FLOOR_RATIO = 1.3
BAR_METADATA_US = 30.0


def _megatron():
    try:
        from megatron.core.transformer.moe import moe_utils
        return moe_utils, None
    except Exception as exc:  # reported in the table and the JSON, the r1mega paths still run
        return None, f"{type(exc).__name__}: {exc}"


def _grad_fn(out, inputs, grad):
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench moe-dispatch", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--align", type=int, default=1, help="pad each expert's rows to this multiple")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--impl", default="auto", choices=["auto", "cuda", "torch"])
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-megatron", action="store_true")
    args = ap.parse_args(argv)
    if args.topk > args.experts:
        print(f"moe-dispatch: --topk {args.topk} exceeds --experts {args.experts}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    T, H, E, k = args.tokens, args.hidden, args.experts, args.topk
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(T, E, device=device, generator=g)
    top_scores, indices = scores.topk(k, dim=-1)                          # (T, k) distinct experts
    weights = torch.softmax(top_scores, dim=-1)                           # (T, k) float32
    x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    grad_tokens = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    elt = torch.finfo(dtype).bits // 8
    reps, warm = args.reps, args.warmup

    rows = []  # (name, r1mega ms, megatron ms | None, floor ms | None)
    results = {}
    bw = copy_bandwidth(max(T * H * elt, 1 << 20) * 2, reps, device)
    gb_per_s = bw / 1e9

    def floor_ms(nbytes):
        return nbytes / bw * 1e3

    # ---- r1mega ---------------------------------------------------------------------------------
    impl = args.impl
    ext_loaded = cuda and _cuda_ext.get() is not None
    meta = routing_metadata(indices, E, align=args.align, impl=impl, validate=False)
    t_meta = median_ms(lambda: routing_metadata(indices, E, align=args.align, impl=impl, validate=False),
                      reps, warm, cuda)
    t_meta_graph = graph_ms(lambda: routing_metadata(indices, E, align=args.align, impl=impl, validate=False),
                             reps) if ext_loaded and impl != "torch" else None
    xg = x.clone().requires_grad_(True)
    permuted = permute_tokens(xg, meta, impl=impl)
    t_perm = median_ms(lambda: permute_tokens(x, meta, impl=impl), reps, warm, cuda)
    grad_perm = torch.randn_like(permuted)
    t_perm_bwd = median_ms(_grad_fn(permuted, [xg], grad_perm), reps, warm, cuda)
    y = torch.randn(meta.num_rows, H, device=device, dtype=dtype, generator=g).requires_grad_(True)
    wg = weights.clone().requires_grad_(True)
    combined = unpermute_tokens(y, wg, meta, impl=impl)
    t_unperm = median_ms(lambda: unpermute_tokens(y.detach(), weights, meta, impl=impl), reps, warm, cuda)
    t_unperm_bwd = median_ms(_grad_fn(combined, [y, wg], grad_tokens), reps, warm, cuda)
    N = T * k
    fl_copy = floor_ms((T + N) * H * elt)
    fl_unperm_bwd = floor_ms((T + 2 * N) * H * elt + N * 8)
    rows += [("metadata", t_meta, None, None)]
    if t_meta_graph is not None:
        rows += [("metadata (graph replay)", t_meta_graph, None, None)]
    rows += [("permute fwd", t_perm, None, fl_copy),
             ("permute bwd", t_perm_bwd, None, fl_copy), ("unpermute+combine fwd", t_unperm, None, fl_copy),
             ("unpermute+combine bwd", t_unperm_bwd, None, fl_unperm_bwd)]

    # ---- megatron-core, same tokens and routes ----------------------------------------------------
    moe_utils, mc_error = (None, "skipped (--skip-megatron)") if args.skip_megatron else _megatron()
    mc = {}
    max_diff = {}
    if moe_utils is not None:
        routing_map = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, indices, True)
        probs = torch.zeros(T, E, device=device).scatter_(1, indices, weights)
        mc["permute fwd"] = median_ms(lambda: moe_utils.permute(x, routing_map, num_out_tokens=N), reps, warm, cuda)
        mx = x.clone().requires_grad_(True)
        m_perm, _, sorted_idx = moe_utils.permute(mx, routing_map, num_out_tokens=N)
        mc["permute bwd"] = median_ms(_grad_fn(m_perm, [mx], grad_perm[:N] if args.align == 1 else
                                              torch.randn_like(m_perm)), reps, warm, cuda)
        my = torch.randn(N, H, device=device, dtype=dtype, generator=g).requires_grad_(True)
        mp = probs.clone().requires_grad_(True)
        mc["unpermute+combine fwd"] = median_ms(
            lambda: moe_utils.unpermute(my.detach(), sorted_idx, x.shape, probs=probs, routing_map=routing_map),
            reps, warm, cuda)
        m_out = moe_utils.unpermute(my, sorted_idx, x.shape, probs=mp, routing_map=routing_map)
        mc["unpermute+combine bwd"] = median_ms(_grad_fn(m_out, [my, mp], grad_tokens), reps, warm, cuda)
        if args.align == 1:  # same row order as megatron: the outputs must agree
            max_diff["permute"] = float((permuted.detach() - m_perm.detach()).abs().max()) if N else 0.0
            ours = unpermute_tokens(my.detach(), weights, meta, impl=impl)
            theirs = moe_utils.unpermute(my.detach(), sorted_idx, x.shape, probs=probs, routing_map=routing_map)
            max_diff["unpermute"] = float((ours.float() - theirs.float()).abs().max()) if T else 0.0
        rows = [(n, ms, mc.get(n), f) for n, ms, _, f in rows]

    # ---- report ------------------------------------------------------------------------------------
    path = "cuda kernels" if ext_loaded and impl != "torch" else "PyTorch reference"
    print(f"moe-dispatch: {T} tokens x hidden {H}, top-{k} of {E} experts, align {args.align}, {args.dtype}, "
          f"{device.type}, r1mega path: {path}")
    print(f"device copy bandwidth {gb_per_s:.0f} GB/s (read + write)")
    if mc_error:
        print(f"megatron-core: not measured ({mc_error})")
    head = f"{'op':<24}{'r1mega ms':>11}{'megatron ms':>13}{'speedup':>9}{'floor ms':>10}{'x floor':>9}"
    print(head)
    print("-" * len(head))
    for name, ms, mms, fl in rows:
        print(f"{name:<24}{ms:>11.4f}" + (f"{mms:>13.4f}{mms / ms:>8.2f}x" if mms else f"{'-':>13}{'-':>9}")
              + (f"{fl:>10.4f}{ms / fl:>8.2f}x" if fl else f"{'-':>10}{'-':>9}"))
        results[name] = {"r1mega_ms": ms, "megatron_ms": mms, "floor_ms": fl,
                         "x_floor": (ms / fl) if fl else None}
    if max_diff:
        print("max |r1mega - megatron|: " + ", ".join(f"{n} {v:.3g}" for n, v in max_diff.items()))
    meta_us = (t_meta_graph if t_meta_graph is not None else t_meta) * 1e3
    bars = {
        "metadata_us": meta_us, "metadata_queued_us": t_meta * 1e3, "metadata_bar_us": BAR_METADATA_US,
        "metadata_ok": meta_us <= BAR_METADATA_US,
        "permute_fwd_ok": t_perm <= BAR_FLOOR_RATIO * fl_copy,
        "unpermute_fwd_ok": t_unperm <= BAR_FLOOR_RATIO * fl_copy,
    }
    print(f"bars (meaningful on the H200 with the cuda kernels): metadata {meta_us:.1f} us (device) <= "
          f"{BAR_METADATA_US:.0f}: {bars['metadata_ok']}; permute fwd <= {BAR_FLOOR_RATIO}x floor: "
          f"{bars['permute_fwd_ok']}; unpermute+combine fwd <= {BAR_FLOOR_RATIO}x floor: {bars['unpermute_fwd_ok']}")
    print(json.dumps({"bench": "moe-dispatch", "tokens": T, "hidden": H, "experts": E, "topk": k,
                      "align": args.align, "dtype": args.dtype, "device": device.type, "r1mega_path": path,
                      "copy_bandwidth_gb_s": gb_per_s, "megatron_error": mc_error, "ops": results,
                      "max_abs_diff_vs_megatron": max_diff, "bars": bars}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
