"""The exact mode's experimental kernels under Triton's interpreter (TRITON_INTERPRET=1 is set
before triton is imported, so they run in a spawned process; skipped where Triton is absent):

* the TMA variant of the batch-invariant GEMM (r1mega/ops/triton_batch_invariant.py) gives the
  plain kernel's result at every tile configuration, ragged M, N and K, float32 and float16 (the
  interpreter's bfloat16 dot is wrong), and float64's within float32 accumulation's error bound
  plus the output's rounding;
* the keys-major attention kernel (r1mega/ops/triton_exact_attention.py) against the PyTorch
  reference, and a query taken alone (a decode step's tile) against its packed training tile,
  for 16-, 64- and 128-column tiles and three head layouts.

Whether the GPU gives the same bits is for tests/gpu/test_exact_gpu.py and
test_exact_gemm_gpu.py; here the logic is checked: descriptors, offsets, masks and transposes.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.distributed.harness import run_ranks

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _interpreted(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.ops import triton_batch_invariant as tbi
    from r1mega.ops import triton_exact_attention as tea
    from r1mega.ops.exact_attention import exact_attention

    gemm = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        a = torch.randn(301, 1000, generator=g).to(dtype)
        b = torch.randn(777, 1000, generator=g).to(dtype).t()  # a linear layer's weight, transposed
        exact = a.double() @ b.double()
        # float32 accumulation over K = 1000 terms, then rounding to the output dtype
        bound = 1000 * 2.0 ** -24 * (a.double().abs() @ b.double().abs()) \
            + torch.finfo(dtype).eps / 2 * exact.abs()
        for t in (tbi.Tiles(64, 64, 64, 4, 3, 1), tbi.Tiles(128, 128, 64, 8, 3, 1),
                  tbi.Tiles(64, 32, 128, 4, 5, 1), tbi.Tiles(64, 128, 64, 4, 3, 1, ws=1),
                  tbi.Tiles(128, 256, 64, 4, 3, 1, ws=1)):
            out = torch.full((301, 777), float("nan"), dtype=dtype)
            out.copy_(tbi.matmul(a, b, tiles=t))
            plain = tbi.matmul(a, b, tiles=t._replace(tma=0, ws=0))
            gemm.append((str(dtype), tuple(t), torch.equal(out, plain),
                         float(((out.double() - exact).abs() / bound).max())))
    attn = []
    for hq, hkv, d in ((8, 2, 16), (12, 4, 32), (4, 4, 16)):
        lengths = [5, 300, 1, 140]
        t = sum(lengths)
        q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
        lens = torch.tensor(lengths)
        starts = torch.cumsum(lens, 0) - lens
        slots = (starts[:, None] + torch.arange(320)[None, :]).clamp(max=t - 1)
        q_seq = torch.repeat_interleave(torch.arange(len(lengths)), lens)
        q_pos = torch.arange(t) - starts[q_seq]
        scale = d ** -0.5
        ref = exact_attention(q, k[slots], v[slots], q_seq, q_pos, scale)
        packed = {cols: tea.exact_attention_slots(q, k, v, slots, q_seq, q_pos, scale,
                                                  _config=(cols, w, 0, 64, 1))
                  for cols, w in ((16, 4), (64, 8), (128, 8))}
        alone = tea.exact_attention_slots(q, k, v, slots, q_seq, q_pos, scale, decode_tiles=True,
                                          tiles=torch.ones(t, dtype=torch.int32),
                                          _config=(16, 4, 0, 64, 1))
        attn.append(((hq, hkv, d), {c: float((o - ref).abs().max()) for c, o in packed.items()},
                     all(torch.equal(alone, o) for o in packed.values())))
    return gemm, attn


@pytest.mark.slow
@needs_triton
def test_tma_gemm_and_keys_major_attention_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    (result,) = run_ranks(_interpreted, 1, timeout_s=900)
    gemm, attn = result
    for dtype, tiles, same, ratio in gemm:
        assert same, f"{dtype} {tiles}: the TMA kernel differs from the plain one"
        assert ratio <= 1, (dtype, tiles, ratio)  # within the accumulation's error bound
    for heads, errs, alone_equal in attn:
        assert max(errs.values()) < 1e-5, (heads, errs)
        assert alone_equal, f"{heads}: a query alone differs from its packed tile"


def _interpreted_chunks(rank, world):
    """K summed in chunks (R1MEGA_EXACT_GEMM_KCHUNKS=4, set before import): split tiles (a
    program per chunk, then the sum kernel) against the chunked LARGE, plain and TMA."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.ops import triton_batch_invariant as tbi

    assert tbi.K_CHUNKS == 4 and tbi.chunk_len(1000) == 256   # chunks 256, 256, 256, 232
    g = torch.Generator().manual_seed(1)
    out = []
    for dtype in (torch.float32, torch.float16):
        a = torch.randn(301, 1000, generator=g).to(dtype)
        b = torch.randn(777, 1000, generator=g).to(dtype).t()
        exact = a.double() @ b.double()
        bound = 1000 * 2.0 ** -24 * (a.double().abs() @ b.double().abs()) \
            + torch.finfo(dtype).eps / 2 * exact.abs()
        large = tbi.matmul(a, b, tiles=tbi.LARGE)
        # the interpreter's dot is numpy's: equal bits need equal BK (LARGE's 64) here; on the
        # GPU each chain is the MMA's whatever the BK (tests/gpu checks)
        splits = {t: tbi.matmul(a, b, tiles=t) for t in (
            tbi.Tiles(64, 128, 64, 4, 3, split=1), tbi.Tiles(128, 128, 64, 8, 3, split=1),
            tbi.Tiles(64, 64, 64, 4, 3, 1, split=1))}
        tbi.K_CHUNKS = 1
        one_chain = tbi.matmul(a, b, tiles=tbi.LARGE)
        tbi.K_CHUNKS = 4
        out.append((str(dtype), float(((large.double() - exact).abs() / bound).max()),
                    {tuple(t): torch.equal(o, large) for t, o in splits.items()},
                    torch.equal(large, one_chain)))
    return out


@pytest.mark.slow
@needs_triton
def test_split_k_chunks_give_the_chunked_large_tiles_bits_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("R1MEGA_EXACT_GEMM_KCHUNKS", "4")
    (result,) = run_ranks(_interpreted_chunks, 1, timeout_s=900)
    for dtype, ratio, split_equal, same_as_one_chain in result:
        assert ratio <= 1, (dtype, ratio)
        assert all(split_equal.values()), (dtype, split_equal)
        if dtype == "torch.float32":
            assert not same_as_one_chain   # the chunked sum is another order: it is in effect
