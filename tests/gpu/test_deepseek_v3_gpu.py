"""The deepseek_v3 family on GPU in bf16 (skipped without CUDA): packed MLA attention through the
GPU backends equals SDPA, an SFT step with MTP updates every parameter, and rollout decode on the
latent cache through CUDA graphs / compiled decode equals eager decode."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def dsv3_model(**kw):
    from r1mega.config import ModelConfig
    from r1mega.models.deepseek_v3.hf_peer import TINY

    # V3's per-head widths (192 / 128) at a small hidden size, so the flash paths see them.
    base = dict(TINY, hidden_size=256, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=512,
                vocab_size=1000, spec="local",
                mla=dict(q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64,
                         v_head_dim=128),
                moe_ffn_hidden_size=128, moe_shared_expert_ffn_hidden_size=128, moe_bias_update_rate=0.01)
    base.update(kw)
    return ModelConfig(**base)


DENSE = dict(num_experts=0, moe_router="softmax", moe_router_topk=2, moe_ffn_hidden_size=0,
             moe_shared_expert_ffn_hidden_size=0, moe_num_groups=1, moe_topk_groups=1,
             moe_routed_scaling_factor=1.0, moe_first_k_dense=0, moe_bias_update_rate=0.0)


@pytest.mark.parametrize("backend", ["varlen", "flash", "auto"])
def test_packed_mla_forward_backends_equal_sdpa(single_rank_runtime, backend):
    from r1mega.config import PrecisionConfig
    from r1mega.models import attention as A
    from r1mega.models.gpt import build_model

    if backend == "varlen" and A._torch_varlen is None or backend == "flash" and A._flash_varlen is None:
        pytest.skip(f"{backend} kernels not installed")
    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    lengths = [37, 200, 5, 90]
    ids = torch.randint(0, 1000, (1, sum(lengths)), device="cuda")
    out, weights = {}, None
    for b in ("sdpa", backend):
        # Dense FFN: a bf16 difference of the attention backends could flip MoE routes, and a
        # rerouted token differs by far more than the attention tolerance
        gpt = build_model(dataclasses.replace(dsv3_model(attention_backend=b), **DENSE), rt, wrap=False)[0]
        # the same weights: megatron's CUDA RNG tracker is not reset by torch.manual_seed
        weights = weights or gpt.state_dict()
        gpt.load_state_dict(weights)
        with torch.no_grad():
            out[b] = gpt(ids, None, attention_mask=None,
                         packed_seq_params=A.make_packed_seqs(lengths, "cuda")).float()
    torch.testing.assert_close(out[backend], out["sdpa"], atol=5e-2, rtol=5e-2)


def test_sft_step_with_mtp_and_graph_decode(single_rank_runtime):
    from r1mega.config import OptimizerConfig, PrecisionConfig, RolloutConfig
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest
    from r1mega.train.roles import Policy
    from r1mega.train.step import sft_loss_fn, sft_sample

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    torch.manual_seed(0)
    policy = Policy.build(dsv3_model(mtp_num_layers=1), PrecisionConfig(dtype="bf16"),
                          OptimizerConfig(lr=1e-2), rt, distributed_optimizer=True,
                          micro_batch_tokens=512, total_steps=2)
    before = {n: p.detach().clone() for n, p in policy.modules()[0].named_parameters()}
    g = torch.Generator().manual_seed(1)
    samples = [sft_sample(torch.randint(0, 1000, (n,), generator=g)) for n in (40, 64, 17, 90)]
    res = policy.update(samples, sft_loss_fn(1000, mtp_weight=0.3))
    assert res.update_successful and res.loss == res.loss
    after = dict(policy.modules()[0].named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n].detach())]
    assert not unchanged, unchanged  # MTP modules included

    def decode(**kw):
        cfg = RolloutConfig(max_new_tokens=16, kv_block_tokens=16, max_batch_sequences=32,
                            temperature=0.0, **kw)
        eng = RolloutEngine(policy.modules(), cfg, rt, eos_ids=[], vocab_size=1000)
        assert eng.runner.mla is not None
        prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
        outs = eng.generate([GenerationRequest(p, n=1) for p in prompts])
        used = eng.graphs is not None
        eng.release()
        return [c.token_ids for c in outs], used

    eager, g0 = decode(cuda_graphs=False, compile_decode=False)
    graphed, g1 = decode(cuda_graphs=True, compile_decode=False)
    assert not g0
    assert g1, "MLA decode runs through CUDA graphs (Triton latent kernel, device-side MoE dispatch)"
    assert graphed == eager
    compiled, _ = decode(cuda_graphs=True, compile_decode=True)
    same = sum(a == b for a, b in zip(compiled, eager))
    print(f"compiled decode: {same}/{len(eager)} sequences equal eager greedy (bf16)")
    assert all(len(c) == 16 for c in compiled)


def test_engine_tokens_equal_training_forward_greedy(single_rank_runtime):
    """bf16 engine (fresh prefill + decode on the latent cache) vs greedy by full recomputation
    through the training forward, on a peaked random model; allows bf16 near-tie divergence late."""
    from r1mega.config import PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(dsv3_model(), num_experts=0, moe_router="softmax",
                                            moe_router_topk=2, moe_ffn_hidden_size=0,
                                            moe_shared_expert_ffn_hidden_size=0, moe_num_groups=1,
                                            moe_topk_groups=1, moe_routed_scaling_factor=1.0,
                                            moe_first_k_dense=0, moe_bias_update_rate=0.0), rt, wrap=False)
    with torch.no_grad():
        for p in model[0].parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    prompt = [(7 * j) % 1000 for j in range(21)]
    eng = RolloutEngine(model, RolloutConfig(max_new_tokens=8, kv_block_tokens=16, temperature=0.0,
                                             cuda_graphs=False), rt, eos_ids=[], vocab_size=1000)
    got = eng.generate([GenerationRequest(prompt, n=1)])[0].token_ids
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model[0](torch.tensor([seq], device="cuda"), None, attention_mask=None)[0, -1, :1000].argmax()))
    assert got[:4] == seq[len(prompt):][:4]
