"""The lean AdamW Triton kernel's multi-tensor launch (r1mega/ops/lean_adam_triton.py) in Triton's
CPU interpreter: one launch over tensors of many sizes and kinds updates each exactly as a launch
over that tensor alone does (the tables and the program -> tensor bisection are the new part), and
stays within float32 rounding of the PyTorch reference. Skipped when Triton is not importable."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the kernel in Triton's interpreter (TRITON_INTERPRET=1)")

# Sizes around the 1,024-element block: one element, ragged tails, exact multiples, several blocks.
SIZES = [1, 1023, 1024, 1025, 3000, 17, 4096]


def _tensors(seed: int, mode: str, moments: torch.dtype):
    from r1mega.train.lean_adam_math import split_master

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(SIZES):
        fp32_param = i == 5  # an fp32 parameter (a router) in a bf16 model: its own master
        master = torch.randn(n, generator=g) * 0.05
        rem = None
        if fp32_param:
            p = master.clone()
        elif mode == "bf16_remainder":
            p, rem = split_master(master)
        else:
            p = master.to(torch.bfloat16)
        p = torch.nn.Parameter(p)
        p.grad = (torch.randn(n, generator=g) * 0.3).to(torch.float32 if fp32_param else torch.bfloat16)
        st = {"step": torch.full((), 3.0), "exp_avg": (torch.randn(n, generator=g) * 1e-2).to(moments),
              "exp_avg_sq": (torch.rand(n, generator=g) * 1e-4).to(moments)}
        if rem is not None:
            st["remainder"] = rem
        out.append((p, st, "fp32" if fp32_param else mode))
    return out


def _clone(items):
    res = []
    for p, st, mode in items:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        res.append((q, {k: v.clone() for k, v in st.items()}, mode))
    return res


@pytest.mark.parametrize("mode,moments", [("bf16_remainder", torch.float32),
                                          ("bf16_stochastic", torch.bfloat16)])
def test_one_launch_equals_one_launch_per_tensor(mode, moments):
    from r1mega.ops.lean_adam_triton import lean_adamw_cuda
    from r1mega.train.lean_adam_math import AdamHyper

    h = AdamHyper(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    items = _tensors(0, mode, moments)
    alone, together = _clone(items), _clone(items)
    seeds = [11 * i + 5 for i in range(len(items))]
    for (p, st, m), seed in zip(alone, seeds):
        lean_adamw_cuda([p], [st], h, [m], grad_scale=None, found_inf=None, seeds=[seed])
    lean_adamw_cuda([p for p, _, _ in together], [st for _, st, _ in together], h,
                    [m for _, _, m in together], grad_scale=None, found_inf=None, seeds=seeds)
    for (a, sa, _), (b, sb, _), (p0, _, _) in zip(alone, together, items):
        assert torch.equal(a.data.view(-1), b.data.view(-1))
        assert not torch.equal(a.data, p0.data)  # the update did happen
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_multi_launch_follows_the_reference():
    from r1mega.ops.lean_adam_triton import lean_adamw_cuda
    from r1mega.train.lean_adam_math import AdamHyper, join_master, lean_step_reference

    h = AdamHyper(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    items = _tensors(1, "bf16_remainder", torch.float32)
    ref = _clone(items)
    scale = torch.tensor(2.0)
    lean_adamw_cuda([p for p, _, _ in items], [st for _, st, _ in items], h, [m for _, _, m in items],
                    grad_scale=scale, found_inf=None, seeds=[0] * len(items))
    for (p, st, m), (q, sq, _) in zip(items, ref):
        out = lean_step_reference(q, q.grad, sq["exp_avg"], sq["exp_avg_sq"], sq.get("remainder"), 3, h,
                                  m, grad_scale=scale, found_inf=None, generator=None)
        got = join_master(p.data, st["remainder"]) if m == "bf16_remainder" else p.data
        want = join_master(out["param"], out["remainder"]) if m == "bf16_remainder" else out["param"]
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(st["exp_avg_sq"], out["exp_avg_sq"], rtol=2e-6, atol=1e-12)


def test_found_inf_leaves_every_tensor_alone():
    from r1mega.ops.lean_adam_triton import lean_adamw_cuda
    from r1mega.train.lean_adam_math import AdamHyper

    h = AdamHyper(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    items = _tensors(2, "bf16_stochastic", torch.bfloat16)
    before = _clone(items)
    lean_adamw_cuda([p for p, _, _ in items], [st for _, st, _ in items], h, [m for _, _, m in items],
                    grad_scale=None, found_inf=torch.tensor(1.0), seeds=list(range(len(items))))
    for (p, st, _), (q, sq, _) in zip(items, before):
        assert torch.equal(p.data, q.data)
        assert all(torch.equal(st[k], sq[k]) for k in st)
