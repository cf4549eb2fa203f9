"""rollout.exact's batch-invariant GEMM on CUDA (skipped without it): the Triton kernel against
torch.mm and invariant over row counts; every small-M, TMA, warp-specialised, cuBLASLt and split
configuration serving exactly where the device check found the large tile's bits; K summed in
fixed chunks. Self-contained: every reference is computed here."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k,n", [(2048, 3072), (2048, 5632 * 2), (5632, 2048), (64, 200)])
def test_triton_gemm_matches_mm_and_is_batch_invariant(dtype, k, n):
    from r1mega.ops import triton_batch_invariant as tbi

    if not tbi.HAVE_TRITON:
        pytest.skip("no triton")
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    x = torch.randn(1200, k, device="cuda", dtype=dtype)
    full = tbi.matmul(x, w.t())
    ref = (x.double() @ w.double().t())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(full.double(), ref, rtol=tol, atol=tol)
    for m in (1, 3, 8, 17, 64, 129, 513):
        assert torch.equal(tbi.matmul(x[:m], w.t()), full[:m]), m
        other = torch.cat([torch.randn(m, k, device="cuda", dtype=dtype), x[5:6]])
        assert torch.equal(tbi.matmul(other, w.t())[-1], full[5]), m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tma_tiles_serve_exactly_where_they_give_the_large_tiles_bits(dtype, monkeypatch):
    """Every configuration's TMA variant: the device check's verdict equals a direct comparison
    with LARGE at the model's shapes and decode to training row counts (a variant that fails to
    compile on this Triton must be refused by the check), and the automatic choice keeps bits."""
    from r1mega.ops import triton_batch_invariant as tbi

    if not tbi.HAVE_TRITON or tbi.TensorDescriptor is None:
        pytest.skip("no triton tensor descriptors")
    torch.manual_seed(3)
    dev = torch.device("cuda")
    cases = []
    for k, n in [(2048, 3072), (5632, 2048), (576, 1000), (64, 200)]:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
        for m in (1, 37, 256, 2048):
            cases.append((torch.randn(m, k, device="cuda", dtype=dtype), w))
    for tiles in dict.fromkeys(tbi.SMALL + (tbi.LARGE,) + tbi.WS_TILES):
        for tma in dict.fromkeys((tiles._replace(tma=1), tiles._replace(tma=1, ws=1))):  # and warp-specialised
            try:
                same = all(torch.equal(tbi.matmul(x, w.t(), tiles=tma), tbi.matmul(x, w.t(), tiles=tbi.LARGE))
                           for x, w in cases)
            except Exception:
                same = False
            assert tbi.tiles_usable(tma, dev, dtype) == same, tma
    monkeypatch.setattr(tbi, "TMA_CANDIDATES", True)
    monkeypatch.setattr(tbi, "WS_CANDIDATES", True)
    monkeypatch.setattr(tbi, "_choice", {})
    for x, w in cases:
        assert torch.equal(tbi.matmul(x, w.t()), tbi.matmul(x, w.t(), tiles=tbi.LARGE))


def test_cublaslt_algorithms_serve_exactly_where_they_give_the_large_tiles_bits(monkeypatch):
    """Every fixed cuBLASLt algorithm offered for the model's weight shapes (no K split): the
    device check's verdict equals a direct comparison with LARGE at decode and training row
    counts, and with the candidates on the automatic choice keeps LARGE's bits."""
    from r1mega.ops import triton_batch_invariant as tbi

    clt = tbi.clt
    if not tbi.HAVE_TRITON or clt.get() is None:
        pytest.skip(f"no triton, or no cuBLASLt extension: {clt.load_error()}")
    torch.manual_seed(5)
    dev = torch.device("cuda")
    verdicts = []
    cases = []
    for k, n in [(2048, 3072), (5632, 2048), (2048, 32000), (576, 1000)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in (1, 37, 256, 2048)]
        cases += [(x, w) for x in xs]
        found = clt.algos_for(n, k, torch.bfloat16, dev)
        assert found, (k, n)
        for algo in found:
            assert algo.config[3] <= 1 and algo.config[4] == 0, algo  # no K split, no reduction
            same = all(torch.equal(tbi.matmul(x, w.t(), tiles=algo), tbi.matmul(x, w.t(), tiles=tbi.LARGE))
                       for x in xs)
            verdicts.append((algo.config, same))
            assert tbi.tiles_usable(algo, dev, torch.bfloat16) == same, algo
    print("cuBLASLt algorithms with LARGE's bits:", sum(s for _, s in verdicts), "of", len(verdicts))
    monkeypatch.setattr(clt, "ENABLED", True)
    monkeypatch.setattr(tbi, "_choice", {})
    for x, w in cases:
        assert torch.equal(tbi.matmul(x, w.t()), tbi.matmul(x, w.t(), tiles=tbi.LARGE))


@pytest.mark.parametrize("k,n", [(2048, 3072), (2048, 5632 * 2), (5632, 2048), (2048, 32000), (576, 1000)])
def test_cublaslt_exact_mode_gemm_is_batch_invariant(k, n):
    """R1MEGA_EXACT_GEMM=cublaslt: each weight shape's reference algorithm (and the decode-sized
    calls' choice among the algorithms with its bits) gives a row the same bits at every row
    count and beside any other rows, and is a GEMM (against float64)."""
    from r1mega.ops import cublaslt_exact as cle

    if not cle.supported(torch.zeros(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip(f"no cuBLASLt extension: {cle.clt.load_error()}")
    torch.manual_seed(8)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
    full = cle.matmul(x, w.t())
    torch.testing.assert_close(full.double(), x.double() @ w.double().t(), rtol=2e-2, atol=2e-2)
    for m in (1, 3, 8, 17, 64, 129, 256, 513, 1024):
        assert torch.equal(cle.matmul(x[:m], w.t()), full[:m]), m
        other = torch.cat([torch.randn(m, k, device="cuda", dtype=torch.bfloat16), x[5:6]])
        assert torch.equal(cle.matmul(other, w.t())[-1], full[5]), m
    ref = cle.reference(n, k, torch.bfloat16, torch.device("cuda"))
    print(f"({k}, {n}): reference {ref}; decode choices",
          {key[2]: v.config for key, v in cle._choice.items() if key[3:] == (n, k)})


def test_cublaslt_matmul_is_a_gemm_and_refuses_what_it_cannot_run():
    from r1mega.ops import cublaslt_gemm as clt

    if clt.get() is None:
        pytest.skip(f"no cuBLASLt extension: {clt.load_error()}")
    torch.manual_seed(6)
    w = torch.randn(1000, 576, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(37, 576, device="cuda", dtype=torch.bfloat16)
    algo = clt.algos_for(1000, 576, torch.bfloat16, torch.device("cuda"))[0]
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(clt.matmul(x, w.t(), algo).double(), ref, rtol=1e-2, atol=1e-1)
    with pytest.raises(ValueError, match="cuBLASLt exact GEMM"):
        clt.matmul(x[:, :512], w[:, :512].t(), algo)  # another weight shape
    with pytest.raises(RuntimeError, match="bf16 or fp16"):
        clt.get().matmul(x.float(), w.float(), torch.frombuffer(bytearray(algo.blob), dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_m_tiles_give_the_large_m_tiles_bits(dtype):
    """Decode-sized calls use other output tiles than training's; on this GPU that must change no
    bit at the model's shapes (ragged ones too), and the device check must agree."""
    from r1mega.ops import triton_batch_invariant as tbi

    if not tbi.HAVE_TRITON or not tbi.SMALL:
        pytest.skip("no triton, or no small-M tiles configured")
    torch.manual_seed(0)
    for k, n in [(2048, 3072), (2048, 11264), (5632, 2048), (2048, 32000), (576, 1000), (64, 200)]:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
        for m in (1, 37, 256, 1024):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            large = tbi.matmul(x, w.t(), tiles=tbi.LARGE)
            for tiles in tbi.SMALL:
                assert torch.equal(tbi.matmul(x, w.t(), tiles=tiles), large), (k, n, m, tiles)
            # the timed per-shape choice (whichever candidate it is) gives the same bits
            assert torch.equal(tbi.matmul(x, w.t()), large), (k, n, m)
    dev = torch.device("cuda")
    assert all(tbi.tiles_usable(t, dev, dtype) for t in tbi.SMALL)
    x = torch.randn(tbi.SMALL_M_MAX + 1, 64, device="cuda", dtype=dtype)
    assert tbi.tiles_for(x, x.new_empty(64, 64)) == tbi.LARGE


def _k_chunks(monkeypatch, tbi, chunks):
    monkeypatch.setattr(tbi, "K_CHUNKS", chunks)
    monkeypatch.setattr(tbi, "_choice", {})
    monkeypatch.setattr(tbi, "_small_ok", {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_k_chunks_split_tiles_give_the_chunked_large_tiles_bits(dtype, monkeypatch):
    """R1MEGA_EXACT_GEMM_KCHUNKS=4: every tile (small, TMA, split: a program per chunk and the
    summing kernel) against the chunked LARGE at the model's shapes and decode row counts; the
    device check agrees with the direct comparison; a row alone equals it in a batch."""
    from r1mega.ops import triton_batch_invariant as tbi

    if not tbi.HAVE_TRITON:
        pytest.skip("no triton")
    _k_chunks(monkeypatch, tbi, 4)
    torch.manual_seed(5)
    dev = torch.device("cuda")
    tma_ok = tbi.TensorDescriptor is not None and torch.cuda.get_device_capability()[0] >= 9
    for k, n in [(2048, 3072), (5632, 2048), (2048, 32000), (1000, 777)]:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
        for m in (1, 37, 256, 1024):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            large = tbi.matmul(x, w.t(), tiles=tbi.LARGE)
            for tiles in tbi.SMALL + (tbi.LARGE,):
                for t in (tiles._replace(split=1),) + ((tiles._replace(tma=1, split=1),) if tma_ok else ()):
                    try:
                        same = torch.equal(tbi.matmul(x, w.t(), tiles=t), large)
                    except Exception:
                        same = False
                    assert tbi.tiles_usable(t, dev, dtype) == same, (k, n, m, t)
            assert torch.equal(tbi.matmul(x, w.t()), large), (k, n, m)   # the timed choice
            assert torch.equal(tbi.matmul(x[:1], w.t()), large[:1])
    x = torch.randn(300, 2048, device="cuda", dtype=dtype)
    w = torch.randn(2048, 2048, device="cuda", dtype=dtype)
    chunked = tbi.matmul(x, w.t(), tiles=tbi.LARGE)
    _k_chunks(monkeypatch, tbi, 1)
    if dtype == torch.float32:  # the chunks are in effect: another order of the same sums
        assert not torch.equal(chunked, tbi.matmul(x, w.t(), tiles=tbi.LARGE))
