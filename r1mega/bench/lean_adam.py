"""`r1mega bench lean-adam`: the lean AdamW kernel's launch configurations against its bytes floor.

The update is memory-bound: per element it reads the gradient, the weight and both moments and
writes the weight and the moments back (14 bytes in the bf16 stochastic mode with bf16 moments,
the MoE train step's). For each candidate "BLOCK,WARPS" it times one optimizer step over tensors
of qwen3-moe-small's sizes (a layer's stacked experts, its attention projections, a norm), beside
a device copy of the same bytes in the same run (the floor), and checks that every candidate
writes the reference configuration's bits (the stochastic rounding draws are keyed by element
index, not by block). The module's BLOCK, NUM_WARPS are the training's choice.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from r1mega.bench.timing import copy_bandwidth, median_ms

CANDIDATES = ["1024,4", "512,4", "2048,4", "2048,8", "4096,8", "4096,16", "8192,16"]
# qwen3-moe-small: one layer's experts gate_up (64 x 1536 x 2048) and down, qkv, proj, a norm
SIZES = [64 * 1536 * 2048, 64 * 2048 * 768, 5120 * 2048, 2048 * 4096, 2048]
BYTES = {("bf16_stochastic", "bf16"): 14, ("bf16_remainder", "bf16"): 18,
         ("bf16_remainder", "fp32"): 26, ("fp32", "bf16"): 20, ("fp32", "fp32"): 28}


def _state(sizes, master: str, moments: str, seed: int = 0):
    from r1mega.train.lean_adam_math import split_master

    g = torch.Generator(device="cuda").manual_seed(seed)
    mdt = torch.float32 if moments == "fp32" else torch.bfloat16
    params, states = [], []
    for n in sizes:
        w = torch.randn(n, generator=g, device="cuda") * 0.02
        st = {"step": torch.full((), 3.0, device="cuda"),
              "exp_avg": (torch.randn(n, generator=g, device="cuda") * 1e-3).to(mdt),
              "exp_avg_sq": (torch.rand(n, generator=g, device="cuda") * 1e-6).to(mdt)}
        if master == "bf16_remainder":
            w, st["remainder"] = split_master(w)
        p = torch.nn.Parameter(w if master == "fp32" else w.to(torch.bfloat16), requires_grad=False)
        # an fp32 master steps from megatron's fp32 main grads; the lean masters from bf16 ones
        p.grad = (torch.randn(n, generator=g, device="cuda") * 1e-2).to(
            torch.float32 if master == "fp32" else torch.bfloat16)
        params.append(p)
        states.append(st)
    return params, states


def main(argv=None) -> int:
    from r1mega.bench.train_step import add_optimizer_state_args

    ap = argparse.ArgumentParser(prog="r1mega bench lean-adam", description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", default=";".join(CANDIDATES),
                    help="candidates 'BLOCK,WARPS;...'; the first is the reference")
    add_optimizer_state_args(ap, master="bf16_stochastic", moments="bf16")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    from r1mega.ops import lean_adam_triton as lat
    from r1mega.train.lean_adam_math import AdamHyper

    if not lat.available():
        print("lean-adam needs CUDA and Triton", file=sys.stderr)
        return 2
    key = (args.master_weights, args.moments_dtype)
    if key not in BYTES:
        print(f"lean-adam: no bytes count for {key}", file=sys.stderr)
        return 2
    cands = [tuple(int(v) for v in c.split(",")) for c in args.tiles.split(";") if c.strip()]
    h = AdamHyper(lr=1e-5, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    scale = torch.tensor(2.0, device="cuda")
    found_inf = torch.tensor(0.0, device="cuda")
    params, states = _state(SIZES, *key)
    modes = [args.master_weights] * len(params)
    seeds = list(range(len(params)))
    pristine = ([p.detach().clone() for p in params],
                [{k: v.clone() for k, v in st.items()} for st in states])
    n = sum(SIZES)
    nbytes = n * BYTES[key]
    floor_bw = copy_bandwidth(nbytes // 2, args.reps)
    floor_ms = nbytes / floor_bw * 1e3

    def one(tiles):
        lat.lean_adamw_cuda(params, states, h, modes, grad_scale=scale, found_inf=found_inf,
                            seeds=seeds, tiles=tiles)

    def restore():
        for p, w in zip(params, pristine[0]):
            p.data.copy_(w)
        for st, saved in zip(states, pristine[1]):
            for k, v in saved.items():
                st[k].copy_(v)

    rows, ref_bits = {}, None
    for tiles in cands:
        name = f"{tiles[0]},{tiles[1]}"
        restore()
        one(tiles)
        bits = [p.detach().clone() for p in params] + [st[k].clone() for st in states
                                                       for k in ("exp_avg", "exp_avg_sq")]
        same = ref_bits is None or all(torch.equal(a, b) for a, b in zip(bits, ref_bits))
        ref_bits = ref_bits or bits
        del bits
        ms = median_ms(lambda: one(tiles), args.reps, 3)
        rows[name] = {"ms": ms, "tb_per_s": nbytes / ms / 1e9, "vs_floor": ms / floor_ms,
                      "bits_equal_reference": same}
    print(f"lean-adam: {n / 1e6:.0f}M elements ({len(SIZES)} tensors), {args.master_weights}, "
          f"{args.moments_dtype} moments, {BYTES[key]} B/element = {nbytes / 1e9:.2f} GB; device "
          f"copy of the same bytes {floor_ms:.3f} ms ({floor_bw / 1e12:.2f} TB/s)")
    print(f"{'BLOCK,WARPS':<14}{'ms':>9}{'TB/s':>8}{'x floor':>9}  bits = reference")
    for name, r in rows.items():
        print(f"{name:<14}{r['ms']:>9.3f}{r['tb_per_s']:>8.2f}{r['vs_floor']:>9.2f}  "
              f"{'yes' if r['bits_equal_reference'] else 'NO'}")
    equal = {k: v for k, v in rows.items() if v["bits_equal_reference"]}
    best = min(equal, key=lambda k: equal[k]["ms"])
    print(json.dumps({"elements": n, "bytes": nbytes, "floor_ms": floor_ms,
                      "master_weights": args.master_weights, "moments_dtype": args.moments_dtype,
                      "candidates": rows, "reference": next(iter(rows)), "fastest_bit_equal": best}))
    return 0
