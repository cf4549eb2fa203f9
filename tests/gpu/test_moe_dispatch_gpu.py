"""MoE dispatch CUDA kernels vs the PyTorch reference, on fresh random inputs with outputs poisoned
first: routing metadata (int32/int64 indices, padding, experts with no tokens, many blocks),
permute, unpermute + combine, and both backwards."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from r1mega.moe import _cuda_ext  # noqa: E402
from r1mega.moe.dispatch import (permute_tokens, reference_routing_metadata, routing_metadata,  # noqa: E402
                                 unpermute_tokens)


@pytest.fixture(scope="module")
def ext():
    module = _cuda_ext.get()
    assert module is not None, f"r1mega_moe_cuda did not load: {_cuda_ext.load_error()}"
    return module


def _poison_allocator(nbytes=1 << 30):
    """Fill cached, free device memory with NaN so a kernel that skips an output element shows."""
    junk = [torch.full((nbytes // 4,), float("nan"), device="cuda")]
    junk += [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]
    del junk


def _routes(num_tokens, topk, num_experts, seed, dead=(), dtype=torch.long, skew=0.0):
    """Distinct experts per token from (optionally skewed) random scores; ``dead`` never chosen."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, device="cuda", generator=g)
    scores += skew * torch.linspace(0, 1, num_experts, device="cuda")
    if dead:
        scores[:, list(dead)] = -1.0
    return scores.topk(topk, dim=-1).indices.to(dtype)


SHAPES = [  # tokens, topk, experts, hidden, align, dead experts, dtype
    (1, 1, 4, 8, 1, (), torch.bfloat16),
    (333, 8, 64, 200, 16, (0, 5, 63), torch.bfloat16),   # hidden not a multiple of 8 -> narrower vectors
    (1000, 6, 256, 7168 // 8, 128, tuple(range(0, 256, 7)), torch.bfloat16),
    (4097, 2, 1024, 64, 1, (), torch.float32),         # the most experts the kernel takes
    (20000, 8, 256, 128, 1, (), torch.bfloat16),       # many metadata blocks, several tiles each
    (77, 3, 9, 33, 4, (1,), torch.float16),            # odd hidden -> scalar path
]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_tokens,topk,num_experts,hidden,align,dead,dtype", SHAPES)
def test_metadata_kernel_matches_reference(ext, index_dtype, num_tokens, topk, num_experts, hidden, align, dead,
                                           dtype):
    idx = _routes(num_tokens, topk, num_experts, seed=num_tokens, dead=dead, dtype=index_dtype, skew=2.0)
    _poison_allocator()
    meta = routing_metadata(idx, num_experts, align=align, impl="cuda")
    ref = reference_routing_metadata(idx, num_experts, align)
    for name in ("counts", "offsets", "row_map", "src_entry"):
        assert torch.equal(getattr(meta, name), getattr(ref, name)), name
    for e in dead:
        assert int(meta.counts[e]) == 0


@pytest.mark.parametrize("num_tokens,topk,num_experts,hidden,align,dead,dtype", SHAPES)
def test_permute_unpermute_kernels_match_reference(ext, num_tokens, topk, num_experts, hidden, align, dead, dtype):
    idx = _routes(num_tokens, topk, num_experts, seed=7 + num_tokens, dead=dead)
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    meta = routing_metadata(idx, num_experts, align=align, impl="cuda")
    x = torch.randn(num_tokens, hidden, device="cuda", generator=g).to(dtype)
    y = torch.randn(meta.num_rows, hidden, device="cuda", generator=g).to(dtype)
    w = torch.rand(num_tokens, topk, device="cuda", generator=g)
    g_perm = torch.randn(meta.num_rows, hidden, device="cuda", generator=g).to(dtype)
    g_out = torch.randn(num_tokens, hidden, device="cuda", generator=g).to(dtype)

    results = {}
    for impl in ("cuda", "torch"):
        xi = x.clone().requires_grad_(True)
        yi = y.clone().requires_grad_(True)
        wi = w.clone().requires_grad_(True)
        _poison_allocator()
        p = permute_tokens(xi, meta, impl=impl)
        p.backward(g_perm)
        _poison_allocator()
        u = unpermute_tokens(yi, wi, meta, impl=impl)
        u.backward(g_out)
        s = unpermute_tokens(y, None, meta, impl=impl)
        torch.cuda.synchronize()
        results[impl] = (p.detach(), xi.grad, u.detach(), yi.grad, wi.grad, s)
    names = ("permute", "permute.grad_x", "unpermute", "unpermute.grad_y", "unpermute.grad_w", "sum")
    for name, got, want in zip(names, results["cuda"], results["torch"]):
        assert bool(torch.isfinite(got).all()), f"{name}: non-finite (an element the kernel skipped)"
        if name in ("permute", "unpermute.grad_y"):
            assert torch.equal(got, want), name  # copies and one product per element: exact
        else:
            # float32 accumulation in both; the order of the k (or H) terms may differ
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=name)
    padding = meta.src_entry < 0
    assert torch.count_nonzero(results["cuda"][0][padding]) == 0
    assert torch.count_nonzero(results["cuda"][3][padding]) == 0


def test_zero_tokens_and_out_of_range_entries(ext):
    empty = torch.empty(0, 4, dtype=torch.long, device="cuda")
    meta = routing_metadata(empty, 8, align=16, impl="cuda")
    assert meta.counts.tolist() == [0] * 8 and meta.offsets.tolist() == [0] * 9
    assert bool((meta.src_entry == -1).all())
    idx = torch.tensor([[0, 9], [3, 0]], device="cuda")
    got = routing_metadata(idx, 4, impl="cuda", validate=False)
    ref = reference_routing_metadata(idx, 4)
    assert torch.equal(got.row_map, ref.row_map) and got.row_map[0, 1] == -1
    x = torch.randn(2, 16, device="cuda")
    torch.testing.assert_close(unpermute_tokens(permute_tokens(x, got, impl="cuda"), None, got, impl="cuda"),
                               x * torch.tensor([[1.0], [2.0]], device="cuda"))


def test_expert_counts_alternating_between_calls(ext):
    """The kernel's shared-memory limit is per kernel, not per launch: a small expert count after a
    large one must not break the next large one (it once did)."""
    for num_experts in (1024, 4, 1024, 256, 4):
        idx = _routes(300, 2, num_experts, seed=num_experts)
        got = routing_metadata(idx, num_experts, impl="cuda")
        assert torch.equal(got.row_map, reference_routing_metadata(idx, num_experts).row_map), num_experts
