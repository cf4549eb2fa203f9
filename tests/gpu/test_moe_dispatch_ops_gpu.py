"""The dispatch kernels as custom ops on CUDA: torch.library.opcheck of each op (schema, fake
implementation against the real outputs, no aliasing), and an MoE layer compiled in one graph
(fullgraph: no break at the kernels) giving the eager layer's outputs and gradients."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(T=64, k=4, E=8, H=128, align=1):
    from r1mega.moe import dispatch as D

    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randint(0, E, (T, k), generator=g, device="cuda").int()
    num_rows = D.num_permuted_rows(T, k, E, align)
    meta = D.routing_metadata(idx, E, align, impl="cuda")
    x = torch.randn(T, H, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, k, generator=g, device="cuda")
    return idx, E, align, num_rows, meta, x, w


@pytest.mark.parametrize("align", [1, 16])
def test_opcheck_each_dispatch_op(align):
    from r1mega.moe import _cuda_ext, dispatch_ops  # noqa: F401

    if _cuda_ext.get() is None:
        pytest.skip(f"r1mega_moe_cuda did not load: {_cuda_ext.load_error()}")
    idx, E, align, num_rows, meta, x, w = _inputs(align=align)
    rows = torch.ops.r1mega.moe_permute(x, meta.row_map, meta.src_entry)
    out = torch.ops.r1mega.moe_unpermute(rows, meta.row_map, meta.src_entry, w)
    checks = [
        (torch.ops.r1mega.moe_routing_metadata.default, (idx, E, align, num_rows)),
        (torch.ops.r1mega.moe_permute.default, (x, meta.row_map, meta.src_entry)),
        (torch.ops.r1mega.moe_unpermute.default, (rows, meta.row_map, meta.src_entry, w)),
        (torch.ops.r1mega.moe_unpermute.default, (rows, meta.row_map, meta.src_entry, None)),
        (torch.ops.r1mega.moe_unpermute_backward.default,
         (out, rows, meta.row_map, w, meta.src_entry)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_moe_layer_compiles_in_one_graph_and_matches_eager():
    from tests.unit.test_moe_layer import SIGMOID, make_layer, settings

    layer = make_layer(settings(**SIGMOID)).cuda().to(torch.bfloat16)
    layer.router_weight.data = layer.router_weight.data.float()
    torch.manual_seed(0)
    x = torch.randn(128, 2, layer.router_weight.shape[1], device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)

    def run(fn):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = fn(xi)[0]
        out.backward(g)
        return [out.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()
                                          if p.grad is not None]

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True))
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
