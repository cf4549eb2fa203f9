"""Tiny randomly initialised Hugging Face checkpoints, written by transformers itself.

For tests (here and in other packages: ``model.init_from_hf`` needs an HF dir) and demos. The
weights are drawn with a large std and the norms/biases perturbed, so a conversion bug moves the
logits by O(1) instead of hiding in near-zero activations.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Optional

import torch

FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_hf_dir(out_dir: str, family: str = "llama", *, vocab_size: int = 97, hidden_size: int = 48,
                     num_attention_heads: int = 4, num_key_value_heads: int = 2, num_layers: int = 2,
                     intermediate_size: int = 80, tied: bool = False, dtype: torch.dtype = torch.float32,
                     seed: int = 0, max_shard_size: Optional[str] = None, std: float = 0.2,
                     with_tokenizer: bool = True, head_dim: Optional[int] = None,
                     rope_scaling: Optional[dict] = None, moe: Optional[dict] = None) -> str:
    """Save a random ``family`` model with transformers' ``save_pretrained`` into ``out_dir``.

    ``rope_scaling`` is HF's dict (e.g. ``{"rope_type": "llama3", "factor": ...}``); transformers
    4.x and 5.x both take it under that name. ``moe``: Qwen3-MoE config keys (num_experts,
    num_experts_per_tok, moe_intermediate_size, norm_topk_prob, mlp_only_layers, ...).
    """
    import transformers

    cfg_name, model_name = FAMILY_CLASSES[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, num_hidden_layers=num_layers,
                  intermediate_size=intermediate_size, tie_word_embeddings=tied, initializer_range=std,
                  max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    if family in ("qwen3", "qwen3_moe"):
        kwargs["head_dim"] = head_dim or hidden_size // num_attention_heads
    if family == "qwen3_moe":
        kwargs.update(dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           norm_topk_prob=True), **(moe or {}))
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)  # ones/zeros would hide a swapped norm or bias
    model.to(dtype)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    if with_tokenizer:
        # Stand-ins for the tokenizer files a real checkpoint carries (copied verbatim).
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 256, "marker": f"tiny-{family}-{seed}"}, f)
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return out_dir


def load_safetensors_dir(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a HF dir (single file or sharded), by name."""
    from r1mega.convert.hf_io import HFCheckpoint

    ckpt = HFCheckpoint(hf_dir)
    return {n: ckpt.get(n) for n in ckpt.names()}
