"""The MoE layer does not keep its permuted rows (T*k, H) for backward: the backward gathers
them again from the layer input (r1mega/moe/recompute.py). Gradients are bitwise those of the
layer that keeps them, the rows are freed after the forward, and an input changed in place before
the backward is refused as autograd refuses it for tensors it keeps itself."""
from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

import r1mega.moe.layer as moe_layer
from tests.unit.test_moe_layer import H, SIGMOID, make_layer, settings

S, B = 6, 4


def _run(layer, x, g, keep_rows: bool, monkeypatch):
    """-> (input and parameter gradients, whether the graph held the rows until backward)."""
    monkeypatch.undo()
    if keep_rows:  # the layer as it was: autograd keeps the rows
        monkeypatch.setattr(moe_layer, "rebuild_when_saved",
                            lambda *a, **k: contextlib.nullcontext())
    rows_ref = []
    dispatch = layer.dispatcher.dispatch

    def recording(*a, **k):
        out = dispatch(*a, **k)
        rows_ref.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(layer.dispatcher, "dispatch", recording)
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, _ = layer(x)
    gc.collect()
    held = rows_ref[0]() is not None
    out.backward(g)
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    return grads, held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, SIGMOID], ids=["softmax", "sigmoid-group-shared"])
def test_rows_rebuilt_gradients_bitwise_and_not_held(kw, dtype, monkeypatch):
    s = settings(**kw)
    layer = make_layer(s).to(dtype)
    layer.router_weight.data = layer.router_weight.data.float()  # the router stays float32
    torch.manual_seed(1)
    x = torch.randn(S, B, H, dtype=dtype)
    g = torch.randn(S, B, H, dtype=dtype)
    kept, kept_held = _run(layer, x, g, True, monkeypatch)
    rebuilt, rebuilt_held = _run(layer, x, g, False, monkeypatch)
    assert len(kept) == len(rebuilt) and len(kept) >= 4
    for a, b in zip(kept, rebuilt):
        assert torch.equal(a, b)
    assert kept_held and not rebuilt_held


def test_input_changed_in_place_before_backward_is_an_error():
    layer = make_layer(settings())
    x = torch.randn(S * B, H, requires_grad=True)
    hidden = x * 1.0                       # a non-leaf the layer reads, then changed in place
    out, _ = layer(hidden.view(S, B, H))
    with torch.no_grad():
        hidden.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()
