"""Which form of a tensor's max |t| inductor fuses into the kernel that makes t (the tensorwise
FP8 linears' in-graph amax, r1mega/precision/linear.py _graph_amax). The SwiGLU before fc2 and
its backward before fc1's dgrad at the gemm-heavy shape (16384 tokens, FFN 14,336), compiled,
each form timed against the same kernel with no amax (the backward also against the bound: each
half reduced before the cat); the amax compared with torch's of the output.
    python tools/amax_fusion_probe.py [--tokens 16384 --ffn 14336]      (a CUDA device)
Last line: one JSON object, ms per call for each (pattern, form)."""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from r1mega.precision.linear import AMAX_FORMS, graph_amax_of


def _fwd(h):
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def _bwd(h, dx):
    g, u = h.chunk(2, dim=-1)
    s = torch.sigmoid(g.float())
    dg = dx.float() * u.float() * s * (1 + g.float() * (1 - s))
    du = dx.float() * g.float() * s
    return torch.cat([dg, du], dim=-1).to(h.dtype)


def _bwd_halves_amax(h, dx):
    """the bound: each half's rows reduced before the cat (what a SwiGLU that knew its consumer
    could do); not a form the FP8 linear can take, which sees only the cat"""
    g, u = h.chunk(2, dim=-1)
    s = torch.sigmoid(g.float())
    dg = (dx.float() * u.float() * s * (1 + g.float() * (1 - s))).to(h.dtype)
    du = (dx.float() * g.float() * s).to(h.dtype)
    amax = torch.maximum(dg.abs().amax(dim=-1).amax(), du.abs().amax(dim=-1).amax())
    return torch.cat([dg, du], dim=-1), amax.float().reshape(1)


def _time(fn, *args, iters=20):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn(*args)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ffn", type=int, default=14336)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(args.tokens, 2 * args.ffn, device=dev, generator=g).to(torch.bfloat16)
    dx = torch.randn(args.tokens, args.ffn, device=dev, generator=g).to(torch.bfloat16) * 1e-3
    res = {}
    for pattern, fn, inputs in (("swiglu", _fwd, (h,)), ("swiglu_backward", _bwd, (h, dx))):
        plain = torch.compile(fn)
        res[(pattern, "none")] = _time(plain, *inputs)
        cands = [(form, torch.compile(lambda *a, _f=form: (lambda t: (t, graph_amax_of(t, _f)))(fn(*a))))
                 for form in AMAX_FORMS]
        if pattern == "swiglu_backward":
            cands.append(("split-before-cat", torch.compile(_bwd_halves_amax)))
        for form, both in cands:
            out, amax = both(*inputs)
            ok = bool(torch.equal(amax.reshape(()), out.abs().amax().float()))
            res[(pattern, form)] = _time(both, *inputs)
            print(f"{pattern:<16} {form:<16} {res[(pattern, form)]:.3f} ms  (no amax "
                  f"{res[(pattern, 'none')]:.3f} ms; amax equal to torch's of the output: {ok})", flush=True)
            torch._dynamo.reset()
    print(json.dumps({f"{p}/{f}": round(v, 4) for (p, f), v in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
