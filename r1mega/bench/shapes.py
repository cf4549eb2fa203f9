"""Named model shapes the benchmarks share (``r1mega bench NAME --model SHAPE``).

Each is a dict of ``ModelConfig`` keys, so one shape builds r1mega's model and, through the
bench's own translation, the transformers peer of the same shape. ``smoke`` variants are tiny
CPU shapes that check a bench script end to end.
"""
from __future__ import annotations

# The foundation issue's dense shape: 852M parameters, untied.
DENSE_852M = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=4,
                  ffn_hidden_size=5632, vocab_size=32000, tied_embeddings=False,
                  max_position_embeddings=4096, make_vocab_size_divisible_by=128)

# The FP8 issue's GEMM-heavier shape (Llama-3-8B's layer width, 8 layers).
GEMM_HEAVY = dict(num_layers=8, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                  ffn_hidden_size=14336, vocab_size=32000, tied_embeddings=False,
                  max_position_embeddings=4096, make_vocab_size_divisible_by=128)

# The multi-GPU issue's too-large-for-one-GPU shape: Llama-3-8B (8.0B parameters, untied, GQA 8),
# 18 bytes per parameter with the fp32 master weights: 145 GB, above one H200's 141 GB.
LLAMA3_8B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                 ffn_hidden_size=14336, vocab_size=128256, tied_embeddings=False,
                 max_position_embeddings=8192, make_vocab_size_divisible_by=128,
                 rope_theta=500000.0, norm_epsilon=1e-5)

# The MoE issue's benchmark shape: Qwen3-MoE layout (q/k norms, softmax top-k renormalised),
# 12 layers, hidden 2048, 32 heads of 128, 4 KV heads, 64 experts top-8 of width 768.
QWEN3_MOE_SMALL = dict(family="qwen3_moe", num_layers=12, hidden_size=2048, num_attention_heads=32,
                       num_query_groups=4, kv_channels=128, ffn_hidden_size=6144, qk_norm=True,
                       vocab_size=32000, tied_embeddings=False, max_position_embeddings=4096,
                       make_vocab_size_divisible_by=128, rope_theta=1000000.0, norm_epsilon=1e-6,
                       num_experts=64, moe_router_topk=8, moe_ffn_hidden_size=768,
                       moe_norm_topk_prob=True)

# The DeepSeek-V3 issue's benchmark shape: V3's layout (MLA with V3's latent and head sizes, YaRN,
# the first layer dense, group-limited sigmoid routing with routed scaling and one shared expert)
# at 12 layers, hidden 2048, 16 heads, 64 experts top-8 in 8 groups (4 chosen) of width 768.
# Without MTP: the transformers peer has none. Peer: r1mega.models.deepseek_v3.hf_peer.
DSV3_SMALL = dict(family="deepseek_v3", num_layers=12, hidden_size=2048, num_attention_heads=16,
                  num_query_groups=16, ffn_hidden_size=5632, vocab_size=32000, tied_embeddings=False,
                  max_position_embeddings=4096, make_vocab_size_divisible_by=128, norm_epsilon=1e-6,
                  mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                           qk_rope_head_dim=64, v_head_dim=128),
                  rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                  num_experts=64, moe_router="sigmoid_group", moe_router_topk=8,
                  moe_ffn_hidden_size=768, moe_shared_expert_ffn_hidden_size=768, moe_num_groups=8,
                  moe_topk_groups=4, moe_routed_scaling_factor=2.5, moe_first_k_dense=1)

DENSE_SMOKE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=128, vocab_size=256, tied_embeddings=False,
                   max_position_embeddings=256, make_vocab_size_divisible_by=128)

QWEN3_MOE_SMOKE = dict(family="qwen3_moe", num_layers=2, hidden_size=64, num_attention_heads=4,
                       num_query_groups=2, kv_channels=16, ffn_hidden_size=128, qk_norm=True,
                       vocab_size=256, tied_embeddings=False, max_position_embeddings=256,
                       make_vocab_size_divisible_by=128, num_experts=8, moe_router_topk=2,
                       moe_ffn_hidden_size=32, moe_norm_topk_prob=True)

DSV3_SMOKE = dict(family="deepseek_v3", num_layers=2, hidden_size=64, num_attention_heads=4,
                  num_query_groups=4, ffn_hidden_size=128, vocab_size=256, tied_embeddings=False,
                  max_position_embeddings=256, make_vocab_size_divisible_by=128, norm_epsilon=1e-6,
                  mla=dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                           v_head_dim=16),
                  rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                  num_experts=8, moe_router="sigmoid_group", moe_router_topk=2, moe_ffn_hidden_size=32,
                  moe_shared_expert_ffn_hidden_size=32, moe_num_groups=4, moe_topk_groups=2,
                  moe_routed_scaling_factor=2.5, moe_first_k_dense=1)

SHAPES = {"852m": DENSE_852M, "gemm-heavy": GEMM_HEAVY, "qwen3-moe-small": QWEN3_MOE_SMALL,
          "dsv3-small": DSV3_SMALL, "llama3-8b": LLAMA3_8B}
SMOKE = {"852m": DENSE_SMOKE, "llama3-8b": DENSE_SMOKE, "gemm-heavy": DENSE_SMOKE, "qwen3-moe-small": QWEN3_MOE_SMOKE,
         "dsv3-small": DSV3_SMOKE}


def get_shape(name: str, smoke: bool = False) -> dict:
    table = SMOKE if smoke else SHAPES
    if name not in table:
        raise SystemExit(f"unknown --model {name!r}; choose one of {sorted(table)}")
    import copy

    return copy.deepcopy(table[name])  # nested sections (mla, rope_scaling) are dicts too


def linear_gemms(shape: dict, tokens: int):
    """(name, M, N, K, b in 128x128 blocks) of each transformer-block linear's three GEMMs at
    ``tokens`` tokens (forward, dgrad, wgrad; b of forward and dgrad is the weight), for the
    FP8 GEMM sweeps (tools/blockwise_*_sweep.py)."""
    h, f = shape["hidden_size"], shape["ffn_hidden_size"]
    d = h // shape["num_attention_heads"]
    qkv = h + 2 * shape["num_query_groups"] * d
    for name, (out, inp) in {"qkv": (qkv, h), "o_proj": (h, h), "fc1": (2 * f, h), "fc2": (h, f)}.items():
        yield f"{name} fwd", tokens, out, inp, True
        yield f"{name} dgrad", tokens, inp, out, True
        yield f"{name} wgrad", out, inp, tokens, False
