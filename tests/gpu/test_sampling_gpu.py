"""The fused Triton sampler (r1mega.rollout.triton_sampling) against the PyTorch reference of
``sample`` on GPU: tokens, log-probs, determinism, CUDA-graph capture (skipped without CUDA).

The reference is run eagerly: its torch.compile'd noise (the default on GPU) goes through
inductor's ``tl_math.log``, which need not be bit-identical to eager ``torch.log``; the kernel
uses libdevice ``logf``, the routine behind eager ``torch.log``, and IEEE division like eager.
"""
from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from r1mega.rollout import sampling as S  # noqa: E402
from r1mega.rollout import triton_sampling as T  # noqa: E402

if not T.HAVE_TRITON:
    pytest.skip("needs triton", allow_module_level=True)

LP_TOL = 1e-5
TEMPS = [1.0, 0.0, 0.7, 1.3, -1.0, 1.0, 0.5, 2.0, 1.0, 0.9]


@pytest.fixture(autouse=True)
def eager_reference(monkeypatch):
    monkeypatch.setitem(S._COMPILED, "fn", S.noisy_scores)


def _inputs(B, V, true_vocab, dtype, seed, temps=TEMPS):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = 0.5 + 2.5 * torch.rand(B, 1, device="cuda", generator=g)
    logits = torch.randn(B, V, device="cuda", generator=g) * scale
    if B >= 7:  # LM-like peaked rows: most tiles are far below the top and skip the noise
        logits[2::5] += 12.0 * (torch.rand(len(range(2, B, 5)), V, device="cuda", generator=g) > 0.999)
        logits[3::5, :64] += 15.0
    logits = logits.to(dtype)
    temperature = torch.tensor([temps[i % len(temps)] for i in range(B)], device="cuda")
    seq = torch.tensor([S.sequence_key(seed, i) for i in range(B)], device="cuda")
    keys = S.step_keys(seq, torch.full((B,), 17, device="cuda"))
    return logits, temperature, keys


def _batch(temperature, keys, want_t1, any_greedy=None):
    B = temperature.numel()
    if any_greedy is None:  # a host sync: not inside a capture
        any_greedy = bool((temperature <= 0).any())
    return S.SamplingBatch(temperature=temperature, top_k=torch.zeros(B, dtype=torch.int64, device="cuda"),
                           top_p=torch.ones(B, device="cuda"), keys=keys,
                           any_greedy=any_greedy, want_logprobs_t1=want_t1)


def _reference(monkeypatch, logits, sb, shard, vh):
    with monkeypatch.context() as m:
        m.setenv("R1MEGA_TRITON_SAMPLING", "0")
        return S.sample(logits, sb, shard, vh)


def _reference_scores(logits, temperature, keys, vh, shard):
    """The reference's (B, V) scores z + g, as sample() computes them (eagerly)."""
    raw = logits.float().masked_fill(
        torch.arange(shard.start, shard.start + shard.size, device="cuda")[None, :] >= shard.true_vocab,
        float("-inf"))
    greedy = temperature <= 0
    z = raw / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    return S.noisy_scores(z, keys, vh, greedy)


def _assert_tokens(got, ref, scores):
    """Tokens must match. Scores are computed bit-identically (same hash, IEEE division, the same
    libdevice logf as torch.log), so a mismatch can only come from a last-ulp difference in a log,
    which can flip only a near-tie: allow that for at most 0.1% of rows and verify it is one."""
    bad = (got != ref).nonzero().flatten()
    assert len(bad) <= max(0, int(0.001 * len(ref))), f"{len(bad)} of {len(ref)} tokens differ"
    for r in bad.tolist():
        a, b = scores[r, ref[r]].item(), scores[r, got[r]].item()
        assert abs(a - b) <= 4 * torch.finfo(torch.float32).eps * max(abs(a), 1.0), (r, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 7, 64, 256])
@pytest.mark.parametrize("V,true_vocab", [(1000, 1000), (32000, 32000), (49280, 49155),
                                          (152064, 151665), (32003, 32001)])
def test_fused_matches_reference(monkeypatch, dtype, B, V, true_vocab):
    logits, temperature, keys = _inputs(B, V, true_vocab, dtype, seed=B * 7 + V)
    shard = S.VocabShard(0, V, true_vocab)
    vh = S.hashed_vocab_ids(0, V, "cuda")
    for want_t1 in (False, True):
        sb = _batch(temperature, keys, want_t1)
        ref = _reference(monkeypatch, logits, sb, shard, vh)
        got = S.sample(logits, sb, shard, vh)
        _assert_tokens(got[0], ref[0], _reference_scores(logits, temperature, keys, vh, shard))
        assert int(got[0].max()) < true_vocab
        # The logits reach both in float32 exactly (a bf16 upcast is exact), so the log-prob
        # error is only the log-sum-exp's (summation order, tl.exp): the same bound for bf16.
        same = got[0] == ref[0]
        torch.testing.assert_close(got[1][same], ref[1][same], atol=LP_TOL, rtol=0)
        assert (got[2] is None) == (not want_t1)
        if want_t1:
            torch.testing.assert_close(got[2][same], ref[2][same], atol=LP_TOL, rtol=0)


def test_simulated_vocab_parallel_combine():
    """Two halves of the vocabulary (the second all padding past true_vocab) combined with the
    formulas of sampling._sample_fused reproduce the unsharded draw and log-probs."""
    B, V, true_vocab = 64, 4096, 1900
    logits, temperature, keys = _inputs(B, V, true_vocab, torch.bfloat16, seed=5)
    full = T.fused_sample(logits, temperature, keys, S.hashed_vocab_ids(0, V, "cuda"), 0, true_vocab, True)
    for split in (V // 2, 1024):
        parts = [T.fused_sample(logits[:, a:b].contiguous(), temperature, keys,
                                S.hashed_vocab_ids(a, b - a, "cuda"), a, true_vocab, True)
                 for a, b in ((0, split), (split, V))]
        best = torch.maximum(parts[0].best, parts[1].best)
        tokens = torch.minimum(*[torch.where(p.best == best, p.tokens, torch.iinfo(torch.int64).max) for p in parts])
        assert torch.equal(tokens, full.tokens)
        for m, s, v, ref in (("m_z", "s_z", "z_tok", full.logprobs), ("m_raw", "s_raw", "raw_tok", full.logprobs_t1)):
            mm = torch.maximum(getattr(parts[0], m), getattr(parts[1], m))
            ss = sum(getattr(p, s) * torch.exp(getattr(p, m) - mm) for p in parts)
            val = sum(torch.where(p.tokens == tokens, getattr(p, v), torch.zeros_like(best)) for p in parts)
            torch.testing.assert_close(val - (mm + torch.log(ss)), ref, atol=LP_TOL, rtol=0)


def test_same_keys_same_draws():
    logits, temperature, keys = _inputs(64, 32000, 32000, torch.bfloat16, seed=3)
    shard, vh = S.VocabShard(0, 32000, 32000), S.hashed_vocab_ids(0, 32000, "cuda")
    a = S.sample(logits, _batch(temperature, keys, True), shard, vh)
    b = S.sample(logits.clone(), _batch(temperature.clone(), keys.clone(), True), shard, vh)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    other = S.step_keys(keys, torch.ones_like(keys))
    c = S.sample(logits, _batch(temperature, other, True), shard, vh)
    assert not torch.equal(a[0], c[0])  # the keys do drive the draw


def test_graph_capture_replays_like_eager():
    B, V = 48, 49152
    shard, vh = S.VocabShard(0, V, V - 7), S.hashed_vocab_ids(0, V, "cuda")
    logits, temperature, keys = _inputs(B, V, V - 7, torch.bfloat16, seed=11)
    static_l, static_t, static_k = logits.clone(), temperature.clone(), keys.clone()

    def step():
        return S.sample(static_l, _batch(static_t, static_k, True, any_greedy=True), shard, vh)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (12, 13):
        logits, temperature, keys = _inputs(B, V, V - 7, torch.bfloat16, seed=seed)
        static_l.copy_(logits)
        static_t.copy_(temperature.flip(0))
        static_k.copy_(keys)
        graph.replay()
        eager = S.sample(logits, _batch(temperature.flip(0), keys, True), shard, vh)
        for x, y in zip(out, eager):
            assert torch.equal(x, y)


def test_dispatch_and_switch(monkeypatch):
    calls = []
    real = T.fused_sample
    monkeypatch.setattr(T, "fused_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, temperature, keys = _inputs(8, 1000, 1000, torch.float32, seed=1)
    shard, vh = S.VocabShard(0, 1000, 1000), S.hashed_vocab_ids(0, 1000, "cuda")
    S.sample(logits, _batch(temperature, keys, False), shard, vh)
    assert len(calls) == 1
    sb = _batch(temperature, keys, False)
    sb.top_k_max, sb.top_k = 5, torch.full_like(sb.top_k, 5)
    S.sample(logits, sb, shard, vh)  # top-k: the PyTorch path
    assert len(calls) == 1
    monkeypatch.setenv("R1MEGA_TRITON_SAMPLING", "0")
    S.sample(logits, _batch(temperature, keys, False), shard, vh)
    assert len(calls) == 1


def _graph_time(fn, iters=50):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def test_fused_is_faster_than_reference(monkeypatch):
    """Not a benchmark: catches a fast path that is not one. Run with -s for the timings."""
    B, V = 256, 32000
    logits, temperature, keys = _inputs(B, V, V, torch.bfloat16, seed=2, temps=[1.0])
    shard, vh = S.VocabShard(0, V, V), S.hashed_vocab_ids(0, V, "cuda")
    sb = _batch(temperature, keys, False)
    fused = _graph_time(lambda: S.sample(logits, sb, shard, vh))
    monkeypatch.setenv("R1MEGA_TRITON_SAMPLING", "0")
    monkeypatch.delitem(S._COMPILED, "fn")  # the reference as it runs in the engine: compiled
    ref = _graph_time(lambda: S.sample(logits, sb, shard, vh))
    print(f"\nsample() {B}x{V} bf16 in a CUDA graph: fused {fused * 1e6:.1f} us, reference {ref * 1e6:.1f} us")
    assert fused < ref


@pytest.mark.parametrize("B,V,true_vocab", [(7, 1000, 1000), (256, 32000, 32000), (64, 49280, 49155)])
def test_exact_mode_draws_the_reference_tokens_and_reports_the_trainers_logprobs(monkeypatch, B, V,
                                                                                  true_vocab):
    """rollout.exact takes its tokens from the fused kernel: the reference's draws, and log-probs
    bit-identical to what the trainer recomputes for those tokens (exact_token_logprobs)."""
    from r1mega.ops.batch_invariant import exact_numerics
    from r1mega.ops.exact_logprobs import exact_token_logprobs

    logits, temperature, keys = _inputs(B, V, true_vocab, torch.bfloat16, seed=3 * B + V)
    shard, vh = S.VocabShard(0, V, true_vocab), S.hashed_vocab_ids(0, V, "cuda")
    sb = _batch(temperature, keys, want_t1=True)
    ref = _reference(monkeypatch, logits, sb, shard, vh)
    with exact_numerics():
        got = S.sample(logits, sb, shard, vh)
    _assert_tokens(got[0], ref[0], _reference_scores(logits, temperature, keys, vh, shard))
    assert torch.equal(got[1], exact_token_logprobs(logits, got[0], temperature, valid_cols=true_vocab))
    assert torch.equal(got[2], exact_token_logprobs(logits, got[0], torch.ones_like(temperature),
                                                    valid_cols=true_vocab))
