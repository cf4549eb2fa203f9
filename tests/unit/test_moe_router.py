"""MoE routing (r1mega/moe/router.py) against a per-token loop written from the papers' definitions,
and against transformers' DeepSeek-V3 / Qwen3-MoE routers on the same logits."""
import math

import pytest
import torch

from r1mega.moe import router


def _naive_softmax_topk(logits, k, renormalize):
    out_w, out_i = [], []
    for row in logits.double().tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        probs = [v / s for v in e]
        chosen = sorted(range(len(row)), key=lambda i: -probs[i])[:k]
        w = [probs[i] for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        out_w.append(w)
        out_i.append(chosen)
    return torch.tensor(out_w, dtype=torch.float64), torch.tensor(out_i)


def _naive_group_topk(logits, k, n_group, topk_group, bias, renormalize, scale):
    num_experts = logits.shape[1]
    per = num_experts // n_group
    out_w, out_i = [], []
    for row in logits.double().tolist():
        s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        b = [si + bi for si, bi in zip(s, bias.double().tolist())]
        gscore = []
        for g in range(n_group):
            members = sorted(b[g * per:(g + 1) * per], reverse=True)
            gscore.append(sum(members[:2]))
        groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        eligible = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = sorted(eligible, key=lambda e: -b[e])[:k]
        w = [s[e] for e in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        out_w.append([v * scale for v in w])
        out_i.append(chosen)
    return torch.tensor(out_w, dtype=torch.float64), torch.tensor(out_i)


def _sorted_by_index(w, i):
    order = i.argsort(dim=-1)
    return w.gather(1, order), i.gather(1, order)


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_matches_naive(renormalize):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 12, generator=g) * 2
    w, i = router.softmax_topk(logits, 4, renormalize)
    rw, ri = _naive_softmax_topk(logits, 4, renormalize)
    assert w.dtype == torch.float32
    assert torch.equal(i, ri)  # topk is sorted descending, as is the naive order
    torch.testing.assert_close(w.double(), rw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_group,topk_group,k", [(4, 2, 4), (8, 3, 6), (1, 1, 3), (16, 4, 4)])
def test_group_limited_topk_matches_naive(n_group, topk_group, k):
    g = torch.Generator().manual_seed(n_group * 10 + k)
    logits = torch.randn(29, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.3
    w, i = router.group_limited_topk(logits, k, n_group, topk_group, bias=bias, routed_scaling_factor=2.5)
    rw, ri = _naive_group_topk(logits, k, n_group, topk_group, bias, True, 2.5)
    w, i = _sorted_by_index(w, i)
    rw, ri = _sorted_by_index(rw, ri)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w.double(), rw, rtol=1e-6, atol=1e-7)


def test_bias_changes_selection_but_not_weight_source():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 8, generator=g)
    bias = torch.zeros(8)
    bias[0] = 10.0  # expert 0 always chosen, yet its weight is its own unbiased sigmoid score
    w, i = router.group_limited_topk(logits, 2, 1, 1, bias=bias, renormalize=False)
    assert bool((i == 0).any(dim=1).all())
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, i))


def test_matches_transformers_deepseek_v3_and_qwen3_moe_routers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(23, 32, generator=g)
    cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 32, generator=g) * 0.3)
        hf.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.1)
        _, hw, hi = hf(hidden)
    logits = router.router_logits(hidden, hf.weight)
    w, i = router.group_limited_topk(logits, 4, 4, 2, bias=hf.e_score_correction_bias, renormalize=True,
                                     routed_scaling_factor=2.5)
    w, i = _sorted_by_index(w, i)
    hw, hi = _sorted_by_index(hw, hi)
    assert torch.equal(i, hi)
    torch.testing.assert_close(w, hw)

    qcfg = transformers.Qwen3MoeConfig(hidden_size=32, num_experts=12, num_experts_per_tok=3, norm_topk_prob=True)
    qhf = Qwen3MoeTopKRouter(qcfg)
    with torch.no_grad():
        qhf.weight.copy_(torch.randn(12, 32, generator=g) * 0.3)
        _, qw, qi = qhf(hidden)
    w, i = router.softmax_topk(router.router_logits(hidden, qhf.weight), 3, renormalize=True)
    assert torch.equal(i, qi)
    torch.testing.assert_close(w, qw)


def test_bias_update_moves_load_toward_balance():
    g = torch.Generator().manual_seed(5)
    num_experts, k = 16, 2
    skew = torch.linspace(-1.5, 1.5, num_experts)  # later experts strongly preferred
    logits = torch.randn(2048, num_experts, generator=g) + skew
    bias = torch.zeros(num_experts)

    def imbalance(b):
        _, i = router.group_limited_topk(logits, k, 4, 2, bias=b)
        load = router.expert_load(i, num_experts)
        return float(load.max() / load.mean()), load

    start, _ = imbalance(bias)
    for _ in range(300):
        _, load = imbalance(bias)
        bias = router.update_expert_bias(bias, load, rate=0.01)
    end, _ = imbalance(bias)
    assert start > 2.0 and end < 1.25, (start, end)


def test_update_expert_bias_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    torch.testing.assert_close(router.update_expert_bias(bias, load, 0.1), torch.tensor([-0.1, 0.6, -0.4, 0.1]))
    with pytest.raises(ValueError, match="bias"):
        router.update_expert_bias(bias, load[:3], 0.1)


def test_sequence_aux_loss_matches_naive_and_is_one_when_balanced():
    g = torch.Generator().manual_seed(6)
    batch, seq, num_experts, k = 3, 10, 6, 2
    logits = torch.randn(batch, seq, num_experts, generator=g)
    probs = router.normalized_sigmoid_scores(logits)
    idx = logits.topk(k, dim=-1).indices
    mask = torch.ones(batch, seq)
    mask[1, 7:] = 0
    total = 0.0
    for b in range(batch):
        valid = [t for t in range(seq) if mask[b, t] > 0]
        loss = 0.0
        for e in range(num_experts):
            cnt = sum(int(e in idx[b, t].tolist()) for t in valid)
            f = num_experts / (k * len(valid)) * cnt
            p = sum(float(probs[b, t, e]) for t in valid) / len(valid)
            loss += f * p
        total += loss
    got = router.sequence_aux_loss(probs, idx, k, token_mask=mask)
    assert abs(float(got) - total / batch) < 1e-5
    # perfectly balanced routing with uniform affinities gives exactly 1
    uniform = torch.full((1, 6, 6), 1 / 6)
    balanced = torch.tensor([[[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5]]])
    assert abs(float(router.sequence_aux_loss(uniform, balanced, 2)) - 1.0) < 1e-6


def test_z_loss_and_gradients_flow_to_router():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 5, generator=g, requires_grad=True)
    ref = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 9
    z = router.z_loss(logits)
    assert abs(float(z.detach()) - ref) < 1e-5
    w, _ = router.group_limited_topk(logits, 2, 1, 1)
    (w.sum() + z).backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


def test_bad_arguments_name_the_fix():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="n_group=3 must divide"):
        router.group_limited_topk(logits, 2, 3, 1)
    with pytest.raises(ValueError, match="raise topk_group"):
        router.group_limited_topk(logits, 5, 4, 2)
    with pytest.raises(ValueError, match="k=9"):
        router.softmax_topk(logits, 9, True)


def test_router_logits_keep_bf16_activations_and_match_the_float32_autograd():
    """bf16 hidden states: the float32 logits and both gradients equal plain autograd over
    linear(hidden.float(), w) exactly, while the graph keeps the bf16 input, not a float32 copy."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(13, 24, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(6, 24, generator=g, dtype=torch.float32).requires_grad_()
    grad = torch.randn(13, 6, generator=g)

    logits = router.router_logits(hidden, weight)
    assert logits.dtype == torch.float32
    saved = [t for t in logits.grad_fn.saved_tensors]
    assert {t.dtype for t in saved} == {torch.bfloat16, torch.float32}
    assert all(t.numel() != hidden.numel() or t.dtype == torch.bfloat16 for t in saved)
    gh, gw = torch.autograd.grad(logits, (hidden, weight), grad)

    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(h2.float(), w2)
    rh, rw = torch.autograd.grad(ref, (h2, w2), grad)
    assert torch.equal(logits, ref)
    assert gh.dtype == torch.bfloat16 and torch.equal(gh, rh)
    assert gw.dtype == torch.float32 and torch.equal(gw, rw)


def test_expert_load_counts_every_slot_including_idle_experts():
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, 6, (50, 3), generator=g)
    idx[idx == 4] = 5  # expert 4 receives nothing
    want = [sum(int(v) == e for v in idx.reshape(-1)) for e in range(7)]
    load = router.expert_load(idx, 7)
    assert load.dtype == torch.float32 and load.tolist() == [float(w) for w in want]
    assert load[4] == 0 and load[6] == 0 and load.sum() == idx.numel()
