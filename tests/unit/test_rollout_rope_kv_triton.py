"""The fused RoPE + KV-cache write (r1mega.rollout.triton_rope_kv) and the decode custom ops, on CPU.

* The Triton kernel against the PyTorch reference under Triton's interpreter (TRITON_INTERPRET=1
  is set before triton is imported, so the kernel runs in a spawned process): the rotated q and
  both caches bit for bit in fp32, bf16 and fp16, slots untouched elsewhere.
* The custom ops' registrations (schema, fake kernels, mutation declarations) via opcheck.
* The decode forward of a tiny model through the ops (their CPU kernels are the references) equals
  the module-by-module path bit for bit, and dynamo traces either as one graph with no break.
* inductor re-inplaces the cache mutations: the compiled code hands the ops the cache tensors
  themselves, not copies.
"""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from tests.distributed.harness import run_ranks

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# (tokens T, KV heads, q heads per KV head G, head dim D, block tokens, strided qkv rows and slots)
SHAPES = [
    (7, 3, 3, 64, 4, False),  # SmolLM2-135M's heads (9 q, 3 kv, D 64); slots across block edges
    (64, 3, 3, 64, 16, False),  # its decode batch
    (5, 4, 1, 32, 8, True),  # MHA (G = 1); qkv rows and slots strided (views of larger buffers)
    (9, 1, 7, 16, 2, False),  # G + 1 = 8 rows, exactly a power of two; one KV head
    (6, 2, 4, 128, 1, False),  # one token per block; D = 128
]
DTYPES = ["float32", "bfloat16", "float16"]


def make_inputs(T, hkv, G, D, bs, strided, dtype, seed, device="cpu"):
    """Mixed QKV, cos/sin as ModelRunner builds them, distinct slots (block edges first), caches."""
    gen = torch.Generator().manual_seed(seed)
    width = hkv * (G + 2) * D
    rows = torch.randn(T * (2 if strided else 1), 1, hkv, (G + 2) * D, generator=gen) * 2
    qkv = rows.to(device, dtype)[:: 2 if strided else 1]  # sliced on the device: .to() would pack it
    positions = torch.randint(0, 4096, (T,), generator=gen).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    cos, sin = torch.cos(emb).to(dtype), torch.sin(emb).to(dtype)
    nb = 2 * (-(-T // bs)) + 3
    # Last/first slot of each block; with one token per block these repeat, and a repeated
    # slot would make the result depend on which program writes last.
    edges = list(dict.fromkeys(s for b in range(1, nb) for s in (b * bs - 1, b * bs)))[:T]
    rest = [s for s in torch.randperm(nb * bs, generator=gen).tolist() if s not in edges]
    slots = torch.tensor((edges + rest)[:T], dtype=torch.int64, device=device)
    assert len(set(slots.tolist())) == T, "slots must be distinct"
    if strided:
        slots = torch.stack((slots, slots), dim=1)[:, 0]  # a column of a packed buffer
    k_cache = torch.randn(nb, bs, hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, D, generator=gen).to(dtype)
    assert qkv.reshape(T, width).stride(0) == width * (2 if strided else 1)
    cos, sin, k_cache, v_cache = (t.to(device) for t in (cos, sin, k_cache, v_cache))
    return qkv, cos, sin, slots, k_cache, v_cache


def _interpreted(rank, world, shapes, dtypes):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.rollout import triton_rope_kv as R

    assert R.HAVE_TRITON and R.interpreting()
    out = []
    for i, shape in enumerate(shapes):
        for dtype_name in dtypes:
            for exact in (False, True) if R.exact_rounding_supported(getattr(torch, dtype_name)) else (False,):
                qkv, cos, sin, slots, kc, vc = make_inputs(*shape, getattr(torch, dtype_name), seed=i)
                kc0, vc0 = kc.clone(), vc.clone()
                q_ref = R.rope_kv_write_reference(qkv, cos, sin, slots, kc, vc)
                kc_got, vc_got = kc0.clone(), vc0.clone()
                q_got = torch.full_like(q_ref, float("nan"))  # poisoned: every row must be written
                R.rope_kv_write_triton(qkv, cos, sin, slots, kc_got, vc_got, out=q_got, exact=exact)
                out.append(((shape, dtype_name, exact), slots, (q_ref, kc, vc), (q_got, kc_got, vc_got),
                            (kc0, vc0)))
    return out


@needs_triton
def test_fused_rope_kv_write_matches_reference_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    (results,) = run_ranks(_interpreted, 1, args=(SHAPES, DTYPES), timeout_s=300)
    # Each shape in each dtype, and again with exact=True (rollout.exact's variant) in bf16 and fp32.
    assert len(results) == len(SHAPES) * (len(DTYPES) + 2)
    for case, slots, ref, got, before in results:
        # Bit for bit in every dtype: the kernel rounds as the eager ops do (module docstring).
        for name, r, g in zip(("q", "k_cache", "v_cache"), ref, got):
            assert torch.equal(r, g), f"{case}: {name} differs by {(r.float() - g.float()).abs().max()}"
        for c, c0 in zip(got[1:], before):
            flat, flat0 = c.view(-1, *c.shape[2:]), c0.view(-1, *c0.shape[2:])
            untouched = torch.ones(flat.shape[0], dtype=torch.bool)
            untouched[slots] = False
            assert torch.equal(flat[untouched], flat0[untouched]), f"{case}: wrote outside its slots"


def test_custom_op_registrations():
    """Schemas, fake kernels (shapes under dynamo) and declared mutations of the three ops."""
    from r1mega.rollout import kv_cache, triton_paged, triton_rope_kv  # noqa: F401  (registers)

    qkv, cos, sin, slots, kc, vc = make_inputs(7, 3, 3, 16, 4, False, torch.float32, seed=0)
    torch.library.opcheck(torch.ops.r1mega.rope_kv_write.default, (qkv, cos, sin, slots, kc, vc))
    torch.library.opcheck(torch.ops.r1mega.rope_kv_write.default,
                          (qkv, cos, sin, slots, kc, vc, torch.full((7,), 0.25)))
    k = torch.randn(7, 3, 16)
    torch.library.opcheck(torch.ops.r1mega.kv_cache_write.default, (kc, vc, slots, k, k.clone()))
    bt = torch.tensor([[1, 2], [3, 0], [4, 5]], dtype=torch.int32)
    ctx = torch.tensor([6, 1, 8], dtype=torch.int32)
    q = torch.randn(3, 9, 16)
    torch.library.opcheck(torch.ops.r1mega.paged_decode_attention.default, (q, kc, vc, bt, ctx, 0.25))


@pytest.fixture
def runner(single_rank_runtime):
    from r1mega.config import ModelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.rollout.model_runner import ModelRunner

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    # 6 q heads over 2 KV groups of 16: GQA like SmolLM2's 9 over 3.
    model = build_model(ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=6,
                                    num_query_groups=2), rt, wrap=False)
    r = ModelRunner(model, rt)
    assert r.fused_rope_kv_supported() and not r.fused_rope_kv_enabled  # supported; CPU: off
    attach_random_cache(r, block_tokens=4, num_blocks=12)
    return r


def attach_random_cache(r, block_tokens: int, num_blocks: int) -> None:
    """A paged cache for runner ``r``, filled with noise that stands in for earlier tokens' K/V."""
    from r1mega.rollout.kv_cache import KVCacheShape, PagedKVCache

    cache = PagedKVCache(KVCacheShape(len(r.layers), r.num_kv_heads, r.head_dim, block_tokens,
                                      r.param_dtype), r.device)
    cache.allocate(num_blocks)
    for t in cache.k + cache.v:
        t.normal_()
    r.cache = cache


def decode_inputs(bs=4):
    positions = torch.tensor([0, 3, 4, 9])  # block edges: 3 is a block's last slot, 4 the next's first
    block_tables = torch.tensor([[1, 0, 0], [2, 0, 0], [3, 4, 0], [5, 6, 7]], dtype=torch.int32)
    slots = block_tables.long().gather(1, (positions // bs)[:, None]).squeeze(1) * bs + positions % bs
    return torch.tensor([5, 7, 9, 11]), positions, slots, block_tables, (positions + 1).int()


@pytest.mark.parametrize("path", ["modules", "ops"])
def test_decode_forward_is_one_graph(runner, path):
    """No graph break in the decode forward, module path or through the decode ops; the ops'
    CPU kernels (the references) give the module path's logits and caches bit for bit."""
    from r1mega.models.compile import prepare_dynamo

    ids, positions, slots, bt, ctx = decode_inputs()
    start = [t.clone() for t in runner.cache.k + runner.cache.v]

    def forward(ids, positions, slots, bt, ctx):
        return runner.forward(ids, positions, slots, None, decode_tensors=(bt, ctx))

    with torch.no_grad():
        ref = forward(ids, positions, slots, bt, ctx)
        ref_cache = [t.clone() for t in runner.cache.k + runner.cache.v]
        for t, t0 in zip(runner.cache.k + runner.cache.v, start):
            t.copy_(t0)
        runner.decode_kernel_enabled = runner.fused_rope_kv_enabled = path == "ops"
        got = forward(ids, positions, slots, bt, ctx)
        assert torch.equal(got, ref)
        assert all(torch.equal(a, b) for a, b in zip(runner.cache.k + runner.cache.v, ref_cache))

        prepare_dynamo()  # what the runner does on GPU, where the decode forward is compiled
        torch._dynamo.reset()
        explained = torch._dynamo.explain(forward)(ids, positions, slots, bt, ctx)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1 and explained.graph_break_count == 0, reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    ours = {op for op in ops if op.startswith("r1mega.")}  # each op once per layer, in the graph
    assert ours == ({"r1mega.rope_kv_write", "r1mega.paged_decode_attention"} if path == "ops"
                    else {"r1mega.kv_cache_write"}), ours


def test_inductor_writes_the_cache_in_place():
    """A cache-sized copy per layer would cost more than the whole decode step: the compiled code
    must call the ops on the cache inputs themselves (auto-functionalised, then re-inplaced)."""
    from torch._inductor.utils import run_and_get_code

    from r1mega.rollout import triton_paged, triton_rope_kv  # noqa: F401  (registers)

    qkv, cos, sin, slots, kc, vc = make_inputs(4, 2, 3, 16, 4, False, torch.float32, seed=1)
    bt = torch.stack([slots // 4, torch.zeros_like(slots)], dim=1).int()
    ctx = (slots % 4 + 1).int()

    def step(qkv, cos, sin, slots, kc, vc, bt, ctx):
        q = torch.ops.r1mega.rope_kv_write(qkv, cos, sin, slots, kc, vc)
        o = torch.ops.r1mega.paged_decode_attention(q * 1.0, kc, vc, bt, ctx, 0.25)
        torch.ops.r1mega.kv_cache_write(kc, vc, slots, o[:, :2], o[:, 2:4])
        return o + 1

    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = step(qkv, cos, sin, slots, kc_ref, vc_ref, bt, ctx)
    torch._dynamo.reset()
    ptrs = kc.data_ptr(), vc.data_ptr()
    got, codes = run_and_get_code(torch.compile(step), qkv, cos, sin, slots, kc, vc, bt, ctx)
    torch.testing.assert_close(got, ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref) and (kc.data_ptr(), vc.data_ptr()) == ptrs
    code = "\n".join(codes)
    calls = re.findall(r"torch\.ops\.r1mega\.(\w+)\.default\(([^)]*)\)", code)
    assert sorted(name for name, _ in calls) == ["kv_cache_write", "paged_decode_attention", "rope_kv_write"]
    for name, args in calls:
        args = [a.strip() for a in args.split(",")]
        caches = {"rope_kv_write": args[4:6], "paged_decode_attention": args[1:3],
                  "kv_cache_write": args[0:2]}[name]
        assert all(re.fullmatch(r"arg\d+_1", a) for a in caches), f"{name} gets a cache copy: {args}"


def _interpreted_kv_out(rank, world):
    """The prefill variant: the same q and caches, and the rotated k / the v rows handed out."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.rollout import triton_rope_kv as R
    from r1mega.rollout.kv_cache import FP8_DTYPE

    out = []
    for i, shape in enumerate(SHAPES[:3]):
        for dtype_name, fp8 in (("bfloat16", False), ("float32", False), ("bfloat16", True)):
            qkv, cos, sin, slots, kc, vc = make_inputs(*shape, getattr(torch, dtype_name), seed=10 + i)
            T, hkv, G, D = shape[:4]
            ks = vs = None
            if fp8:
                kc, vc = kc.to(FP8_DTYPE), vc.to(FP8_DTYPE)
                ks, vs = torch.ones(kc.shape[:3]), torch.ones(kc.shape[:3])
            # the reference rotation into a plain cache of qkv's dtype: its rows at the slots
            kr = torch.zeros(kc.shape, dtype=qkv.dtype)
            vr = torch.zeros_like(kr)
            q_ref = R.rope_kv_write_reference(qkv, cos, sin, slots, kr, vr)
            k_ref = kr.view(-1, hkv, D)[slots]
            v_ref = vr.view(-1, hkv, D)[slots]
            caches = (kc.clone(), vc.clone(), None if ks is None else ks.clone(), None if vs is None else vs.clone())
            R.rope_kv_write_triton(qkv, cos, sin, slots, caches[0], caches[1], k_scale=caches[2],
                                   v_scale=caches[3])
            k_out = torch.full((T, hkv, D), float("nan"), dtype=qkv.dtype)
            v_out = torch.full_like(k_out, float("nan"))
            got = (kc.clone(), vc.clone(), None if ks is None else ks.clone(), None if vs is None else vs.clone())
            q = R.rope_kv_write_triton(qkv, cos, sin, slots, got[0], got[1], k_scale=got[2],
                                       v_scale=got[3], kv_out=(k_out, v_out))
            out.append(((shape, dtype_name, fp8), q_ref, q, k_ref, k_out, v_ref, v_out, caches, got))
    return out


def _same_caches(a, b) -> bool:
    """(k_cache, v_cache, k_scale, v_scale) tuples equal bit for bit (FP8 caches as bytes; the
    scales None for a plain cache)."""
    def bits(t):
        return t.view(torch.uint8) if t.dtype.itemsize == 1 else t
    return all((x is None and y is None) or torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


@pytest.mark.slow
@needs_triton
def test_prefill_variant_hands_out_rotated_k_and_v_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (cases,) = run_ranks(_interpreted_kv_out, 1, timeout_s=300)
    assert len(cases) == 9
    for case, q_ref, q, k_ref, k_out, v_ref, v_out, caches, got in cases:
        assert torch.equal(q, q_ref), case
        assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref), case
        assert _same_caches(caches, got), case  # as the variant without kv_out writes them


def test_prefill_through_the_fused_route_generates_the_same(single_rank_runtime, monkeypatch):
    """With the fused route on (on a CPU its reference: the same arithmetic as the eager path),
    the prefill hands rope_kv_write_prefill's k and v to its attention and the rollout is the
    eager one to the bit; the route is taken once per layer and prefill."""
    from r1mega.config import ModelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.rollout import triton_rope_kv
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=6,
                                    num_query_groups=2, vocab_size=128), rt, wrap=False)
    cfg = RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=4096, max_new_tokens=5, max_batch_sequences=8,
                        temperature=1.0, cuda_graphs=False, compile_decode=False)
    reqs = [GenerationRequest([1, 2, 3, 4, 5, 6][: 3 + i], n=1, seed=i) for i in range(3)]
    calls = []
    real = triton_rope_kv.rope_kv_write_prefill
    monkeypatch.setattr(triton_rope_kv, "rope_kv_write_prefill",
                        lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    outs = {}
    for fused in (False, True):
        eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=128)
        eng.runner.fused_rope_kv_enabled = fused
        outs[fused] = [(c.token_ids, c.logprobs) for c in eng.generate(reqs)]
        eng.release()
    assert outs[True] == outs[False]
    assert calls and all(t >= 3 for t in calls) and len(calls) % 2 == 0  # prefill rows, both layers


def _interpreted_row_scale(rank, world):
    """qkv's rows scaled on the kernel's read: the kernel on the unscaled rows and their scales
    against the reference on the scaled rows (every output), plain and FP8 caches."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.rollout import triton_rope_kv as R
    from r1mega.rollout.kv_cache import FP8_DTYPE

    out = []
    for i, shape in enumerate(SHAPES[:3]):
        for dtype_name, fp8 in (("bfloat16", False), ("float16", False), ("float32", False),
                                ("bfloat16", True)):
            qkv, cos, sin, slots, kc, vc = make_inputs(*shape, getattr(torch, dtype_name), seed=20 + i)
            T = shape[0]
            g = torch.Generator().manual_seed(i)
            # powers of two (the FP8 row route's), and one that is not: the kernel rounds the
            # product back to the activation dtype as apply_row_scale does
            rs = 2.0 ** torch.randint(-6, 7, (T,), generator=g).float()
            rs[0] = 0.7
            ks = vs = None
            if fp8:
                kc, vc = kc.to(FP8_DTYPE), vc.to(FP8_DTYPE)
                ks, vs = torch.ones(kc.shape[:3]), torch.ones(kc.shape[:3])
            scaled = R.apply_row_scale(qkv, rs)
            ref = [t.clone() if t is not None else None for t in (kc, vc, ks, vs)]
            q_ref = R.rope_kv_write_reference(scaled, cos, sin, slots, *ref)
            got = [t.clone() if t is not None else None for t in (kc, vc, ks, vs)]
            q = R.rope_kv_write_triton(qkv, cos, sin, slots, got[0], got[1], k_scale=got[2],
                                       v_scale=got[3], row_scale=rs)
            exact = torch.equal(scaled[1:].float(), qkv[1:].float() * rs[1:].reshape(-1, 1, 1, 1))
            out.append(((shape, dtype_name, fp8), q_ref, q, ref, got, exact))
    return out


@pytest.mark.slow
@needs_triton
def test_row_scales_applied_on_the_kernels_read_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (cases,) = run_ranks(_interpreted_row_scale, 1, timeout_s=300)
    assert len(cases) == 12
    for case, q_ref, q, ref, got, exact in cases:
        # a power-of-two scale rounds nowhere in bf16 and fp32 (fp32's exponent range); fp16
        # rounds scaled-down rows into its subnormals
        assert exact or case[1] == "float16", case
        assert torch.equal(q, q_ref), case
        assert _same_caches(ref, got), case
