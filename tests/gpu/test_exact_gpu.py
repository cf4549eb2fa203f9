"""rollout.exact on CUDA (skipped without it): the row kernels, the exact attention's packed and
paged paths, and the engine in bf16 with CUDA graphs (several buckets, cuBLASLt or chunked-K
GEMMs) against the training forward, bit for bit; a GRPO step's recomputed log-probs equal the
rollout's (the GEMM itself: test_exact_gemm_gpu.py). Self-contained: every reference is computed
here."""
from __future__ import annotations

import math
import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 512
PROMPTS = [[5, 17, 3], list(range(20, 57)), [9], [(7 * i) % VOCAB for i in range(45)],
           [1, 2, 3, 4, 5, 6, 7, 8], [40, 41], [(3 * i + 1) % VOCAB for i in range(19)], [77] * 5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [2048, 896, 7168])
def test_triton_rms_norm_matches_and_is_batch_invariant(dtype, n):
    import torch.nn.functional as F

    from r1mega.ops import triton_rows

    torch.manual_seed(3)
    x = torch.randn(700, n, device="cuda", dtype=dtype) * 3
    w = torch.randn(n, device="cuda")
    full = triton_rows.rms_norm(x, w, 1e-6)
    ref = F.rms_norm(x.float(), (n,), None, 1e-6).to(dtype) * w.to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(full.float(), ref.float(), rtol=tol, atol=tol)
    for m in (1, 3, 64, 257):
        assert torch.equal(triton_rows.rms_norm(x[:m], w, 1e-6), full[:m]), m
        assert torch.equal(triton_rows.rms_norm(x[-m:].clone(), w, 1e-6), full[-m:]), m
    x3 = x.view(7, 100, n)[:, ::2]  # strided rows: copied, same bits
    assert torch.equal(triton_rows.rms_norm(x3, w, 1e-6), full.view(7, 100, n)[:, ::2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_exact_logprobs_match_and_are_batch_invariant(dtype):
    from r1mega.ops.exact_logprobs import exact_token_logprobs

    torch.manual_seed(4)
    n, v, valid = 300, 32128, 32000
    logits = (torch.randn(n, v, device="cuda") * 5).to(dtype)
    logits[:, valid:] = 1e4  # padding columns must not count
    tgt = torch.randint(0, valid, (n,), device="cuda")
    temp = torch.rand(n, device="cuda") + 0.3
    temp[:5] = 0.0  # greedy rows: temperature 1
    got = exact_token_logprobs(logits, tgt, temp, valid_cols=valid)
    t_eff = torch.where(temp > 0, temp, torch.ones_like(temp))
    ref = torch.log_softmax(logits[:, :valid].double() / t_eff.double()[:, None], -1)
    ref = ref.gather(1, tgt[:, None]).squeeze(1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    for rows in (slice(0, 1), slice(7, 10), slice(100, 300)):
        part = exact_token_logprobs(logits[rows], tgt[rows], temp[rows], valid_cols=valid)
        assert torch.equal(part, got[rows])


def _packed_case(lengths, hq, hkv, d, dtype, width):
    """Random packed sequences on CUDA: q (T, Hq, D), k and v (T, Hkv, D), each sequence's slot
    table (width columns, clamped past its end), and every row's sequence and position."""
    from r1mega.ops.triton_exact_attention import packed_tables

    t = sum(lengths)
    q = torch.randn(t, hq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(t, hkv, d, device="cuda", dtype=dtype) for _ in range(2))
    return (q, k, v) + packed_tables(lengths, width, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 4), (64, 9, 3), (128, 32, 8), (64, 8, 8)])
@pytest.mark.parametrize("which", ["train", "decode"])
def test_exact_attention_tile_checks_agree_with_the_bits(dtype, d, hq, hkv, which):
    """Training's bigger and decode's smaller attention tiles are used exactly where they give the
    default tiles' bits: the device check's answer equals a direct comparison on other sequences."""
    from r1mega.ops import triton_exact_attention as tea

    alt = {"train": (tea.TRAIN_TILE_ROWS, tea.TRAIN_WARPS), "decode": (tea.DECODE_TILE_ROWS, tea.DECODE_WARPS)}
    if alt[which] == (tea.TILE_ROWS, tea.WARPS):
        pytest.skip(f"{which} tiles are the default ones (R1MEGA_EXACT_DECODE_TILES sets experimental ones)")
    torch.manual_seed(2)
    q, k, v, slots, q_seq, q_pos = _packed_case([64, 1, 255, 130, 1, 1], hq, hkv, d, dtype, 320)
    a = tea.exact_attention_slots(q, k, v, slots, q_seq, q_pos, d ** -0.5)
    b = tea.exact_attention_slots(q, k, v, slots, q_seq, q_pos, d ** -0.5, train_tiles=which == "train",
                                  decode_tiles=which == "decode")
    check = tea.train_tiles_usable if which == "train" else tea.decode_tiles_usable
    assert check(q, hkv) == torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 4), (64, 16, 4), (80, 16, 4),  # 80: the PyTorch path
                                      (64, 12, 4), (64, 8, 8), (64, 32, 1)])
def test_exact_attention_packed_equals_paged(dtype, d, hq, hkv):
    """A query decoded alone from the paged cache gets the bits it gets inside a packed training
    tile, at every row of a tile (tiles hold several queries of one sequence)."""
    from r1mega.models.attention import sdpa_packed
    from r1mega.ops.exact_attention import exact_cache_attention, exact_packed_attention

    torch.manual_seed(1)
    lengths = [5, 190, 1, 333]
    t, bs = sum(lengths), 16
    q = torch.randn(t, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(t, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(t, hkv, d, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(d)
    out = exact_packed_attention(q, k, v, lengths, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), sdpa_packed(q, k, v, lengths, scale).float(), rtol=tol, atol=tol)
    s3 = slice(196, 529)
    n_blocks = 40
    cache_k = torch.full((n_blocks, bs, hkv, d), float("nan"), device="cuda", dtype=dtype)
    cache_v = torch.full_like(cache_k, float("nan"))
    blocks = torch.randperm(n_blocks, device="cuda")[:21]  # 21 * 16 >= 333
    slots = (blocks[:, None] * bs + torch.arange(bs, device="cuda")).reshape(1, -1)
    cache_k.view(-1, hkv, d)[slots[0, :333]] = k[s3]
    cache_v.view(-1, hkv, d)[slots[0, :333]] = v[s3]
    for pos in sorted(set(range(0, 333, 5)) | {63, 64, 65, 127, 128, 332}):
        dec = exact_cache_attention(q[196 + pos:197 + pos], cache_k, cache_v, slots,
                                    torch.tensor([0], device="cuda"),
                                    torch.tensor([pos], device="cuda"), scale)
        assert torch.equal(dec[0], out[196 + pos]), pos


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 4), (64, 9, 3), (128, 32, 8), (64, 8, 8)])
def test_keys_major_kernel_decode_equals_training(dtype, d, hq, hkv, monkeypatch):
    """The keys-major kernel (R1MEGA_EXACT_ATTENTION=keys): a query decoded alone through
    16-column tiles gets the bits its packed training tile gives it, the training tile being the
    bigger one (64 columns, 8 warps) where the device check admits it and the decode tile
    elsewhere; in bf16 (wgmma on Hopper: the key axis sits the same way in both) the check must
    admit it. Both near the PyTorch reference."""
    from r1mega.ops import triton_exact_attention as tea
    from r1mega.ops.exact_attention import exact_attention

    monkeypatch.setattr(tea, "KEYS_MAJOR", True)
    monkeypatch.setattr(tea, "TILE_ROWS", 16)
    monkeypatch.setattr(tea, "DECODE_TILE_ROWS", 16)
    monkeypatch.setattr(tea, "DECODE_WARPS", tea.WARPS)
    monkeypatch.setattr(tea, "TRAIN_TILE_ROWS", tea.TRAIN_TILES["keys"][0])
    monkeypatch.setattr(tea, "TRAIN_WARPS", tea.TRAIN_TILES["keys"][1])
    monkeypatch.setattr(tea, "_checked", {})
    torch.manual_seed(4)
    q, k, v, slots, q_seq, q_pos = _packed_case([64, 1, 255, 130, 1, 400], hq, hkv, d, dtype, 448)
    t = q.shape[0]
    scale = d ** -0.5
    big = tea.train_tiles_usable(q, hkv)
    if dtype == torch.bfloat16:
        assert big
    train = tea.exact_attention_slots(q, k, v, slots, q_seq, q_pos, scale, train_tiles=big)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ref = exact_attention(q, k[slots], v[slots], q_seq, q_pos, scale)
    torch.testing.assert_close(train.float(), ref.float(), rtol=tol, atol=tol)
    dec = tea.exact_attention_slots(q, k, v, slots, q_seq, q_pos, scale,
                                    tiles=torch.ones(t, dtype=torch.int32, device="cuda"),
                                    decode_tiles=True)  # every query a tile of its own, as decoded
    bad = (dec != train).flatten(1).any(1)
    assert not bad.any(), f"{int(bad.sum())} of {t} queries differ, e.g. position {int(q_pos[bad][0])}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_exact_attention_matches_reference(dtype):
    """The kernel against the PyTorch walk it implements (same blocks, other rounding)."""
    from r1mega.ops import triton_exact_attention as tea
    from r1mega.ops.exact_attention import exact_attention

    if not tea.HAVE_TRITON:
        pytest.skip("no triton")
    torch.manual_seed(2)
    b, L, hq, hkv, d = 3, 96, 12, 4, 64
    k_rows = torch.randn(b * L, hkv, d, device="cuda", dtype=dtype)
    v_rows = torch.randn_like(k_rows)
    slots = torch.randperm(b * L, device="cuda").view(b, L)
    q_seq = torch.tensor([0, 0, 1, 2, 2, 2], device="cuda")
    q_pos = torch.tensor([0, 95, 17, 15, 16, 64], device="cuda")
    q = torch.randn(6, hq, d, device="cuda", dtype=dtype)
    out = torch.full_like(q, float("nan"))
    out.copy_(tea.exact_attention_slots(q, k_rows, v_rows, slots, q_seq, q_pos, 0.125))
    ref = exact_attention(q, k_rows[slots], v_rows[slots], q_seq, q_pos, 0.125)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def _model(single_rank_runtime, **kw):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    rt = single_rank_runtime()  # bf16 on CUDA
    torch.manual_seed(0)
    base = dict(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=2,
                ffn_hidden_size=1408, vocab_size=VOCAB, max_position_embeddings=256, spec="local")
    base.update(kw)
    model = build_model(ModelConfig(**base), rt, wrap=False)
    with torch.no_grad():
        for p in model[0].parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model, rt


def _train_logprobs(model, seqs, temperature):
    from r1mega.models.attention import make_packed_seqs
    from r1mega.ops.exact_logprobs import exact_token_logprobs

    tokens = [p + c for p, c in seqs]
    ids = torch.tensor([sum(tokens, [])], device="cuda")
    with torch.no_grad():
        logits = model[0](input_ids=ids, position_ids=None, attention_mask=None,
                          packed_seq_params=make_packed_seqs([len(t) for t in tokens], "cuda"))[0]
    out, start = [], 0
    for (p, c), t in zip(seqs, tokens):
        rows = logits[start + len(p) - 1:start + len(t) - 1]
        temp = torch.full((len(c),), temperature, dtype=torch.float32, device="cuda")
        out.append(exact_token_logprobs(rows, torch.tensor(c, device="cuda"), temp,
                                        valid_cols=VOCAB).cpu())
        start += len(t)
    return out


def _assert_bitwise(model, outs, prompts, temperature, order):
    seqs = [(prompts[c.prompt_index], c.token_ids) for c in outs]
    got = _train_logprobs(model, [seqs[i] for i in order], temperature)
    for i, lp in zip(order, got):
        roll = torch.tensor(outs[i].logprobs, dtype=torch.float32)
        assert torch.equal(roll, lp), f"completion {i}: max |diff| {float((roll - lp).abs().max()):.3e}"


def _cfg(**kw):
    from r1mega.config import RolloutConfig

    base = dict(kv_block_tokens=16, kv_memory_fraction=0.05, max_new_tokens=24, temperature=1.0,
                cuda_graphs=True, compile_decode=False, exact=True)
    base.update(kw)
    return RolloutConfig(**base)


def _k_chunks(monkeypatch, tbi, chunks):
    monkeypatch.setattr(tbi, "K_CHUNKS", chunks)
    monkeypatch.setattr(tbi, "_choice", {})
    monkeypatch.setattr(tbi, "_small_ok", {})


@pytest.mark.parametrize("batch", [1, 8])
def test_bf16_engine_bitwise_equal_training_with_cublaslt_gemm(single_rank_runtime, batch, monkeypatch):
    """The engine's bitwise test with every exact GEMM on cuBLASLt (R1MEGA_EXACT_GEMM=cublaslt)."""
    from r1mega.ops import cublaslt_exact as cle

    if not cle.supported(torch.zeros(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip(f"no cuBLASLt extension: {cle.clt.load_error()}")
    monkeypatch.setenv("R1MEGA_EXACT_GEMM", "cublaslt")
    monkeypatch.setattr(cle, "_ref", {})
    monkeypatch.setattr(cle, "_choice", {})
    test_bf16_engine_bitwise_equal_training_across_graph_buckets(single_rank_runtime, batch, monkeypatch)
    assert cle._ref, "no GEMM went to cuBLASLt"


def test_bf16_engine_bitwise_equal_training_with_k_chunks(single_rank_runtime, monkeypatch):
    """The engine with K in chunks (split decode GEMMs where they are checked and faster) against
    the training forward, which sums the same chunks in one program."""
    from r1mega.ops import triton_batch_invariant as tbi
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    _k_chunks(monkeypatch, tbi, 4)
    model, rt = _model(single_rank_runtime)
    eng = RolloutEngine(model, _cfg(max_batch_sequences=8), rt, eos_ids=[], vocab_size=VOCAB)
    reqs = [GenerationRequest(p, n=1, seed=5 + i, max_new_tokens=8 + 3 * i) for i, p in enumerate(PROMPTS)]
    outs = eng.generate(reqs)
    n = len(outs)
    _assert_bitwise(model, outs, PROMPTS, 1.0, list(range(n)))
    _assert_bitwise(model, outs, PROMPTS, 1.0, list(reversed(range(n))))


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_bf16_engine_bitwise_equal_training_across_graph_buckets(single_rank_runtime, batch, monkeypatch):
    from r1mega.rollout import cuda_graphs
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    # Batches under MIN_SHRINK rows replay the first captured graph; at 1 every shrink of the
    # batch past half its bucket captures a smaller one, so several buckets are compared.
    monkeypatch.setattr(cuda_graphs, "MIN_SHRINK", 1)

    model, rt = _model(single_rank_runtime)
    eng = RolloutEngine(model, _cfg(max_batch_sequences=batch), rt, eos_ids=[], vocab_size=VOCAB)
    # Different lengths: the batch shrinks as sequences finish, so several buckets replay.
    reqs = [GenerationRequest(p, n=1, seed=5 + i, max_new_tokens=8 + 3 * i) for i, p in enumerate(PROMPTS)]
    outs = eng.generate(reqs)
    assert eng.use_graphs and eng.graphs is not None and eng.graphs.captures >= (1 if batch == 1 else 2)
    n = len(outs)
    _assert_bitwise(model, outs, PROMPTS, 1.0, list(range(n)))
    _assert_bitwise(model, outs, PROMPTS, 1.0, list(reversed(range(n))))
    order = list(range(n))
    random.Random(0).shuffle(order)
    for i in range(0, n, 3):
        _assert_bitwise(model, outs, PROMPTS, 1.0, order[i:i + 3])


def test_bf16_engine_with_preemption_and_temperature(single_rank_runtime):
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    model, rt = _model(single_rank_runtime, family="qwen3", qk_norm=True, rope_theta=1e6)
    reqs = [GenerationRequest(p, n=3, seed=11 + i, max_new_tokens=10 + 6 * i)
            for i, p in enumerate(PROMPTS[:4])]
    eng = RolloutEngine(model, _cfg(max_batch_sequences=6, temperature=0.7), rt, eos_ids=[],
                        vocab_size=VOCAB)
    eng.blocks_needed = lambda groups: 14  # a 14-block cache: decode steps must preempt
    outs = eng.generate(reqs)
    assert eng.stats["preemptions"] > 0
    _assert_bitwise(model, outs, PROMPTS, 0.7, list(range(len(outs))))
    _assert_bitwise(model, outs, PROMPTS, 0.7, list(reversed(range(len(outs)))))


def test_grpo_step_exact_on_gpu(single_rank_runtime):
    from tests.unit.test_exact_grpo import run_step

    for m in run_step(single_rank_runtime, exact=True):
        assert m["rollout/logprob_max_abs_diff"] == 0.0


def test_triton_swiglu_matches_float64_and_is_batch_invariant():
    """The fused SwiGLU kernels (r1mega/ops/triton_swiglu.py), compiled for this GPU: forward and
    backward within the dtype's rounding of float64 autograd, output buffers poisoned first; a
    row's bits alone, in a slice, among other rows and in a strided (s, b, 2F) view; the autograd
    Function saves only its input. The same checks as the CPU interpreter test, on real shapes."""
    from r1mega.ops import triton_swiglu
    from tests.unit.test_triton_swiglu import SHAPES, assert_checks, run_checks

    if not triton_swiglu.HAVE_TRITON:
        pytest.skip("no triton")
    shapes = SHAPES + [(700, 5632), (3, 1408), (130, 2816)]  # 852M's F, this file's model's, TP=2
    assert_checks(run_checks("cuda", shapes), shapes)


def test_exact_mlp_calls_fused_swiglu_in_decode_and_training(single_rank_runtime, monkeypatch):
    """rollout.exact on CUDA: every dense MLP calls the fused kernel, in each eager decode step
    (one call per layer, one row per sequence) and in the training forward, each decode layer
    calls the exact variant of the fused RoPE + KV write, and the log-probs stay bitwise equal;
    the MLP's gradients match the default mode's compiled SwiGLU."""
    import torch.nn.functional as F

    from r1mega.ops import exact_mlp, triton_swiglu
    from r1mega.ops.batch_invariant import remove_exact_forward
    from r1mega.rollout import triton_rope_kv
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    if not triton_swiglu.HAVE_TRITON:
        pytest.skip("no triton")
    model, rt = _model(single_rank_runtime)
    mlps = [layer.mlp for layer in model[0].decoder.layers]
    assert all(m.activation_func is F.silu and m.config.bias_activation_fusion for m in mlps)

    # The default mode's MLP (megatron's compiled bias_swiglu_impl), forward and backward.
    x = torch.randn(37, 1, 512, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(37, 1, 512, device="cuda", dtype=torch.bfloat16)

    def mlp_grads(mlp):
        xi = x.clone().requires_grad_(True)
        for p in mlp.parameters():
            p.grad = None
        out = mlp(xi)[0]
        out.backward(dout)
        return [out.detach(), xi.grad] + [p.grad.clone() for p in mlp.parameters()]

    default = mlp_grads(mlps[0])

    calls, phase = [], [None]
    kernel = triton_swiglu.swiglu

    def counting(y):
        calls.append((phase[0], y.reshape(-1, y.shape[-1]).shape[0], triton_swiglu.supported(y)))
        return kernel(y)

    monkeypatch.setattr(triton_swiglu, "swiglu", counting)
    rope_calls, rope_kernel = [], triton_rope_kv.rope_kv_write_triton

    def rope_counting(*args, **kwargs):
        rope_calls.append((phase[0], kwargs.get("exact", False)))
        return rope_kernel(*args, **kwargs)

    monkeypatch.setattr(triton_rope_kv, "rope_kv_write_triton", rope_counting)
    eng = RolloutEngine(model, _cfg(max_batch_sequences=4, cuda_graphs=False), rt, eos_ids=[],
                        vocab_size=VOCAB)
    assert all(m.activation_func is exact_mlp.exact_swiglu for m in mlps)
    decode, steps = eng._decode, []

    def spy(seqs):
        phase[0] = len(seqs)
        steps.append(len(seqs))
        try:
            return decode(seqs)
        finally:
            phase[0] = None

    eng._decode = spy
    outs = eng.generate([GenerationRequest(p, n=1, seed=3 + i, max_new_tokens=6)
                         for i, p in enumerate(PROMPTS[:5])])
    in_decode = [c for c in calls if c[0] is not None]
    assert steps and len(in_decode) == len(mlps) * len(steps)
    assert all(rows == step_rows and fused for step_rows, rows, fused in in_decode)
    # The decode's RoPE + KV write: the fused kernel in its eager-rounding variant, every layer.
    assert eng.runner.fused_rope_kv_enabled
    assert [c for c in rope_calls if c[0] is not None] == [(step_rows, True) for step_rows in steps
                                                           for _ in mlps]
    # ...and the prefill's (outside decode) is the same exact variant, every layer of each call
    in_prefill = [exact for phase_rows, exact in rope_calls if phase_rows is None]
    assert in_prefill and len(in_prefill) % len(mlps) == 0 and all(in_prefill)
    calls.clear()
    _assert_bitwise(model, outs, PROMPTS, 1.0, list(range(len(outs))))
    assert len(calls) == len(mlps) and all(fused for _, _, fused in calls)

    exact = mlp_grads(mlps[0])  # outside the mode: only the activation differs from default
    for name, a, b in zip(["out", "d_x"] + [n for n, _ in mlps[0].named_parameters()], exact, default):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2,
                                   atol=2e-2 * float(b.float().abs().max()), msg=name)
    remove_exact_forward(model)
    assert all(m.activation_func is F.silu and m.config is model[0].config for m in mlps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_rope_kv_write_equals_eager_bitwise(dtype):
    """The fused RoPE + KV write with exact=True (rollout.exact's decode) gives the eager ops'
    bits on this GPU: q and both caches equal the reference, which rounds each product and the
    sum as the training forward's RoPE does."""
    from r1mega.rollout import triton_rope_kv as R
    from tests.unit.test_rollout_rope_kv_triton import SHAPES, make_inputs

    if not R.HAVE_TRITON:
        pytest.skip("no triton")
    # + the 852M shape's decode: 16 q heads over 4 KV groups of 128, 256 rows.
    for i, shape in enumerate(SHAPES + [(256, 4, 4, 128, 16, False)]):
        qkv, cos, sin, slots, kc, vc = make_inputs(*shape, dtype, seed=i, device="cuda")
        kc_got, vc_got = kc.clone(), vc.clone()
        q_ref = R.rope_kv_write_reference(qkv, cos, sin, slots, kc, vc)
        q_got = torch.full_like(q_ref, float("nan"))
        R.rope_kv_write_triton(qkv, cos, sin, slots, kc_got, vc_got, out=q_got, exact=True)
        for name, got, ref in (("q", q_got, q_ref), ("k_cache", kc_got, kc), ("v_cache", vc_got, vc)):
            assert torch.equal(got, ref), \
                f"{shape}: {name} max |diff| {float((got.float() - ref.float()).abs().max()):.3e}"
