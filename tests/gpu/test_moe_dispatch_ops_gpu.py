"""The dispatch kernels as custom ops on CUDA: torch.library.opcheck of each op (schema, fake
implementation against the real outputs, no aliasing), and an MoE layer compiled (forward-only in
one graph, fullgraph: no break at the kernels) giving the eager layer's outputs and gradients."""
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


def _compiled_vs_eager(device: str):
    """Output and gradients of an MoE layer compiled (forward-only: in one graph) and eager, in bf16,
    each against the same layer in float32 (the same bf16 values upcast: the same routes). The
    compiled layer rounds differently (inductor fuses the SwiGLU in float32), so it is held to
    eager's own distance from the float32 result, not to eager's bits."""
    import copy

    from tests.unit.test_moe_layer import SIGMOID, make_layer, settings

    layer = make_layer(settings(**SIGMOID)).to(device).to(torch.bfloat16)
    layer.router_weight.data = layer.router_weight.data.float()
    ref_layer = copy.deepcopy(layer).float()
    torch.manual_seed(0)
    x = torch.randn(128, 2, layer.router_weight.shape[1], device=device, dtype=torch.bfloat16)
    g = torch.randn_like(x)

    def run(mod, fn, dtype):
        xi = x.to(dtype).requires_grad_(True)
        mod.zero_grad(set_to_none=True)
        out = fn(xi)[0]
        out.backward(g.to(dtype))
        return [out.detach(), xi.grad] + [p.grad.clone() for p in mod.parameters()
                                          if p.grad is not None]

    ref = run(ref_layer, ref_layer, torch.float32)
    eager = run(layer, layer, torch.bfloat16)
    torch._dynamo.reset()
    # Training: the routed part runs eagerly (its saved-rows hooks), the rest compiled.
    compiled = run(layer, torch.compile(layer), torch.bfloat16)
    # Forward-only (log-probs, compiled decode): the whole layer in one graph, no break.
    torch._dynamo.reset()
    with torch.no_grad():
        fwd = torch.compile(layer, fullgraph=True)(x)[0]
    r = ref[0].float()
    assert float((fwd.float() - r).abs().max()) <= 2.0 * float((eager[0].float() - r).abs().max()) \
        + 1e-3 * float(r.abs().max())
    assert len(eager) == len(compiled) == len(ref)
    for r, a, b in zip(ref, eager, compiled):
        r = r.float()
        e_err = float((a.float() - r).abs().max())
        c_err = float((b.float() - r).abs().max())
        scale = float(r.abs().max())
        assert c_err <= 2.0 * e_err + 1e-3 * scale, (c_err, e_err, scale)
    return ref, eager, compiled


def test_moe_layer_compiles_in_one_graph_and_matches_eager():
    _compiled_vs_eager("cuda")
