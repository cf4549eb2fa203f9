"""LM head + log-probs / GRPO loss from hidden states, chunked, vs plain matmul + log_softmax."""
import pytest
import torch

from r1mega.config import GRPOConfig
from r1mega.ops.grpo_loss import grpo_loss, grpo_loss_from_hidden, last_kernel
from r1mega.ops.linear_logprobs import linear_vocab_parallel_logprobs
from r1mega.ops.logprobs import reference_logprobs


def _inputs(seed, n_tok=23, hidden=12, vocab=37, padded=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tok, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(padded, hidden, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, vocab, (n_tok,), generator=g)
    return h, w, t, g


@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_logprobs_values_and_grads(chunk):
    h, w, t, g = _inputs(0)
    g_lp, g_h = torch.randn(23, generator=g, dtype=torch.float64), torch.randn(23, generator=g, dtype=torch.float64)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logp, ent = linear_vocab_parallel_logprobs(h1, w1, t, vocab_size=37, temperature=0.8, with_entropy=True,
                                               chunk_tokens=chunk)
    (logp * g_lp + ent * g_h).sum().backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref_lp, ref_h = reference_logprobs(h2 @ w2.t(), t, vocab_size=37, temperature=0.8)
    (ref_lp * g_lp + ref_h * g_h).sum().backward()
    assert torch.allclose(logp, ref_lp, atol=1e-12) and torch.allclose(ent, ref_h, atol=1e-12)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-12)
    assert (w1.grad[37:] == 0).all()  # padded vocabulary rows of the LM head get no gradient


def test_frozen_weight_and_gradcheck():
    h, w, t, _ = _inputs(1, n_tok=5, hidden=4, vocab=6, padded=7)
    hr = h.clone().requires_grad_(True)
    logp, _ = linear_vocab_parallel_logprobs(hr, w, t, vocab_size=6, chunk_tokens=2)
    logp.sum().backward()
    assert hr.grad is not None and w.grad is None

    def f(hh, ww):
        lp, en = linear_vocab_parallel_logprobs(hh, ww, t, vocab_size=6, temperature=1.4, with_entropy=True,
                                                chunk_tokens=2)
        return lp, en

    assert torch.autograd.gradcheck(f, (h.clone().requires_grad_(True), w.clone().requires_grad_(True)),
                                    eps=1e-6, atol=1e-7)


def test_grpo_loss_from_hidden_equals_logits_path():
    h, w, t, g = _inputs(2)
    old = -torch.rand(23, generator=g, dtype=torch.float64) * 3 - 2
    adv = torch.randn(23, generator=g, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(23, generator=g, dtype=torch.float64)
    mask = (torch.rand(23, generator=g) > 0.3).double()
    seq_ids = torch.arange(23) // 6
    cfg = GRPOConfig(kl_beta=0.05, dual_clip=3.0, loss_agg="seq_mean_token_mean")
    kw = dict(cfg=cfg, vocab_size=37, temperature=0.9, ref_logp=ref, seq_ids=seq_ids, normalizer=4.0)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss1, m1 = grpo_loss_from_hidden(h1, w1, t, adv, old, mask, chunk_tokens=4, **kw)
    loss1.backward()
    assert last_kernel() == "linear_chunked"
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss2, m2 = grpo_loss(h2 @ w2.t(), t, adv, old, mask, **kw)
    loss2.backward()
    assert loss1.item() == pytest.approx(loss2.item(), abs=1e-12)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-12) and torch.allclose(w1.grad, w2.grad, atol=1e-12)
    for key in m1:
        assert float(m1[key]) == pytest.approx(float(m2[key]), abs=1e-9), key


def test_shape_errors_are_named():
    h, w, t, _ = _inputs(3)
    with pytest.raises(ValueError, match="weight_shard"):
        linear_vocab_parallel_logprobs(h, w[:, :5], t, vocab_size=37)
    with pytest.raises(ValueError, match="vocab_size=41"):
        linear_vocab_parallel_logprobs(h, w, t, vocab_size=41)
