"""MoE dispatch references (r1mega/moe/dispatch.py) against naive per-token loops: routing
metadata, permute / unpermute + combine, empty experts, padding, and gradients by gradcheck."""
import pytest
import torch

from r1mega.moe.dispatch import (num_permuted_rows, permute_tokens, routing_metadata, unpermute_tokens)


def _routes(num_tokens, topk, num_experts, seed, skip=()):
    """Distinct experts per token (as a router gives), never choosing the experts in ``skip``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip])
    rows = [allowed[torch.randperm(len(allowed), generator=g)[:topk]] for _ in range(num_tokens)]
    return torch.stack(rows) if rows else torch.empty(0, topk, dtype=torch.long)


def _naive_metadata(indices, num_experts, align):
    """Expert by expert, token by token: the layout contract written as loops."""
    counts = [0] * num_experts
    for t in range(indices.shape[0]):
        for e in indices[t].tolist():
            counts[e] += 1
    offsets = [0]
    for e in range(num_experts):
        offsets.append(offsets[-1] + -(-counts[e] // align) * align)
    row_map = torch.full(indices.shape, -1, dtype=torch.int32)
    src = torch.full((num_permuted_rows(*indices.shape, num_experts, align),), -1, dtype=torch.int32)
    for e in range(num_experts):
        row = offsets[e]
        for t in range(indices.shape[0]):
            for j, ej in enumerate(indices[t].tolist()):
                if ej == e:
                    row_map[t, j] = row
                    src[row] = t * indices.shape[1] + j
                    row += 1
    return torch.tensor(counts, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32), row_map, src


@pytest.mark.parametrize("num_tokens,topk,num_experts,align,skip", [
    (13, 3, 8, 1, ()),
    (13, 3, 8, 4, (2, 5)),   # padding and experts with no tokens
    (40, 2, 5, 16, (0,)),    # align larger than any expert's load
    (0, 2, 4, 8, ()),        # no tokens at all
    (9, 1, 3, 1, (0, 1)),    # every token to one expert
])
def test_metadata_matches_naive(num_tokens, topk, num_experts, align, skip):
    idx = _routes(num_tokens, topk, num_experts, seed=num_tokens + align, skip=skip)
    meta = routing_metadata(idx, num_experts, align=align)
    counts, offsets, row_map, src = _naive_metadata(idx, num_experts, align)
    assert torch.equal(meta.counts, counts)
    assert torch.equal(meta.offsets, offsets)
    assert torch.equal(meta.row_map, row_map)
    assert torch.equal(meta.src_entry, src)
    for e in skip:
        assert meta.counts[e] == 0 and meta.offsets[e] == meta.offsets[e + 1]


@pytest.mark.parametrize("align", [1, 8])
def test_permute_then_unpermute_is_identity_and_matches_loop(align):
    num_tokens, topk, num_experts, hidden = 21, 4, 10, 6
    idx = _routes(num_tokens, topk, num_experts, seed=11, skip=(3, 7))
    x = torch.randn(num_tokens, hidden, dtype=torch.float64)
    meta = routing_metadata(idx, num_experts, align=align)
    y = permute_tokens(x, meta)
    assert y.shape == (num_permuted_rows(num_tokens, topk, num_experts, align), hidden)
    # naive permute: for every expert, its tokens in token order, then zero rows
    for e in range(num_experts):
        start, stop = int(meta.offsets[e]), int(meta.offsets[e + 1])
        mine = [t for t in range(num_tokens) if e in idx[t].tolist()]
        for r, t in enumerate(mine):
            assert torch.equal(y[start + r], x[t])
        assert torch.count_nonzero(y[start + len(mine):stop]) == 0
    assert torch.count_nonzero(y[int(meta.offsets[-1]):]) == 0
    # weights summing to 1 per token make unpermute(permute(x)) the identity
    w = torch.rand(num_tokens, topk, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(unpermute_tokens(y, w, meta), x)
    torch.testing.assert_close(unpermute_tokens(y, None, meta), x * topk)


def test_unpermute_combine_matches_loop_with_float32_accumulation():
    num_tokens, topk, num_experts, hidden = 17, 3, 6, 8
    idx = _routes(num_tokens, topk, num_experts, seed=12)
    meta = routing_metadata(idx, num_experts, align=4)
    y = torch.randn(meta.num_rows, hidden).to(torch.bfloat16)
    w = torch.rand(num_tokens, topk)
    out = unpermute_tokens(y, w, meta)
    assert out.dtype == torch.bfloat16
    for t in range(num_tokens):
        acc = torch.zeros(hidden, dtype=torch.float32)
        for j in range(topk):
            acc += w[t, j] * y[int(meta.row_map[t, j])].float()
        assert torch.equal(out[t], acc.to(torch.bfloat16))


def test_gradcheck_permute_and_unpermute():
    num_tokens, topk, num_experts, hidden = 6, 2, 5, 3
    idx = _routes(num_tokens, topk, num_experts, seed=13, skip=(1,))
    meta = routing_metadata(idx, num_experts, align=4)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64, requires_grad=True)
    y = torch.randn(meta.num_rows, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.rand(num_tokens, topk, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: permute_tokens(a, meta), (x,))
    assert torch.autograd.gradcheck(lambda a, b: unpermute_tokens(a, b, meta), (y, w))
    assert torch.autograd.gradcheck(lambda a: unpermute_tokens(a, None, meta), (y,))
    # end to end, through an elementwise "expert": the chain rule across both Functions
    assert torch.autograd.gradcheck(lambda a, b: unpermute_tokens(torch.tanh(permute_tokens(a, meta)), b, meta),
                                    (x, w))


def test_padding_rows_get_zero_gradient():
    idx = _routes(5, 2, 4, seed=14)
    meta = routing_metadata(idx, 4, align=8)
    y = torch.randn(meta.num_rows, 3, requires_grad=True)
    unpermute_tokens(y, torch.rand(5, 2), meta).sum().backward()
    padding = meta.src_entry < 0
    assert bool(padding.any())
    assert torch.count_nonzero(y.grad[padding]) == 0
    assert bool((y.grad[~padding] != 0).all())


def test_bad_input_is_rejected_with_the_fix():
    idx = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match="expert index 5 outside"):
        routing_metadata(idx, 4)
    with pytest.raises(ValueError, match="int32/int64"):
        routing_metadata(idx.float(), 8)
    meta = routing_metadata(torch.tensor([[0, 1]]), 4)
    with pytest.raises(ValueError, match="permuted rows"):
        unpermute_tokens(torch.zeros(3, 2), torch.ones(1, 2), meta)
    with pytest.raises(ValueError, match="impl="):
        permute_tokens(torch.zeros(1, 2), meta, impl="triton")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        permute_tokens(torch.zeros(1, 2), meta, impl="cuda")
    # unvalidated out-of-range entries are dropped, not written out of bounds
    dropped = routing_metadata(idx, 4, validate=False)
    assert dropped.row_map.tolist() == [[0, -1]] and dropped.counts.tolist() == [1, 0, 0, 0]
