"""vocab_parallel_logprobs (token-chunked PyTorch path) against plain log_softmax and hand values."""
import math

import pytest
import torch
import torch.nn.functional as F

from r1mega.ops import logprobs as lp_mod
from r1mega.ops.logprobs import (combine_stats, reference_logprobs, torch_shard_stats,
                                 vocab_parallel_logprobs)


def test_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])  # column 2 is vocabulary padding
    logp, ent = vocab_parallel_logprobs(logits, torch.tensor([1]), vocab_size=2, with_entropy=True)
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    # temperature 2 halves the logits: p = softmax([0, ln(3)/2]) = [1, sqrt 3] / (1 + sqrt 3)
    logp_t, _ = vocab_parallel_logprobs(logits, torch.tensor([0]), vocab_size=2, temperature=2.0)
    assert logp_t.item() == pytest.approx(-math.log(1 + math.sqrt(3)), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_grads_match_reference(dtype, temperature):
    torch.manual_seed(1)
    n_tok, vocab, padded = 53, 97, 104
    base = torch.randn(n_tok, padded, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (n_tok,))
    g_lp, g_h = torch.randn(n_tok, dtype=torch.float64), torch.randn(n_tok, dtype=torch.float64)

    x = base.to(dtype).requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, targets, vocab_size=vocab, temperature=temperature,
                                        with_entropy=True, impl="torch")
    (logp.double() * g_lp + ent.double() * g_h).sum().backward()

    ref_x = base.to(dtype).double().requires_grad_(True)  # the same rounded inputs, exact math
    ref_lp, ref_h = reference_logprobs(ref_x, targets, vocab_size=vocab, temperature=temperature)
    (ref_lp * g_lp + ref_h * g_h).sum().backward()

    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(logp.double(), ref_lp, atol=tol, rtol=0)
    assert torch.allclose(ent.double(), ref_h, atol=tol * 10, rtol=0)
    gtol = 1e-10 if dtype == torch.float64 else (2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.allclose(x.grad.double(), ref_x.grad, atol=gtol, rtol=gtol)
    assert (x.grad[:, vocab:] == 0).all()  # padded columns get no gradient


def test_gradcheck_float64():
    torch.manual_seed(2)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 7, 3, 3, 1])

    def f(inp):
        logp, ent = vocab_parallel_logprobs(inp, targets, vocab_size=8, temperature=0.7,
                                            with_entropy=True, impl="torch")
        return logp, ent

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_chunking_does_not_change_results(monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(41, 64, requires_grad=True)
    t = torch.randint(0, 60, (41,))
    logp_a, _ = vocab_parallel_logprobs(x, t, vocab_size=60)
    (ga,) = torch.autograd.grad(logp_a.sum(), x)
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_BYTES", 4 * 64 * 3)  # 3 tokens per chunk
    logp_b, _ = vocab_parallel_logprobs(x, t, vocab_size=60)
    (gb,) = torch.autograd.grad(logp_b.sum(), x)
    assert torch.allclose(logp_a, logp_b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-7)


def test_inplace_backward_writes_into_logits():
    torch.manual_seed(4)
    base = torch.randn(7, 16)
    t = torch.randint(0, 16, (7,))
    x1 = base.clone().requires_grad_(True)
    logp, _ = vocab_parallel_logprobs(x1, t, vocab_size=16)
    logp.sum().backward()
    leaf = base.clone().requires_grad_(True)
    buf = leaf * 1.0  # a non-leaf buffer the caller gives up
    logp2, _ = vocab_parallel_logprobs(buf, t, vocab_size=16, inplace_backward=True)
    logp2.sum().backward()
    assert torch.allclose(leaf.grad, x1.grad, atol=1e-6)
    assert torch.allclose(buf.detach(), x1.grad, atol=1e-6)  # the logits buffer now holds the gradient


def test_sft_cross_entropy_is_minus_logp():
    torch.manual_seed(5)
    x = torch.randn(12, 30)
    t = torch.randint(0, 30, (12,))
    logp, _ = vocab_parallel_logprobs(x, t, vocab_size=30)
    assert torch.allclose(-logp.mean(), F.cross_entropy(x, t), atol=1e-6)


def test_shard_statistics_combine_like_full_vocab():
    """Two column shards reduced separately and combined == one shard (what TP does per rank)."""
    torch.manual_seed(6)
    x = torch.randn(9, 20, dtype=torch.float64)
    t = torch.randint(0, 18, (9,))
    full = combine_stats(torch_shard_stats(x, t, 0, 18, 1.0)[None])
    parts = torch.stack([torch_shard_stats(x[:, :10], t, 0, 10, 1.0), torch_shard_stats(x[:, 10:], t, 10, 8, 1.0)])
    split = combine_stats(parts)
    for a, b in zip(full, split):
        assert torch.allclose(a, b, atol=1e-12)
    # a shard made entirely of padding weighs nothing instead of producing NaN
    empty = torch_shard_stats(x[:, :5], t, 20, 0, 1.0)
    assert torch.isfinite(combine_stats(torch.stack([parts[0], parts[1], empty]))[0]).all()


def test_bad_inputs_are_named():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="targets hold ids outside"):
        vocab_parallel_logprobs(x, torch.tensor([0, 8, 1]), vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size=9"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1, 2]), vocab_size=9)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1]), vocab_size=8)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1, 2]), vocab_size=8, temperature=0.0)
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1, 2]), vocab_size=8, impl="cuda")
