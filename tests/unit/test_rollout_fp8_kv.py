"""The FP8 KV cache (rollout.kv_cache_dtype=fp8) on CPU: quantised writes, the readers, the engine.

References are independent of the cache code: e4m3's rounding bound per element, exact float64
attention over the dequantised K/V, and the megatron model's own training forward (no cache),
with a hook that rounds K and V through e4m3 per (token, head) where the engine's cache would.
The Triton kernels under the interpreter: tests/unit/test_rollout_fp8_kv_kernels.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.config import ModelConfig, RolloutConfig
from r1mega.models.attention import make_packed_seqs
from r1mega.models.gpt import build_model
from r1mega.rollout.attention import AttentionBatch, attend_decode_gather, attend_gather, padded_query_index
from r1mega.rollout.kv_cache import (FP8_DTYPE, KVCacheShape, PagedKVCache, dequantize_rows,
                                     quantize_rows, slots_for)
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import GenerationRequest

VOCAB = 128


def _cache(layers, hkv, d, bs, blocks, dtype=FP8_DTYPE):
    c = PagedKVCache(KVCacheShape(layers, hkv, d, bs, dtype), torch.device("cpu"))
    c.allocate(blocks)
    return c


def test_write_then_read_back_within_e4m3_error():
    g = torch.Generator().manual_seed(0)
    hkv, d, bs = 3, 16, 4
    cache = _cache(2, hkv, d, bs, 10)
    # Rows of very different magnitudes (the per-row scale must follow each), one all-zero row.
    k = torch.randn(7, hkv, d, generator=g) * torch.logspace(-3, 3, 7)[:, None, None]
    v = torch.randn(7, hkv, d, generator=g) * 5
    k[2, 1] = 0.0
    slots = torch.tensor([3, 4, 9, 17, 30, 31, 12])
    before = [t.clone() for t in (*cache.k, *cache.v, *cache.k_scale, *cache.v_scale)]
    cache.write(1, slots, k, v)
    kc, vc, ks, vs = cache.layer(1)
    assert kc.dtype == vc.dtype == FP8_DTYPE and ks.shape == vs.shape == (10, bs, hkv)
    for x, c, s in ((k, kc, ks), (v, vc, vs)):
        rows8, sc = c.view(-1, hkv, d)[slots], s.view(-1, hkv)[slots]
        amax = x.abs().amax(-1)  # (T, Hkv)
        # One scale per token and head: the row's amax on e4m3's largest value (1 for a zero row).
        torch.testing.assert_close(sc, torch.where(amax > 0, amax / 448, torch.ones_like(amax)))
        back = dequantize_rows(rows8, sc, torch.float32)
        # Round to nearest with 3 mantissa bits: |error| <= 2^-4 of the element's own binade, so
        # <= 2^-4 of the row amax (subnormals: <= 2^-10 * scale, far below).
        assert ((back - x).abs() <= amax[..., None] * 2.0 ** -4 + 1e-30).all()
    assert (dequantize_rows(kc.view(-1, hkv, d)[slots[2]], ks.view(-1, hkv)[slots[2]], torch.float32)[1] == 0).all()
    # Layer 0 and every other slot of layer 1 untouched.
    after = (*cache.k, *cache.v, *cache.k_scale, *cache.v_scale)
    other = torch.ones(10 * bs, dtype=torch.bool)
    other[slots] = False
    for b, a in zip(before, after):
        flat_b, flat_a = b.view(10 * bs, -1), a.view(10 * bs, -1)
        if a.data_ptr() in (kc.data_ptr(), vc.data_ptr(), ks.data_ptr(), vs.data_ptr()):
            flat_b, flat_a = flat_b[other], flat_a[other]
        assert torch.equal(flat_b.view(torch.uint8) if b.dtype == FP8_DTYPE else flat_b,
                           flat_a.view(torch.uint8) if a.dtype == FP8_DTYPE else flat_a)


def test_quantize_rows_rounds_to_nearest_e4m3():
    """Against the e4m3 grid built by hand (not torch's cast): every dequantised element is the
    grid point nearest to x / scale."""
    grid = sorted({s * m * 2.0 ** (e - 7) for s in (-1, 1) for e in range(1, 16) for m in
                   [1 + i / 8 for i in range(8)]} | {s * i / 8 * 2.0 ** -6 for s in (-1, 1) for i in range(8)})
    grid = torch.tensor([x for x in grid if abs(x) <= 448], dtype=torch.float64)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    x8, s = quantize_rows(x)
    # The scale is amax / 448 correctly rounded to float32 (float64's quotient rounded once more
    # is: 53 >= 2 * 24 + 2 bits), as the Triton write's div_rn; tests/gpu checks it on CUDA.
    assert torch.equal(s, (x.double().abs().amax(-1) / 448).float())
    y = x.double() / s.double()[:, None]
    nearest = grid[(y[..., None] - grid).abs().argmin(-1)]
    dist_ok = (x8.double() - y).abs() <= (nearest - y).abs() + 1e-12
    assert dist_ok.all()


def _ragged_batch(cache, layout, g, dtype):
    """Sequences (cached prefix, new tokens) written through the cache's write; returns the
    AttentionBatch, q, and each sequence's full K/V as written (before quantisation)."""
    bs, hkv, d = cache.shape.block_tokens, cache.shape.kv_heads, cache.shape.head_dim
    hq = 2 * hkv
    tables, slots, qs, full = [], [], [], []
    for cached, new in layout:
        n = cached + new
        blocks = [cache.allocator.allocate() for _ in range(-(-n // bs))][::-1]
        tables.append(blocks)
        kk, vv = torch.randn(n, hkv, d, generator=g) * 2, torch.randn(n, hkv, d, generator=g)
        cache.write(0, torch.tensor(slots_for(blocks, 0, n, bs)), kk, vv)
        slots += slots_for(blocks, cached, n, bs)
        qs.append(torch.randn(new, hq, d, generator=g))
        full.append((kk, vv))
    q_lens, ctx = [n for _, n in layout], [c + n for c, n in layout]
    width = max(map(len, tables))
    batch = AttentionBatch(
        slots=torch.tensor(slots), positions=torch.zeros(len(slots), dtype=torch.int64), q_lens=q_lens,
        ctx_lens=torch.tensor(ctx, dtype=torch.int32), ctx_lens_host=ctx,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        block_tokens=bs, q_index=padded_query_index(q_lens, "cpu"),
    )
    return batch, torch.cat(qs).to(dtype), full


def _exact(q, k, v, q_pos, scale):
    """float64 causal attention of q (n, Hq, D) at positions q_pos over k/v (L, Hkv, D)."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(~(torch.arange(k.shape[0])[None, :] <= torch.tensor(q_pos)[:, None])[None], -math.inf)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_readers_against_attention_on_dequantised_kv(dtype):
    g = torch.Generator().manual_seed(2)
    hkv, d, bs = 2, 32, 4
    cache = _cache(1, hkv, d, bs, 40)
    layout = [(6, 3), (3, 1), (0, 4), (13, 1)]  # prefix + chunk, decode rows, a fresh prefill
    batch, q, full = _ragged_batch(cache, layout, g, dtype)
    scale = 1 / math.sqrt(d)
    ref_deq, ref_hi = [], []
    for (kk, vv), (c, n) in zip(full, layout):
        k8, ks = quantize_rows(kk)
        v8, vs = quantize_rows(vv)
        kd, vd = dequantize_rows(k8, ks, torch.float64), dequantize_rows(v8, vs, torch.float64)
        qq = q[sum(x for _, x in layout[:len(ref_deq)]):][:n]
        ref_deq.append(_exact(qq, kd, vd, list(range(c, c + n)), scale))
        ref_hi.append(_exact(qq, kk, vv, list(range(c, c + n)), scale))
    ref_deq, ref_hi = torch.cat(ref_deq), torch.cat(ref_hi)
    kc, vc, ks, vs = cache.layer(0)
    got = attend_gather(q, kc, vc, batch, scale, ks, vs).double()
    # Tight: the reader is exact attention on the dequantised rows, up to the compute dtype.
    tight = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref_deq, atol=tight, rtol=tight)
    # Loose: vs the unquantised K/V, e4m3's 2^-4 relative rounding shows (and nothing worse).
    err = (got - ref_hi).abs()
    assert err.max() < 0.15 and err.mean() < 0.03, (err.max(), err.mean())
    assert (got - ref_deq).abs().mean() < err.mean() / 3  # the FP8 error dominates, as it must
    # The device-tensor decode reader on the decode rows (1 new token each).
    rows = [i for i, (c, n) in enumerate(layout) if n == 1]
    starts = torch.tensor([0] + [n for _, n in layout]).cumsum(0)
    qd = q[[int(starts[i]) for i in rows]]
    out = attend_decode_gather(qd, kc, vc, batch.block_tables[rows], batch.ctx_lens[rows], scale, ks, vs)
    torch.testing.assert_close(out.double(), ref_deq[[int(starts[i]) for i in rows]], atol=tight, rtol=tight)


def test_copy_blocks_and_release_carry_the_scales():
    cache = _cache(2, 2, 8, 4, 12)
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        cache.write(i, torch.arange(48), torch.randn(48, 2, 8, generator=g), torch.randn(48, 2, 8, generator=g))
    pairs = [(1, 5), (1, 6), (2, 7)]
    want = [t.clone() for t in (*cache.k, *cache.v, *cache.k_scale, *cache.v_scale)]
    for t in want:
        for src, dst in pairs:
            t[dst] = t[src].clone()
    cache.copy_blocks(pairs)
    for got, ref in zip((*cache.k, *cache.v, *cache.k_scale, *cache.v_scale), want):
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    # The budget counts the scales: 2 tensors x 2 layers x 4 tokens x 2 heads x (8 B + 4 B).
    assert cache.shape.bytes_per_block == 2 * 2 * 4 * 2 * (8 + 4)
    bf16 = KVCacheShape(2, 2, 8, 4, torch.bfloat16).bytes_per_block
    assert bf16 == 2 * 2 * 4 * 2 * 16
    cache.release()
    assert cache.k == cache.v == cache.k_scale == cache.v_scale == [] and not cache.is_allocated


def test_custom_ops_with_scales():
    """Fake kernels and dispatch of the three ops with an FP8 cache. opcheck's schema test cannot
    run on float8 CPU tensors (it multiplies them, which CPU torch does not implement), so the
    declared mutations are read off the schemas instead."""
    from r1mega.rollout import triton_paged, triton_rope_kv  # noqa: F401  (registers the ops)

    cache = _cache(1, 2, 16, 4, 6)
    kc, vc, ks, vs = cache.layer(0)
    g = torch.Generator().manual_seed(4)
    slots = torch.tensor([1, 5, 9])
    k, v = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.r1mega.kv_cache_write_fp8.default, (kc, vc, slots, k, v, ks, vs),
                          test_utils=utils)
    qkv = torch.randn(3, 1, 2, 4 * 16, generator=g)
    cos, sin = torch.randn(3, 1, 1, 16, generator=g), torch.randn(3, 1, 1, 16, generator=g)
    torch.library.opcheck(torch.ops.r1mega.rope_kv_write_fp8.default, (qkv, cos, sin, slots, kc, vc, ks, vs),
                          test_utils=utils)
    bt = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
    ctx = torch.tensor([6, 2], dtype=torch.int32)
    q = torch.randn(2, 4, 16, generator=g)
    torch.library.opcheck(torch.ops.r1mega.paged_decode_attention.default, (q, kc, vc, bt, ctx, 0.25, ks, vs),
                          test_utils=utils)
    for op, mutated in ((torch.ops.r1mega.kv_cache_write_fp8, {"k_cache", "v_cache", "k_scale", "v_scale"}),
                        (torch.ops.r1mega.rope_kv_write_fp8, {"k_cache", "v_cache", "k_scale", "v_scale"}),
                        (torch.ops.r1mega.kv_cache_write, {"k_cache", "v_cache"}),
                        (torch.ops.r1mega.rope_kv_write, {"k_cache", "v_cache"}),
                        (torch.ops.r1mega.paged_decode_attention, set())):
        writes = {a.name for a in op.default._schema.arguments if a.alias_info and a.alias_info.is_write}
        assert writes == mutated, (op, writes)


def _fp8_runner(single_rank_runtime):
    from r1mega.config import PrecisionConfig
    from r1mega.rollout.model_runner import ModelRunner

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=6,
                                    num_query_groups=2), rt, wrap=False)
    r = ModelRunner(model, rt)
    cache = PagedKVCache(KVCacheShape(len(r.layers), r.num_kv_heads, r.head_dim, 4, FP8_DTYPE), r.device)
    cache.allocate(12)
    g = torch.Generator().manual_seed(5)
    shape = (48, r.num_kv_heads, r.head_dim)
    for i in range(len(r.layers)):  # noise standing in for earlier tokens' K/V
        cache.write(i, torch.arange(48), torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    r.cache = cache
    return r


def test_decode_forward_through_ops_is_one_graph_with_fp8(single_rank_runtime):
    """The decode ops (rope_kv_write, paged_decode_attention; CPU kernels = the references) on an
    FP8 cache give the module path's logits, caches and scales bit for bit, and dynamo traces the
    forward as one graph."""
    from r1mega.models.compile import prepare_dynamo

    r = _fp8_runner(single_rank_runtime)
    positions = torch.tensor([0, 3, 4, 9])
    bt = torch.tensor([[1, 0, 0], [2, 0, 0], [3, 4, 0], [5, 6, 7]], dtype=torch.int32)
    slots = bt.long().gather(1, (positions // 4)[:, None]).squeeze(1) * 4 + positions % 4
    args = (torch.tensor([5, 7, 9, 11]), positions, slots, bt, (positions + 1).int())
    tensors = lambda: [*r.cache.k, *r.cache.v, *r.cache.k_scale, *r.cache.v_scale]  # noqa: E731
    bytes_of = lambda ts: [t.view(torch.uint8).clone() for t in ts]  # noqa: E731

    def forward(ids, positions, slots, bt, ctx):
        return r.forward(ids, positions, slots, None, decode_tensors=(bt, ctx))

    start = bytes_of(tensors())
    with torch.no_grad():
        ref = forward(*args)
        ref_cache = bytes_of(tensors())
        assert any(not torch.equal(a, b) for a, b in zip(start, ref_cache))  # it wrote
        for t, t0 in zip(tensors(), start):
            t.view(torch.uint8).copy_(t0)
        r.decode_kernel_enabled = r.fused_rope_kv_enabled = True
        got = forward(*args)
        assert torch.equal(got, ref)
        assert all(torch.equal(a, b) for a, b in zip(bytes_of(tensors()), ref_cache))
        prepare_dynamo()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(forward)(*args)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1 and explained.graph_break_count == 0, reasons


def test_inductor_writes_the_fp8_cache_and_scales_in_place():
    """The compiled code hands the ops the cache and scale tensors themselves, not copies."""
    import re

    from torch._inductor.utils import run_and_get_code

    from r1mega.rollout import triton_paged, triton_rope_kv  # noqa: F401  (registers)

    cache = _cache(1, 2, 16, 4, 6)
    kc, vc, ks, vs = cache.layer(0)
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(4, 1, 2, 5 * 16, generator=g)
    cos, sin = torch.randn(4, 1, 1, 16, generator=g), torch.randn(4, 1, 1, 16, generator=g)
    slots = torch.tensor([3, 4, 9, 17])
    bt = torch.stack([slots // 4, torch.zeros_like(slots)], dim=1).int()
    ctx = (slots % 4 + 1).int()

    def step(qkv, cos, sin, slots, kc, vc, ks, vs, bt, ctx):
        q = torch.ops.r1mega.rope_kv_write_fp8(qkv, cos, sin, slots, kc, vc, ks, vs)
        o = torch.ops.r1mega.paged_decode_attention(q * 1.0, kc, vc, bt, ctx, 0.25, ks, vs)
        torch.ops.r1mega.kv_cache_write_fp8(kc, vc, slots, o[:, :2], o[:, 2:4], ks, vs)
        return o + 1

    copies = [t.clone() for t in (kc, vc, ks, vs)]
    ref = step(qkv, cos, sin, slots, *copies, bt, ctx)
    torch._dynamo.reset()
    ptrs = [t.data_ptr() for t in (kc, vc, ks, vs)]
    got, codes = run_and_get_code(torch.compile(step), qkv, cos, sin, slots, kc, vc, ks, vs, bt, ctx)
    torch.testing.assert_close(got, ref)
    for a, b in zip((kc, vc, ks, vs), copies):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert [t.data_ptr() for t in (kc, vc, ks, vs)] == ptrs
    calls = re.findall(r"torch\.ops\.r1mega\.(\w+)\.default\((.*)\)\s*$", "\n".join(codes), re.M)
    assert sorted(name for name, _ in calls) == ["kv_cache_write_fp8", "paged_decode_attention",
                                                 "rope_kv_write_fp8"]
    for name, call in calls:
        while re.search(r"\([^()]*\)", call):  # drop nested argument lists: view(buf, (..), ..)
            call = re.sub(r"\([^()]*\)", "", call)
        call = [a.strip() for a in call.split(",")]
        state = {"rope_kv_write_fp8": call[4:8], "paged_decode_attention": call[1:3] + call[6:8],
                 "kv_cache_write_fp8": call[0:2] + call[5:7]}[name]
        assert all(re.fullmatch(r"arg\d+_1", a) for a in state), f"{name} gets a copy: {call}"


# ---------------------------------------------------------------------------------- the engine


@pytest.fixture
def tiny(single_rank_runtime):
    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=VOCAB, max_position_embeddings=128), rt, wrap=False)
    with torch.no_grad():  # peaked distributions, as in test_rollout_engine.py
        for p in model[0].parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model, rt


def rollout_cfg(**kw) -> RolloutConfig:
    base = dict(kv_block_tokens=4, kv_cpu_tokens=4096, max_new_tokens=10, max_batch_sequences=64,
                temperature=1.0, cuda_graphs=False, kv_cache_dtype="fp8")
    base.update(kw)
    return RolloutConfig(**base)


PROMPTS = [[5, 17, 3], list(range(20, 37)), [9], [(7 * i) % VOCAB for i in range(33)], [1, 2, 3, 4, 5, 6, 7, 8]]


def _kv_through_e4m3(model):
    """Hooks on every layer's core attention: K and V rounded through e4m3 per (token, head), as
    the FP8 cache stores them. Returns the hook handles."""
    def hook(_mod, args, kwargs):
        q, k, v, *rest = args
        k = dequantize_rows(*quantize_rows(k), k.dtype)
        v = dequantize_rows(*quantize_rows(v), v.dtype)
        return (q, k, v, *rest), kwargs

    return [layer.self_attention.core_attention.register_forward_pre_hook(hook, with_kwargs=True)
            for layer in model[0].decoder.layers]


def _training_logprobs(model, prompt, tokens):
    full = prompt + tokens
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model[0](input_ids=ids, position_ids=None, attention_mask=None,
                          packed_seq_params=make_packed_seqs([len(full)], "cpu"))[0].float()
    lp = torch.log_softmax(logits[:, :VOCAB], dim=-1)
    return lp[len(prompt) - 1:-1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def test_engine_logprobs_equal_training_forward_on_e4m3_kv(tiny):
    """With every attention reading the cache (backend "gather": the prefill too), the FP8
    engine is the training forward on e4m3-rounded K/V: tight (fp32 model). Without the rounding
    hook the training forward differs by the FP8 error: looser, and visibly so."""
    model, rt = tiny
    eng = RolloutEngine(model, rollout_cfg(), rt, eos_ids=[], vocab_size=VOCAB, attention_backend="gather")
    assert eng.cache.shape.dtype == FP8_DTYPE
    outs = eng.generate([GenerationRequest(p, n=3, seed=7) for p in PROMPTS])
    assert all(len(c.token_ids) == 10 for c in outs)
    got = torch.cat([torch.tensor(c.logprobs) for c in outs])
    plain = torch.cat([_training_logprobs(model, PROMPTS[c.prompt_index], c.token_ids) for c in outs])
    handles = _kv_through_e4m3(model)
    try:
        rounded = torch.cat([_training_logprobs(model, PROMPTS[c.prompt_index], c.token_ids) for c in outs])
    finally:
        for h in handles:
            h.remove()
    tight = (got - rounded).abs()
    loose = (got - plain).abs()
    print(f"fp8 KV engine vs training forward: on e4m3 K/V max {tight.max():.2e} mean {tight.mean():.2e}; "
          f"on exact K/V max {loose.max():.2e} mean {loose.mean():.2e}")
    # fp32 reduction-order noise (the engine's batched GEMMs vs the training forward's) can move
    # an element across an e4m3 rounding boundary (one element in ~1e6): a median at fp32 noise
    # and a max two orders under the unrounded comparison's.
    assert tight.median() < 1e-5 and tight.max() < 1e-3
    assert loose.mean() > 10 * tight.mean()


def test_engine_default_backend_prefix_sharing_and_preemption(tiny):
    """The default path (fresh prefill on exact K/V, decode from the FP8 cache), with G samples
    sharing prompt blocks (copy_blocks) and a cache small enough to preempt: every sequence runs
    to its length, and log-probs stay within the FP8 error of the training forward's."""
    model, rt = tiny
    reqs = [GenerationRequest(p, n=3, seed=11 + i, max_new_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    tight = RolloutEngine(model, rollout_cfg(max_batch_sequences=5, kv_cpu_tokens=64), rt,
                          eos_ids=[], vocab_size=VOCAB)
    outs = tight.generate(reqs)
    assert tight.stats["preemptions"] > 0
    assert [len(c.token_ids) for c in outs] == [6 + 3 * (i // 3) for i in range(15)]
    roomy = RolloutEngine(model, rollout_cfg(kv_cache_dtype="auto"), rt, eos_ids=[], vocab_size=VOCAB)
    base = roomy.generate(reqs)
    diffs, base_diffs = [], []
    for c, b in zip(outs, base):
        p = PROMPTS[c.prompt_index]
        diffs.append((torch.tensor(c.logprobs) - _training_logprobs(model, p, c.token_ids)).abs())
        base_diffs.append((torch.tensor(b.logprobs) - _training_logprobs(model, p, b.token_ids)).abs())
    d, bd = torch.cat(diffs), torch.cat(base_diffs)
    print(f"fp8 KV (default backend, preempted) vs training: max {d.max():.2e} mean {d.mean():.2e}; "
          f"fp32 cache: max {bd.max():.2e}")
    assert bd.max() < 1e-4  # the fp32 cache: exact up to reduction order
    # e4m3 K/V (relative rounding <= 2^-4 per element): about a percent of a nat on average,
    # the size of the bf16 rollout's own mismatch on the H200 (mean 1.8e-2, max 1.1e-1).
    assert d.mean() < 0.03 and d.max() < 0.25


def test_engine_packed_graph_step_with_fp8(tiny):
    """The CUDA-graph step's code (run eagerly on CPU) through the FP8 cache equals the plain
    decode path with the same cache dtype."""
    model, rt = tiny
    reqs = [GenerationRequest(p, n=2, seed=21 + i) for i, p in enumerate(PROMPTS)]
    plain = RolloutEngine(model, rollout_cfg(), rt, eos_ids=[], vocab_size=VOCAB).generate(reqs)
    packed = RolloutEngine(model, rollout_cfg(max_batch_sequences=7), rt, eos_ids=[], vocab_size=VOCAB)
    packed.use_graphs = True
    got = packed.generate(reqs)
    for a, b in zip(got, plain):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_engine_refuses_fp8_it_cannot_serve(tiny):
    model, rt = tiny
    with pytest.raises(ValueError, match="rollout.kv_cache_dtype=fp8 with rollout.exact=true"):
        RolloutEngine(model, rollout_cfg(exact=True, compile_decode=False), rt, eos_ids=[], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="rollout.kv_cache_dtype='fp16'"):
        RolloutEngine(model, rollout_cfg(kv_cache_dtype="fp16"), rt, eos_ids=[], vocab_size=VOCAB)


def test_cache_dtype_refuses_gpus_without_fp8(monkeypatch):
    """sm_80 (A100) has no e4m3 conversions: refused at engine build, naming the key; sm_89/90 pass."""
    from r1mega.rollout.kv_cache import kv_cache_dtype

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"rollout.kv_cache_dtype=fp8 needs .*sm_89.* is sm_80; set rollout.kv_cache_dtype=auto"):
        kv_cache_dtype("fp8", torch.bfloat16, cuda)
    assert kv_cache_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    for cap in ((8, 9), (9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        assert kv_cache_dtype("fp8", torch.bfloat16, cuda) == FP8_DTYPE
    with pytest.raises(ValueError, match="MLA"):
        kv_cache_dtype("fp8", torch.bfloat16, torch.device("cpu"), keys_only=True)
