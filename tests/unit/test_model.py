"""The Llama/Qwen family on megatron-core, single CPU rank: against independent references.

References: a per-sequence naive softmax attention (for the packed core attention), running each
sequence on its own (packing must not leak across sequences), and Hugging Face transformers'
Llama/Qwen2/Qwen3 with the same weights copied in (RoPE convention, GQA layout, SwiGLU order,
norms, QKV bias, QK-norm, tied/untied embeddings).
"""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.config import ModelConfig
from r1mega.models.attention import block_causal_mask, make_packed_seqs, sdpa_packed
from r1mega.models.gpt import build_model, count_parameters, padded_vocab_size


def naive_attention(q, k, v, lengths, scale):
    """Per sequence, explicit softmax(QK^T) V with a causal mask; GQA by repeating KV heads."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    outs, s = [], 0
    for n in lengths:
        qs, ks, vs = q[s:s + n], k[s:s + n], v[s:s + n]  # (n, H, D)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        s += n
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[5, 9, 3, 1], [4, 4, 4]])
def test_packed_sdpa_matches_naive_attention(lengths):
    torch.manual_seed(0)
    T, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = (torch.randn(T, h, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    out = sdpa_packed(q, k, v, lengths, scale=None)
    ref = naive_attention(q, k, v, lengths, 1 / math.sqrt(d))
    torch.testing.assert_close(out, ref)


def test_block_causal_mask_small():
    m = block_causal_mask([2, 1], "cpu")
    assert m.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_padded_vocab_size():
    assert padded_vocab_size(128, 64, 1) == 128
    assert padded_vocab_size(129, 64, 2) == 256
    assert padded_vocab_size(49152, 128, 4) == 49152
    assert padded_vocab_size(151936, 128, 8) == 152576


FAMILIES = {
    "llama": dict(family="llama"),
    "qwen2_untied": dict(family="qwen2", qkv_bias=True, tied_embeddings=False, rope_theta=1e6),
    "qwen3": dict(family="qwen3", qk_norm=True, rope_theta=1e6),
}


def _forward(model, ids, lengths):
    ps = make_packed_seqs(lengths, "cpu")
    return model(input_ids=ids, position_ids=None, attention_mask=None, packed_seq_params=ps)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packing_does_not_leak_and_backward_reaches_every_param(single_rank_runtime, name):
    rt = single_rank_runtime()
    cfg = ModelConfig(**FAMILIES[name])
    model = build_model(cfg, rt, wrap=False)[0]
    lengths = [5, 9, 3]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)))
    logits = _forward(model, ids, lengths)  # (1, T, V)
    assert logits.shape == (1, sum(lengths), padded_vocab_size(cfg.vocab_size, 64, 1))
    alone, s = [], 0
    for n in lengths:
        alone.append(_forward(model, ids[:, s:s + n], [n]))
        s += n
    torch.testing.assert_close(logits, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


def _hf_model(cfg: ModelConfig):
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tied_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=0.0,
    )
    if cfg.qk_norm:
        conf = transformers.Qwen3Config(head_dim=cfg.hidden_size // cfg.num_attention_heads, **common)
        return transformers.Qwen3ForCausalLM(conf)
    if cfg.qkv_bias:
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def _copy_megatron_to_hf(model, hf, cfg: ModelConfig):
    """Megatron QKV is grouped: per KV group [q heads of the group; k; v]."""
    sd = model.state_dict()
    hq, hkv, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.hidden_size // cfg.num_attention_heads
    per = hq // hkv
    V = cfg.vocab_size
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:V],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"][:V]
    for i in range(cfg.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            w = sd[p + f"self_attention.linear_qkv.{kind}"]
            w = w.view(hkv, per + 2, d, *w.shape[1:])
            out[q + f"self_attn.q_proj.{kind}"] = w[:, :per].reshape(hq * d, *w.shape[3:])
            out[q + f"self_attn.k_proj.{kind}"] = w[:, per].reshape(hkv * d, *w.shape[3:])
            out[q + f"self_attn.v_proj.{kind}"] = w[:, per + 1].reshape(hkv * d, *w.shape[3:])
        out[q + "self_attn.o_proj.weight"] = sd[p + "self_attention.linear_proj.weight"]
        gate, up = sd[p + "mlp.linear_fc1.weight"].chunk(2)
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate, up
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.linear_fc2.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "pre_mlp_layernorm.weight"]
        if cfg.qk_norm:
            out[q + "self_attn.q_norm.weight"] = sd[p + "self_attention.q_layernorm.weight"]
            out[q + "self_attn.k_norm.weight"] = sd[p + "self_attention.k_layernorm.weight"]
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), missing


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_huggingface(single_rank_runtime, name):
    rt = single_rank_runtime()
    cfg = ModelConfig(**FAMILIES[name])
    model = build_model(cfg, rt, wrap=False)[0]
    with torch.no_grad():  # non-trivial norm weights so that a missing norm would show
        for pname, p in model.named_parameters():
            if "layernorm" in pname:
                p.uniform_(0.5, 1.5)
    hf = _hf_model(cfg).float().eval()
    _copy_megatron_to_hf(model, hf, cfg)
    lengths = [7, 4]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)))
    with torch.no_grad():
        ours = _forward(model, ids, lengths)[0, :, :cfg.vocab_size]
        ref = torch.cat([hf(ids[:, :7]).logits[0], hf(ids[:, 7:]).logits[0]])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_equal_length_batch_matches_packed(single_rank_runtime):
    """TrainStep runs equal-length micro-batches as a (B, S) batch: same logits as THD packing."""
    rt = single_rank_runtime()
    cfg = ModelConfig(**FAMILIES["qwen3"])
    model = build_model(cfg, rt, wrap=False)[0]
    ids = torch.randint(0, cfg.vocab_size, (3, 8))
    with torch.no_grad():
        batched = model(input_ids=ids, position_ids=None, attention_mask=None)  # (B, S, V)
        packed = _forward(model, ids.reshape(1, -1), [8, 8, 8])  # (1, T, V)
    torch.testing.assert_close(batched.reshape(1, 24, -1), packed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recomputation_gives_identical_gradients(single_rank_runtime, recompute):
    rt = single_rank_runtime()
    grads = {}
    for mode in ("none", recompute):
        model = build_model(ModelConfig(recompute=mode), rt, wrap=False)[0]
        if mode == "none":
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
        _forward(model, ids, [12, 8]).logsumexp(-1).sum().backward()
        grads[mode] = {k: p.grad for k, p in model.named_parameters()}
    for k, g in grads["none"].items():
        torch.testing.assert_close(grads[recompute][k], g, atol=1e-6, rtol=1e-5)
