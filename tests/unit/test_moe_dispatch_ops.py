"""The dispatch kernels' custom ops (r1mega/moe/dispatch_ops.py) describe their outputs as the
kernels produce them: under fake tensors, each op's shapes and dtypes equal those of the PyTorch
references (which match the kernels, tests/gpu/test_moe_dispatch_gpu.py) on the same inputs."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from r1mega.moe import dispatch as D
from r1mega.moe import dispatch_ops  # noqa: F401  (registers the ops)


def _like(ts):
    return [(tuple(t.shape), t.dtype) for t in ts]


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_outputs_match_the_references(align, dtype):
    T, k, E, H = 13, 3, 6, 16
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, E, (T, k), generator=g).int()
    meta = D.reference_routing_metadata(idx, E, align)
    x = torch.randn(T, H, generator=g).to(dtype)
    rows = D.reference_permute(x, meta.row_map, meta.src_entry)
    w = torch.rand(T, k, generator=g)
    out = D.reference_unpermute(rows, meta.row_map, w)
    grads = D.reference_unpermute_backward(out, rows, meta.row_map, w, meta.src_entry)
    num_rows = D.num_permuted_rows(T, k, E, align)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        f = mode.from_tensor
        fmeta = torch.ops.r1mega.moe_routing_metadata(f(idx), E, align, num_rows)
        frows = torch.ops.r1mega.moe_permute(f(x), f(meta.row_map), f(meta.src_entry))
        fout = torch.ops.r1mega.moe_unpermute(f(rows), f(meta.row_map), f(meta.src_entry), f(w))
        fsum = torch.ops.r1mega.moe_unpermute(f(rows), f(meta.row_map), f(meta.src_entry), None)
        fgrads = torch.ops.r1mega.moe_unpermute_backward(f(out), f(rows), f(meta.row_map), f(w),
                                                         f(meta.src_entry))
    assert _like(fmeta) == _like([meta.counts, meta.offsets, meta.row_map, meta.src_entry])
    assert _like([frows, fout, fsum]) == _like([rows, out, out])
    assert _like(fgrads) == _like(grads)
