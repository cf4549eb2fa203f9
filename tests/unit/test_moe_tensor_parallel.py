"""The token shares of r1mega/moe/tensor_parallel.py (forward-only MoE with tokens replicated
over TP): every token in exactly one share, in order, shares as equal as possible."""
from __future__ import annotations

import pytest
import torch

from r1mega.moe.tensor_parallel import share_sizes, token_share


@pytest.mark.parametrize("tokens,tp", [(7, 2), (8, 4), (1, 2), (0, 2), (5, 8)])
def test_shares_cover_every_token_once_in_order(tokens, tp):
    x = torch.arange(tokens * 3, dtype=torch.float32).view(tokens, 3)
    pieces = [token_share(x, r, tp) for r in range(tp)]
    sizes = pieces[0][1]
    assert all(s == sizes for _, s in pieces)
    assert sizes == share_sizes(tokens, tp) and sum(sizes) == tokens
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(torch.cat([p for p, _ in pieces]), x)
