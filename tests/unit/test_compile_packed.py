"""Packed THD micro-batches through compiled layers (r1mega.models.compile): one region per layer,
no graph breaks, one graph for every total / length mix / max length, eager's loss and grads.

The layers compile with the "aot_eager" backend: the same dynamo graphs, guards and AOTAutograd
backward as inductor, without C++ code generation (inductor on 2 CPU cores takes ~40 s for this
model); tests/gpu/test_compile_packed_gpu.py runs inductor.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from r1mega.config import ModelConfig, PrecisionConfig
from r1mega.models import attention as A

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, vocab_size=256, tied_embeddings=False, max_position_embeddings=256)
# Different totals, sequence counts and max lengths; one sequence, a length-1 one, equal lengths
# (eager takes its (B, S) shortcut there, the traced path its mask).
BATCHES = ([5, 9, 3, 7], [11, 2, 6], [30], [1, 17, 4, 8, 3], [6, 6, 6])


def _build(rt, backend="sdpa"):
    from r1mega.models.gpt import build_model, unwrap

    cfg = ModelConfig(**TINY, attention_backend=backend)
    return unwrap(build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)[0])


def _loss_and_grads(model, ids, packed):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=None, attention_mask=None, packed_seq_params=packed)
    loss = logits.float().logsumexp(-1).mean()  # (1, T, V) -> scalar
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(ref, got):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for name, g in ref[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def _compiled_frames() -> int:
    return counters["frames"]["total"]



def _check_against_eager(eager, compiled, batches):
    """Train-mode fwd+bwd and no_grad forward of each batch; returns dynamo frames per batch."""
    g = torch.Generator().manual_seed(0)
    frames = []
    for lengths in batches:
        packed = A.make_packed_seqs(lengths, "cpu")
        ids = torch.randint(0, TINY["vocab_size"], (1, sum(lengths)), generator=g)
        _compare(_loss_and_grads(eager, ids, packed), _loss_and_grads(compiled, ids, packed))
        with torch.no_grad():  # the forward-only log-prob passes: own graph, same rules
            want, got = (m(input_ids=ids, position_ids=None, attention_mask=None,
                           packed_seq_params=packed) for m in (eager, compiled))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        frames.append(_compiled_frames())
    return frames


def test_traced_mask_equals_a_hand_built_mask():
    for lengths in ([5, 1, 9, 3], [7], [4, 4]):
        cu = A.make_packed_seqs(lengths, "cpu").cu_seqlens_q
        seq = [i for i, n in enumerate(lengths) for _ in range(n)]
        want = [[seq[r] == seq[c] and c <= r for c in range(len(seq))] for r in range(len(seq))]
        assert A.block_causal_mask_from_cu(cu, sum(lengths)).tolist() == want


def test_compile_packed_seqs_drops_host_lengths_and_buckets_max_len():
    packed = A.make_packed_seqs([100, 129, 3], "cpu")
    made = A.compile_packed_seqs(packed)
    assert not hasattr(made, "seq_lengths")  # a host tuple would be guarded on by value
    assert made.cu_seqlens_q is packed.cu_seqlens_q
    assert (made.max_seqlen_q, made.max_seqlen_kv) == (256, 256)
    assert A.compile_packed_seqs(packed) is made  # once per micro-batch, shared by the layers
    assert [A.max_seqlen_bucket(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 384]


def test_traced_rope_gather_matches_the_cached_one(fresh_dynamo):
    from r1mega.models import packed_rope

    cu = torch.tensor([0, 3, 4, 8, 13], dtype=torch.int32)
    freqs = torch.randn(6, 1, 1, 8)  # (max_s, 1, 1, d), max_s < T
    traced = torch.compile(packed_rope.packed_freqs, backend="eager", fullgraph=True)
    assert torch.equal(traced(freqs, cu, 13), packed_rope.packed_freqs(freqs, cu, 13))
    per_token = packed_rope.packed_freqs(freqs, cu, 13)  # the form compile_layers hands over
    assert torch.equal(traced(per_token, cu, 13), per_token)  # exact mapping: no second gather


def test_packed_layer_has_no_graph_breaks(rt_fp32, fresh_dynamo):
    from r1mega.models.compile import layer_graph_breaks

    model = _build(rt_fp32)
    lengths = [5, 9, 3, 7]
    x = torch.randn(sum(lengths), 1, TINY["hidden_size"], requires_grad=True)  # (T, 1, H)
    rope = model.rotary_pos_emb(max(lengths), packed_seq=True)  # (max_s, 1, 1, d)
    assert layer_graph_breaks(model.decoder.layers[0], x, attention_mask=None, rotary_pos_emb=rope,
                              packed_seq_params=A.make_packed_seqs(lengths, "cpu")) == []


def test_compiled_packed_layers_match_eager_with_one_graph(rt_fp32, fresh_dynamo):
    from r1mega.models.compile import compile_layers

    eager = _build(rt_fp32)
    compiled = _build(rt_fp32)
    compiled.load_state_dict(eager.state_dict())
    assert compile_layers([compiled], backend="aot_eager") == TINY["num_layers"]
    frames = _check_against_eager(eager, compiled, BATCHES)
    # One graph per layer and grad mode, made by the first batch; none after.
    assert frames == [2 * TINY["num_layers"]] * len(BATCHES)
    assert counters["frames"]["ok"] == frames[-1]
    assert not counters["graph_break"]


# ----------------------------------------------------------------------------- varlen, traced
# torch's varlen attention is a custom op whose kernel is CUDA only. A CPU kernel of the same op
# (a reference through SDPA) lets the GPU's traced path run here: the same graph, the op opaque in
# it, its max_seqlen a symbolic int.

_MAX_Q_SEEN: list = []


def _varlen_fwd_cpu(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                    scale=None, window_size=None, enable_gqa=False, seqused_k=None,
                    block_table=None, num_splits=None):
    assert is_causal and list(window_size) == [-1, 0] and cu_seq_k is cu_seq_q
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    _MAX_Q_SEEN.append((max_q, max(lengths)))
    out = A.sdpa_packed(query, key, value, lengths, scale)
    lse = torch.zeros(query.shape[1], query.shape[0])  # only flash's own backward reads it
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def _varlen_bwd_cpu(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k,
                    is_causal, rng_state, scale=None, window_size=None):
    # Written out by hand: inside an op's kernel autograd is off, so SDPA cannot be differentiated.
    hq, hkv, d = query.shape[1], key.shape[1], query.shape[2]
    scale = d ** -0.5 if scale is None else scale
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    allowed = A.block_causal_mask(lengths, query.device)  # (T, T)
    q, do = query.transpose(0, 1), grad_out.transpose(0, 1)  # (Hq, T, D)
    k, v = (t.repeat_interleave(hq // hkv, dim=1).transpose(0, 1) for t in (key, value))
    p = (q @ k.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
    dp = do @ v.transpose(1, 2)  # (Hq, T, T)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ds @ k * scale
    dk = (ds.transpose(1, 2) @ q * scale).view(hkv, hq // hkv, -1, d).sum(1)  # group's heads
    dv = (p.transpose(1, 2) @ do).view(hkv, hq // hkv, -1, d).sum(1)
    return dq.transpose(0, 1).contiguous(), dk.transpose(0, 1).contiguous(), dv.transpose(0, 1).contiguous()


@pytest.fixture()
def varlen_on_cpu():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    ops = ((varlen._varlen_attn, _varlen_fwd_cpu), (varlen._varlen_attn_backward, _varlen_bwd_cpu))
    for op, kernel in ops:
        op.register_kernel("cpu", kernel)
        op._disabled_kernel.discard("cpu")
    _MAX_Q_SEEN.clear()
    yield
    for op, _ in ops:  # back to torch's own (CUDA only) implementation for later tests
        op._disabled_kernel.add("cpu")


def test_traced_varlen_path_matches_sdpa_across_max_len_buckets(rt_fp32, fresh_dynamo,
                                                                  varlen_on_cpu):
    from r1mega.models.compile import compile_layers

    if A._torch_varlen is None:
        pytest.skip("torch.nn.attention.varlen not available")
    eager = _build(rt_fp32, "sdpa")  # the reference: host lengths, block-diagonal mask
    compiled = _build(rt_fp32, "varlen")
    compiled.load_state_dict(eager.state_dict())
    compile_layers([compiled], backend="aot_eager")
    batches = ([40, 150, 20], [30, 60, 7], [200, 10])  # max length buckets 256, 128, 256
    frames = _check_against_eager(eager, compiled, batches)
    assert frames == [2 * TINY["num_layers"]] * len(batches)  # the bucket is not a constant
    buckets = {(max_q, true_max) for max_q, true_max in _MAX_Q_SEEN}
    assert buckets == {(256, 150), (128, 60), (256, 200)}


# ----------------------------------------------------------------------------- the trainer's roles


def test_policy_with_compile_layers_trains_like_eager(rt_fp32, fresh_dynamo, monkeypatch):
    """model.compile_layers through Policy: megatron's schedule, DDP hooks, packed micro-batches of
    two sizes, the optimizer step and the forward-only log-prob pass (eval, no_grad)."""
    import functools

    from r1mega.config import OptimizerConfig
    from r1mega.models import compile as compile_mod
    from r1mega.train.roles import Policy
    from r1mega.train.step import sft_loss_fn, sft_sample, vocab_parallel_target_logprobs

    monkeypatch.setattr(compile_mod, "compile_layers",
                        functools.partial(compile_mod.compile_layers, backend="aot_eager"))
    policies = []
    for enabled in (False, True):
        cfg = ModelConfig(**TINY, attention_backend="sdpa", compile_layers=enabled)
        policies.append(Policy.build(cfg, PrecisionConfig(dtype="fp32"), OptimizerConfig(lr=1e-2),
                                     rt_fp32, distributed_optimizer=False, micro_batch_tokens=32,
                                     total_steps=2))
    eager, compiled = policies
    compiled.modules()[0].load_state_dict(eager.modules()[0].state_dict())
    assert all(hasattr(layer.forward, "r1mega_compiled")
               for layer in compiled.modules()[0].decoder.layers)

    def logprobs(logits_shard, mb):
        return vocab_parallel_target_logprobs(logits_shard, mb.fields["labels"],
                                              vocab_size=TINY["vocab_size"])

    g = torch.Generator().manual_seed(0)
    loss_fn = sft_loss_fn(TINY["vocab_size"])
    frames = []
    for lengths in ([9, 14, 5, 20, 7], [3, 25, 11]):  # two micro-batches, then one
        samples = [sft_sample(torch.randint(0, TINY["vocab_size"], (n,), generator=g))
                   for n in lengths]
        results = [p.update(samples, loss_fn) for p in policies]
        torch.testing.assert_close(results[1].loss, results[0].loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[1].grad_norm, results[0].grad_norm, rtol=1e-4, atol=1e-6)
        want, got = (p.forward_only(samples, logprobs) for p in policies)
        for w, o in zip(want, got):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
        frames.append(_compiled_frames())
    # train (grad) and eval (no_grad) graphs per layer from the first step; none after
    assert frames == [2 * TINY["num_layers"]] * 2
    for (name, w), c in zip(eager.modules()[0].named_parameters(),
                            compiled.modules()[0].parameters()):
        torch.testing.assert_close(c, w, rtol=1e-4, atol=1e-6, msg=name)
