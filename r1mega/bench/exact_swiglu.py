"""`r1mega bench exact-swiglu`: the exact mode's fused SwiGLU beside the paths it replaces.

Measured in one run on the same (tokens, 2F) activations, forward and forward + backward:
- r1mega's fused kernels (r1mega/ops/triton_swiglu.py; the PyTorch reference off CUDA);
- megatron's unfused ``glu`` (chunk, silu, ``+ glu_linear_offset``, mul; autograd's backward),
  what the exact mode ran before;
- megatron's compiled ``bias_swiglu_impl`` (the default mode's, not batch-invariant), on CUDA;
- the bytes floor at the measured device copy bandwidth: forward reads 2F and writes F per row,
  backward reads F + 2F and writes 2F.
Time is the median of CUDA-event timings of queued calls (wall clock on CPU). ``--smoke`` runs a
tiny shape on CPU in seconds (the harness and the JSON line, not the numbers).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from r1mega.bench.timing import copy_bandwidth, median_ms
from r1mega.ops import triton_swiglu


def _megatron_unfused(y: torch.Tensor) -> torch.Tensor:
    """megatron 0.16.1 MLP's unfused gated path (glu_linear_offset 0, no clamp), verbatim ops."""
    x_glu, x_linear = torch.chunk(y, 2, dim=-1)
    return F.silu(x_glu) * (x_linear + 0.0)


def _megatron_fused():
    """megatron's compiled SwiGLU, or (None, why) where it cannot run."""
    try:
        from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

        return (lambda y: bias_swiglu_impl(y, None)), None
    except Exception as exc:  # reported; the other rows still run
        return None, f"{type(exc).__name__}: {exc}"


def _time_pair(fn, y, dout, reps, warm, cuda):
    """(forward ms, forward + backward ms) of ``fn`` on ``y``."""
    fwd = median_ms(lambda: fn(y), reps, warm, cuda)
    yg = y.detach().requires_grad_(True)

    def step():
        torch.autograd.grad(fn(yg), [yg], dout)

    return fwd, median_ms(step, reps, warm, cuda)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench exact-swiglu", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8 * 2048)
    ap.add_argument("--ffn", type=int, default=5632, help="F: the MLP's hidden size (fc1 gives 2F)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, in seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.ffn, args.reps, args.warmup = 64, 96, 3, 1
    if args.tokens <= 0 or args.ffn <= 0:
        print(f"exact-swiglu: --tokens and --ffn must be positive (got {args.tokens}, {args.ffn})",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    T, Fh = args.tokens, args.ffn
    g = torch.Generator(device=device).manual_seed(0)
    y = (torch.randn(T, 2 * Fh, device=device, generator=g) * 2).to(dtype)
    dout = torch.randn(T, Fh, device=device, generator=g).to(dtype)
    elt = torch.finfo(dtype).bits // 8
    bw = copy_bandwidth(max(T * 2 * Fh * elt, 1 << 20), args.reps, device)
    floor_fwd = 3 * T * Fh * elt / bw * 1e3
    floor_both = floor_fwd + 5 * T * Fh * elt / bw * 1e3

    impls = {"r1mega fused": triton_swiglu.swiglu, "megatron unfused": _megatron_unfused}
    fused_fn, fused_error = _megatron_fused() if cuda else (None, "CPU: not compiled here")
    if fused_fn is not None:
        impls["megatron compiled"] = fused_fn
    times = {name: _time_pair(fn, y, dout, args.reps, args.warmup, cuda) for name, fn in impls.items()}

    # The fused output against the unfused one (each within its own rounding of the same value).
    ref = _megatron_unfused(y.double())
    max_diff = {name: float((fn(y).double() - ref).abs().max()) for name, fn in impls.items()}

    path = "triton kernels" if triton_swiglu.supported(y) else "PyTorch reference"
    print(f"exact-swiglu: {T} tokens x 2F = {2 * Fh}, {args.dtype}, {device.type}, r1mega path: {path}")
    print(f"device copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    if fused_error:
        print(f"megatron compiled: not measured ({fused_error})")
    head = f"{'impl':<20}{'fwd ms':>10}{'x floor':>9}{'fwd+bwd ms':>12}{'x floor':>9}{'max |d|':>11}"
    print(head)
    print("-" * len(head))
    rows = {}
    for name, (fwd, both) in times.items():
        print(f"{name:<20}{fwd:>10.4f}{fwd / floor_fwd:>8.2f}x{both:>12.4f}{both / floor_both:>8.2f}x"
              f"{max_diff[name]:>11.3g}")
        rows[name] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_x_floor": fwd / floor_fwd,
                      "fwd_bwd_x_floor": both / floor_both, "max_abs_diff_vs_float64": max_diff[name]}
    print(f"floor: fwd {floor_fwd:.4f} ms, fwd+bwd {floor_both:.4f} ms")
    ours = times["r1mega fused"][1]
    result = {"bench": "exact-swiglu", "tokens": T, "ffn": Fh, "dtype": args.dtype,
              "device": device.type, "r1mega_path": path, "copy_bandwidth_gb_s": bw / 1e9,
              "floor_fwd_ms": floor_fwd, "floor_fwd_bwd_ms": floor_both, "impls": rows,
              "megatron_compiled_error": fused_error,
              "speedup_vs_unfused_fwd_bwd": times["megatron unfused"][1] / ours}
    if "megatron compiled" in times:
        result["speedup_vs_megatron_compiled_fwd_bwd"] = times["megatron compiled"][1] / ours
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
