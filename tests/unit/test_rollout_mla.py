"""MLA generation on the latent cache: absorbed attention equals the expanded (keys and values
rebuilt) form, and greedy tokens from the paged latent cache equal a full recomputation of the
model and transformers' generate() on the same converted DeepSeek-V3 checkpoint."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.rollout.adapters.mla import MLAGenerator, MLAPagedCache, absorbed_attention, expanded_attention  # noqa: E402


def test_absorbed_equals_expanded_attention():
    g = torch.Generator().manual_seed(0)
    n, dn, dr, dv, r, k = 4, 16, 8, 12, 32, 11
    q_nope, q_pe = torch.randn(3, n, dn, generator=g), torch.randn(3, n, dr, generator=g)
    latent, k_pe = torch.randn(k, r, generator=g), torch.randn(k, dr, generator=g)
    w_uk, w_uv = torch.randn(n, dn, r, generator=g) * 0.3, torch.randn(n, dv, r, generator=g) * 0.3
    pos = torch.tensor([4, 9, 10])  # includes a query that sees only part of the keys
    a = absorbed_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, 0.2, pos)
    b = expanded_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, 0.2, pos)
    assert a.shape == (3, n, dv)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_paged_cache_round_trips_rows_across_blocks():
    cache = MLAPagedCache(num_layers=2, num_blocks=8, block_tokens=4, latent_dim=6, rope_dim=2,
                          dtype=torch.float32, device="cpu")
    assert cache.bytes_per_token == 2 * 8 * 4
    cache.reserve(0, 3)
    cache.reserve(1, 5)
    lat, pe = torch.randn(5, 6), torch.randn(5, 2)
    cache.write(1, 1, torch.arange(5), lat, pe)
    cache.write(1, 0, torch.arange(3), lat[:3] * 2, pe[:3] * 2)
    got_lat, got_pe = cache.read(1, 1)
    assert torch.equal(got_lat, lat) and torch.equal(got_pe, pe)
    cache.reserve(1, 9)  # a third block, allocated after sequence 0's
    cache.write(1, 1, torch.arange(5, 9), lat[:4], pe[:4])
    assert torch.equal(cache.read(1, 1)[0][5:], lat[:4])
    assert torch.equal(cache.read(1, 0)[0], lat[:3] * 2)
    free = cache.allocator.num_free
    cache.release(1)
    assert cache.allocator.num_free == free + 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory, rt_fp32):
    from r1mega.config import PrecisionConfig
    from r1mega.convert.hf_bridge import load_hf_into_model
    from r1mega.convert.hf_config import model_config_from_hf
    from r1mega.convert.hf_io import HFCheckpoint
    from r1mega.models.deepseek_v3.hf_peer import make_tiny_deepseek_v3_dir
    from r1mega.models.gpt import build_model

    # std 0.1: a confident but non-degenerate model (no near-ties between the top two tokens).
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path_factory.mktemp("hf")), std=0.1)
    cfg = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config), spec="local")
    chunks = build_model(cfg, rt_fp32, PrecisionConfig(dtype="fp32"), wrap=False)
    load_hf_into_model(chunks, hf_dir, cfg, rt_fp32)
    chunks[0].eval()
    return hf_dir, cfg, chunks[0]


PROMPTS = [[5, 17, 3, 88, 41], [60, 2, 9], [33, 33, 70, 12, 1, 90, 4]]
NEW = 10


def _full_recompute(gpt, vocab, prompt):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            logits = gpt(torch.tensor([ids]), None, attention_mask=None)[0, -1, :vocab]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def references(converted):
    """Greedy continuations by full recomputation of our model and by transformers' generate()."""
    import transformers

    hf_dir, cfg, gpt = converted
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    return [_full_recompute(gpt, cfg.vocab_size, p) for p in PROMPTS], theirs


@pytest.mark.parametrize("absorbed", [True, False])
def test_greedy_tokens_equal_recomputation_and_transformers(converted, references, absorbed):
    _, cfg, gpt = converted
    # block_tokens 4: prompts and continuations cross block boundaries.
    got = MLAGenerator(gpt, cfg.vocab_size, block_tokens=4, absorbed=absorbed).generate(PROMPTS, NEW)
    recomputed, transformers_tokens = references
    assert got == recomputed
    assert got == transformers_tokens
    assert len({t for seq in got for t in seq}) > 3  # not a degenerate repetition


def test_cache_is_smaller_than_the_keys_and_values_it_replaces(converted):
    _, cfg, gpt = converted
    gen = MLAGenerator(gpt, cfg.vocab_size)
    a = cfg.mla
    full = cfg.num_layers * cfg.num_attention_heads * (a.q_head_dim + a.v_head_dim) * 4
    assert gen.cache.bytes_per_token == cfg.num_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 4 < full


def _engine(gpt, rt, **kw):
    from r1mega.config import RolloutConfig
    from r1mega.rollout.engine import RolloutEngine

    base = dict(kv_block_tokens=4, kv_cpu_tokens=4096, max_new_tokens=NEW, max_batch_sequences=64,
                temperature=0.0, cuda_graphs=False)
    base.update(kw)
    return RolloutEngine([gpt], RolloutConfig(**base), rt, eos_ids=[], vocab_size=VOCAB_OF(gpt))


def VOCAB_OF(gpt):  # noqa: N802 - the converted checkpoint's vocabulary, not the padded rows
    return 97


def test_rollout_engine_on_the_latent_cache_equals_recomputation(converted, references, rt_fp32):
    """The engine (continuous batching, paged cache, fresh prefill + decode steps) with the MLA
    adapter: greedy tokens equal the full recomputation and transformers' generate()."""
    from r1mega.rollout.types import GenerationRequest

    _, cfg, gpt = converted
    eng = _engine(gpt, rt_fp32)
    assert eng.runner.mla is not None and (eng.cache.shape.kv_heads, eng.cache.shape.head_dim) == (1, 40)
    # One latent row per token and layer, nothing else: 3 layers x (32 + 8) float32.
    assert eng.cache.shape.bytes_per_block == 3 * 40 * 4 * eng.block_tokens
    outs = eng.generate([GenerationRequest(p, n=1) for p in PROMPTS])
    recomputed, transformers_tokens = references
    assert [c.token_ids for c in outs] == recomputed == transformers_tokens


def test_rollout_engine_prefill_over_a_cached_prefix(converted, rt_fp32):
    """Tight cache: sequences are preempted and re-prefilled on top of cached blocks (the gather
    path), and the samples of one prompt share its blocks; greedy output is unchanged."""
    from r1mega.rollout.types import GenerationRequest

    _, cfg, gpt = converted
    roomy = _engine(gpt, rt_fp32).generate([GenerationRequest(p, n=2) for p in PROMPTS])
    tight = _engine(gpt, rt_fp32, kv_cpu_tokens=48, max_batch_sequences=3).generate(
        [GenerationRequest(p, n=2) for p in PROMPTS])
    assert [c.token_ids for c in tight] == [c.token_ids for c in roomy]
    assert all(c.token_ids == roomy[2 * (i // 2)].token_ids for i, c in enumerate(roomy))
