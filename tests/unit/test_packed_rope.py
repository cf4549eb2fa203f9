"""r1mega's packed (THD) RoPE equals megatron-core's per-sequence implementation exactly."""
import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import TransformerConfig

from r1mega.models import packed_rope


class _CP:
    def size(self):
        return 1

    def rank(self):
        return 0


def _config(interleaved=False):
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             rotary_interleaved=interleaved, apply_rope_fusion=False)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("lengths,max_s", [([5, 1, 9, 3], 16), ([7], 7), ([4, 4], 8)])
def test_packed_rope_matches_megatron_values_and_grads(interleaved, lengths, max_s):
    g = torch.Generator().manual_seed(0)
    total, d = sum(lengths), 16
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(max_s).float(), inv)
    freqs = (torch.cat([f, f], -1) if not interleaved else
             torch.stack([f, f], -1).view(max_s, d))[:, None, None, :]
    cfg = _config(interleaved)
    x = torch.randn(total, 3, d, generator=g, dtype=torch.float64)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = rope_utils._apply_rotary_pos_emb_thd(a, cu, freqs, rotary_interleaved=interleaved, cp_group=_CP())
    out = packed_rope.apply_rotary_pos_emb(b, freqs, cfg, cu_seqlens=cu, cp_group=_CP())
    assert torch.equal(out, ref)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_positions_restart_per_sequence_and_cache_follows_the_tensor():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert packed_rope.packed_positions(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    freqs = torch.arange(10.0)[:, None, None, None]
    first = packed_rope.packed_freqs(freqs, cu, 8)
    assert first.flatten().tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert packed_rope.packed_freqs(freqs, cu, 8) is first  # cached for the next layer
    other = torch.tensor([0, 2, 8], dtype=torch.int32)  # a new micro-batch: recomputed
    assert packed_rope.packed_freqs(freqs, other, 8).flatten().tolist() == [0, 1, 0, 1, 2, 3, 4, 5]


def test_non_thd_calls_go_to_megatron():
    cfg = _config()
    x = torch.randn(5, 2, 3, 16)
    freqs = torch.randn(5, 1, 1, 16)
    assert torch.equal(packed_rope.apply_rotary_pos_emb(x, freqs, cfg, cp_group=_CP()),
                       rope_utils.apply_rotary_pos_emb(x, freqs, cfg, cp_group=_CP()))
