"""r1mega/moe/layer.py against a naive per-token reference written here from the papers' formulas
(float64, a Python loop over tokens and their k experts), and the balancing machinery of
r1mega/moe/balancing.py on the layer alone (no model, no process group)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from r1mega.moe.balancing import AuxLossCollector, update_expert_biases
from r1mega.moe.layer import MoELayer
from r1mega.moe.settings import MoESettings

H, FF, E = 32, 24, 8


def settings(**kw) -> MoESettings:
    base = dict(num_experts=E, topk=2, ffn_hidden_size=FF, shared_ffn_hidden_size=0, router="softmax",
                norm_topk_prob=True, num_groups=1, topk_groups=1, routed_scaling_factor=1.0,
                bias_update_rate=0.0, aux_loss_coeff=0.0, z_loss_coeff=0.0, first_k_dense=0)
    base.update(kw)
    return MoESettings(**base)


def make_layer(s: MoESettings, collector=None, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4,
                            use_cpu_initialization=True, init_method_std=0.2)
    return MoELayer(cfg, s, collector=collector)


SIGMOID = dict(router="sigmoid_group", num_groups=4, topk_groups=2, routed_scaling_factor=2.5,
               shared_ffn_hidden_size=16, bias_update_rate=0.01)


def reference_routes(x, w_router, s: MoESettings, bias=None):
    """Per token: list of (expert, weight), from the formulas, float64."""
    logits = x.double() @ w_router.double().T                            # (T, E)
    routes = []
    for t in range(x.shape[0]):
        if s.router == "softmax":
            p = torch.softmax(logits[t], 0)
            chosen = sorted(range(E), key=lambda e: -p[e])[:s.topk]
            w = [p[e] for e in chosen]
            if s.norm_topk_prob:
                w = [v / sum(w) for v in w]
            w = [v * s.routed_scaling_factor for v in w]
        else:
            sc = torch.sigmoid(logits[t])
            choice = sc + (0 if bias is None else bias.double())
            per = E // s.num_groups
            gscore = [sum(sorted(choice[g * per:(g + 1) * per].tolist(), reverse=True)[:2])
                      for g in range(s.num_groups)]
            groups = sorted(range(s.num_groups), key=lambda g: -gscore[g])[:s.topk_groups]
            eligible = [e for e in range(E) if e // per in groups]
            chosen = sorted(eligible, key=lambda e: -choice[e])[:s.topk]
            w = [sc[e] for e in chosen]
            if s.norm_topk_prob:
                w = [v / sum(w) for v in w]
            w = [v * s.routed_scaling_factor for v in w]
        routes.append(list(zip(chosen, w)))
    return routes


def reference_forward(layer: MoELayer, x2d: torch.Tensor, params: dict) -> torch.Tensor:
    """x (T, H) -> (T, H) float64, differentiable in ``params`` (float64 leaves)."""
    s = layer.settings
    bias = layer.expert_bias
    routes = reference_routes(x2d, params["router"].detach(), s, bias)
    logits = x2d.double() @ params["router"].T
    probs = torch.softmax(logits, -1) if s.router == "softmax" else torch.sigmoid(logits)
    rows = []
    for t, route in enumerate(routes):
        xt = x2d[t].double()
        acc = torch.zeros(H, dtype=torch.float64)
        chosen = [e for e, _ in route]
        raw = torch.stack([probs[t, e] for e in chosen])                  # differentiable weights
        w = raw / raw.sum() if s.norm_topk_prob else raw
        w = w * s.routed_scaling_factor
        for j, e in enumerate(chosen):
            gu = params["gate_up"][e] @ xt
            h = F.silu(gu[:FF]) * gu[FF:]
            acc = acc + w[j] * (params["down"][e] @ h)
        if "shared_gate_up" in params:
            gu = params["shared_gate_up"] @ xt
            f = gu.shape[0] // 2
            acc = acc + params["shared_down"] @ (F.silu(gu[:f]) * gu[f:])
        rows.append(acc)
    return torch.stack(rows)


def leaf_params(layer: MoELayer) -> dict:
    p = {"router": layer.router_weight, "gate_up": layer.experts.gate_up, "down": layer.experts.down}
    if layer.shared_expert is not None:
        p.update(shared_gate_up=layer.shared_expert.gate_up, shared_down=layer.shared_expert.down)
    return {k: v.detach().double().requires_grad_(True) for k, v in p.items()}


@pytest.mark.parametrize("kw", [{}, {"norm_topk_prob": False, "routed_scaling_factor": 1.5},
                                SIGMOID], ids=["softmax", "softmax-unnormed", "sigmoid-group-shared"])
def test_forward_and_gradients_equal_naive_reference(kw):
    s = settings(**kw)
    layer = make_layer(s)
    if layer.expert_bias is not None:
        layer.expert_bias.copy_(torch.randn(E) * 0.1)  # the bias must steer selection only
    S, B = 5, 3
    x = torch.randn(S, B, H, requires_grad=True)
    out, bias = layer(x)
    assert bias is None and out.shape == (S, B, H)
    params = leaf_params(layer)
    x64 = x.detach().double().requires_grad_(True)
    ref = reference_forward(layer, x64.view(S * B, H), params).view(S, B, H)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    g = torch.randn(S, B, H)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    mine = {"router": layer.router_weight, "gate_up": layer.experts.gate_up, "down": layer.experts.down}
    if layer.shared_expert is not None:
        mine.update(shared_gate_up=layer.shared_expert.gate_up, shared_down=layer.shared_expert.down)
    for name, p in mine.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad.double(), params[name].grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    assert layer.router_weight.dtype == torch.float32


def test_balance_losses_recorded_on_training_forwards_only():
    s = settings(aux_loss_coeff=0.1, z_loss_coeff=0.01)
    col = AuxLossCollector(s.aux_loss_coeff, s.z_loss_coeff)
    layer = make_layer(s, collector=col)
    S, B = 6, 2
    x = torch.randn(S, B, H)
    with torch.no_grad():
        layer(x)
    assert col.take() is None  # forward-only: nothing recorded
    layer(x)
    got = col.take()
    # Direct formulas, sequence b = column b of the (S, B) layout.
    logits = (x.reshape(-1, H).double() @ layer.router_weight.double().T).view(S, B, E).transpose(0, 1)
    p = torch.softmax(logits, -1)                                          # (B, S, E)
    idx = p.topk(2, -1).indices
    f = torch.zeros(B, E, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            for e in idx[b, t]:
                f[b, e] += E / (2 * S)
    aux = (f * p.mean(1)).sum(-1).mean()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(got.double(), 0.1 * aux + 0.01 * z, rtol=1e-5, atol=1e-7)
    assert col.take() is None  # take clears


def skewed_input(T: int, layer: MoELayer) -> torch.Tensor:
    """Tokens that mostly prefer expert 0 and 1: a load far from balance."""
    torch.manual_seed(1)
    with torch.no_grad():
        layer.router_weight[0] += 1.5 * layer.router_weight[0].sign()
        layer.router_weight[1] += 1.0 * layer.router_weight[1].sign()
    base = layer.router_weight[0].detach().sign() + layer.router_weight[1].detach().sign()
    return (0.5 * base + torch.randn(T, H)).view(T, 1, H)


def load_of(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, _, idx = layer.route(x.view(-1, H))
    return torch.bincount(idx.reshape(-1), minlength=E).float()


def test_bias_moves_load_toward_balance_on_training_steps_only():
    s = settings(router="sigmoid_group", num_groups=2, topk_groups=2, bias_update_rate=0.02)
    layer = make_layer(s)
    x = skewed_input(64, layer)
    start = load_of(layer, x)
    spread0 = float(start.max() - start.min())
    assert spread0 > 20, start  # the fixture is skewed enough to mean something

    # Forward-only passes (no grad): no loads counted, so the bias step leaves the bias alone.
    for _ in range(5):
        with torch.no_grad():
            layer(x)
        assert layer.expert_load_accum.sum() == 0
        update_expert_biases([layer])
    assert torch.equal(layer.expert_bias, torch.zeros(E))

    # Training passes: loads counted, bias moved by rate * sign(mean - load) per step.
    layer(x)
    load = layer.expert_load_accum.clone()
    torch.testing.assert_close(load, start)
    update_expert_biases([layer])
    torch.testing.assert_close(layer.expert_bias, 0.02 * torch.sign(load.mean() - load))
    for _ in range(40):
        layer(x)
        update_expert_biases([layer])
    end = load_of(layer, x)
    assert float(end.max() - end.min()) < 0.5 * spread0, (start, end)
    # A skipped optimizer step (applied=False) drops the step's loads without moving the bias.
    before = layer.expert_bias.clone()
    layer(x)
    update_expert_biases([layer], applied=torch.tensor(False))
    assert torch.equal(layer.expert_bias, before) and layer.expert_load_accum.sum() == 0


def test_expert_receiving_no_tokens_is_fine():
    layer = make_layer(settings(topk=1))
    with torch.no_grad():
        layer.router_weight.zero_()
        layer.router_weight[3, 0] = 10.0
    x = torch.randn(4, 2, H)
    x[..., 0] = 1.0  # every token picks expert 3 only
    out, _ = layer(x)
    gu, dn = layer.experts.gate_up[3], layer.experts.down[3]
    xt = x.reshape(-1, H)
    ref = F.linear(F.silu(F.linear(xt, gu[:FF])) * F.linear(xt, gu[FF:]), dn)
    torch.testing.assert_close(out.reshape(-1, H), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.experts.gate_up.grad[[0, 1, 2, 4, 5, 6, 7]].abs().sum() == 0
