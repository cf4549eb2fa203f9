"""The batch-invariant ops of rollout.exact (CPU): each agrees with torch's own op to float32
rounding, and a row's result does not depend on the other rows, their number, or its position."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from r1mega.models.attention import sdpa_packed
from r1mega.ops import batch_invariant as bi
from r1mega.ops.exact_attention import exact_cache_attention, exact_packed_attention
from r1mega.ops.exact_logprobs import exact_token_logprobs


def test_cpu_mm_is_not_batch_invariant_but_bi_mm_is():
    torch.manual_seed(0)
    w = torch.randn(192, 512)
    x = torch.randn(70, 512)
    full = bi.bi_mm(x, w.t())
    for m in (1, 3, 8, 17, 64):
        assert torch.equal(bi.bi_mm(x[:m], w.t()), full[:m]), m
        # the same row alone, in another batch of random rows, at another position
        other = torch.cat([torch.randn(m, 512), x[:1]])
        assert torch.equal(bi.bi_mm(other, w.t())[-1], full[0]), m
    torch.testing.assert_close(full, x @ w.t(), rtol=1e-5, atol=1e-5)
    # Why the blocked path exists (informative, not a requirement on torch):
    native_varies = any(not torch.equal(x[:m] @ w.t(), (x @ w.t())[:m]) for m in (1, 3, 8))
    print(f"torch CPU mm varies with M here: {native_varies}")


def test_tree_reductions():
    torch.manual_seed(1)
    x = torch.randn(5, 1000)
    torch.testing.assert_close(bi.tree_sum(x), x.sum(-1), rtol=1e-5, atol=1e-4)
    assert torch.equal(bi.tree_max(x), x.amax(-1))
    assert torch.equal(bi.tree_sum(x)[2], bi.tree_sum(x[2:3])[0])
    assert torch.equal(bi.tree_sum(x.t(), 0), bi.tree_sum(x))
    assert bi.tree_max(torch.full((1, 3), float("-inf")))[0] == float("-inf")


@pytest.mark.parametrize("name,lo,hi", [("exp", -100.0, 88.0), ("log", 1e-30, 1e30),
                                        ("cos", -5000.0, 5000.0), ("sin", -5000.0, 5000.0),
                                        ("silu", -80.0, 80.0)])
def test_transcendentals_match_torch_and_ignore_position(name, lo, hi):
    torch.manual_seed(2)
    det = getattr(bi, f"det_{name}")
    ref = {"exp": torch.exp, "log": torch.log, "cos": torch.cos, "sin": torch.sin,
           "silu": F.silu}[name]
    u = torch.rand(100_003, dtype=torch.float64)
    x64 = (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp() if name == "log" else lo + u * (hi - lo)
    x = x64.float()
    got = det(x)
    want = ref(x.double())  # float64 truth of the float32 inputs
    err = ((got.double() - want).abs() / want.abs().clamp(min=1e-30))
    if name in ("cos", "sin", "silu"):  # near zeros compare absolutely
        err = torch.minimum(err, (got.double() - want).abs())
    assert float(err.max()) < 2.5e-7, float(err.max())  # about 2 float32 ulps
    # The same element alone, and at the scalar tail of an odd-sized tensor, gives the same bits.
    for i in (0, 7, 100_002):
        assert torch.equal(det(x[i:i + 1]), got[i:i + 1])
    assert torch.equal(det(x[:13]), got[:13])


def test_transcendental_special_values():
    inf, nan = float("inf"), float("nan")
    e = bi.det_exp(torch.tensor([-inf, 0.0, inf, -200.0, 100.0]))
    assert e.tolist() == [0.0, 1.0, inf, 0.0, inf]
    lg = bi.det_log(torch.tensor([0.0, 1.0, inf, -1.0]))
    assert lg[:3].tolist() == [-inf, 0.0, inf] and math.isnan(lg[3])
    assert bi.det_cos(torch.tensor([0.0])).item() == 1.0
    assert bi.det_sin(torch.tensor([0.0])).item() == 0.0


def test_rows_ops_match_torch():
    torch.manual_seed(3)
    x = torch.randn(9, 64)
    w = torch.rand(64) + 0.5
    torch.testing.assert_close(bi.bi_rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5))
    torch.testing.assert_close(bi.bi_log_softmax(x), torch.log_softmax(x, -1))
    torch.testing.assert_close(bi.bi_softmax(x), torch.softmax(x, -1))
    assert torch.equal(bi.bi_rms_norm(x[4:5], w, 1e-5)[0], bi.bi_rms_norm(x, w, 1e-5)[4])


def test_mode_routes_and_keeps_native_gradients():
    torch.manual_seed(4)
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    with bi.exact_numerics():
        assert bi.exact_active()
        y = F.linear(x, w)
        assert torch.equal(y.detach(), bi.bi_mm(x.detach(), w.detach().t()))
        with pytest.raises(RuntimeError, match="not routed"):
            F.scaled_dot_product_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                                           torch.randn(1, 1, 2, 4))
        z = F.silu(y).pow(2).sum()
    assert not bi.exact_active()
    z.backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.silu(F.linear(x2, w2)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_exact_attention_matches_sdpa_and_is_batch_invariant():
    torch.manual_seed(5)
    lengths = [5, 19, 1, 33]
    t, hq, hkv, d = sum(lengths), 4, 2, 16
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    scale = 1 / math.sqrt(d)
    out = exact_packed_attention(q, k, v, lengths, scale)
    torch.testing.assert_close(out, sdpa_packed(q, k, v, lengths, scale), rtol=1e-5, atol=1e-5)
    # Sequence 3 alone, and with the others reordered around it: the same bits.
    s3 = slice(25, 58)
    alone = exact_packed_attention(q[s3], k[s3], v[s3], [33], scale)
    assert torch.equal(alone, out[s3])
    order = [3, 0, 2, 1]
    starts = [0, 5, 24, 25]
    idx = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in order])
    again = exact_packed_attention(q[idx], k[idx], v[idx], [lengths[i] for i in order], scale)
    assert torch.equal(again[:33], out[s3])
    # The cache path: sequence 3 decoded at its last position from a paged cache whose unused
    # slots hold NaN gives the packed result's last row.
    bs = 4
    cache_k = torch.full((12, bs, hkv, d), float("nan"))
    cache_v = torch.full((12, bs, hkv, d), float("nan"))
    blocks = torch.tensor([7, 2, 9, 0, 5, 11, 3, 8, 1])  # 9 blocks >= 33 tokens
    slots = (blocks[:, None] * bs + torch.arange(bs)).reshape(1, -1)  # (1, 36)
    cache_k.view(-1, hkv, d)[slots[0, :33]] = k[s3]
    cache_v.view(-1, hkv, d)[slots[0, :33]] = v[s3]
    dec = exact_cache_attention(q[57:58], cache_k, cache_v, slots, torch.tensor([0]),
                                torch.tensor([32]), scale)
    assert torch.equal(dec[0], out[57])


def test_exact_logprobs_match_log_softmax_and_rows():
    torch.manual_seed(6)
    logits = torch.randn(7, 130) * 3
    tgt = torch.randint(0, 100, (7,))
    temp = torch.full((7,), 0.7)
    lp = exact_token_logprobs(logits, tgt, temp, valid_cols=100)
    ref = torch.log_softmax(logits[:, :100].double() / 0.7, -1).gather(1, tgt[:, None]).squeeze(1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(exact_token_logprobs(logits[3:4], tgt[3:4], temp[3:4], valid_cols=100)[0], lp[3])
