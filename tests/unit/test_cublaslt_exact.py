"""The exact mode's cuBLASLt-only GEMM (R1MEGA_EXACT_GEMM=cublaslt, r1mega/ops/cublaslt_exact.py):
which algorithm becomes a weight shape's reference, which may serve decode-sized calls, and what
is refused. cuBLASLt is replaced by CPU stand-ins whose behaviour is known: one whose rows depend
on the batch (a K split chosen by M), two that compute the same bits, one that computes other
bits. tests/gpu/test_exact_gemm_gpu.py runs the real library."""
from __future__ import annotations

import pytest
import torch

from r1mega.ops import batch_invariant as bi
from r1mega.ops import cublaslt_exact as cle
from r1mega.ops import cublaslt_gemm as clt
from r1mega.ops import triton_batch_invariant as tbi


def _algo(tag: int) -> clt.LtAlgo:
    return clt.LtAlgo(64, 48, torch.float32, bytes([tag]) * 8, (tag, 0, 0, 1, 0, 0, 0, 0, 0))


SPLIT, GOOD, TWIN, OTHER = (_algo(t) for t in (1, 2, 3, 4))


def _fake_matmul(a, b, algo):
    exact = (a.double() @ b.double()).float()
    tag = algo.config[0]
    if tag == SPLIT.config[0]:  # rounds differently whenever the batch has more than 16 rows
        return exact + (1e-3 if a.shape[0] > 16 else 0.0)
    if tag == OTHER.config[0]:  # batch-invariant, other bits
        return exact + 1e-3
    return exact  # GOOD and TWIN: the same bits at any M


@pytest.fixture
def fake_lt(monkeypatch):
    offered = [SPLIT, GOOD, TWIN, OTHER]
    calls = []

    def matmul(a, b, algo):
        calls.append((algo, a, b))
        return _fake_matmul(a, b, algo)

    monkeypatch.setattr(clt, "algos_for", lambda n, k, dtype, device: list(offered))
    monkeypatch.setattr(clt, "matmul", matmul)
    for cache in ("_ref", "_same", "_choice"):
        monkeypatch.setattr(cle, cache, {})
    return offered, calls


def test_reference_is_the_first_algorithm_checked_batch_invariant(fake_lt):
    assert cle.reference(64, 48, torch.float32, "cpu") == GOOD  # SPLIT's rows move with M
    assert cle._batch_invariant(OTHER, "cpu", torch.float32)  # invariant, though other bits


def test_decode_calls_time_only_algorithms_with_the_references_bits(fake_lt):
    a, b = torch.randn(40, 48), torch.randn(48, 64)
    timed = []

    def time_ms(algo):
        timed.append(algo)
        return {GOOD.config: 2.0, TWIN.config: 1.0}[algo.config]

    assert cle.algo_for(a, b, time_ms=time_ms) == TWIN  # faster, same bits
    assert {t.config[0] for t in timed} == {GOOD.config[0], TWIN.config[0]}  # OTHER never
    assert len(timed) == 2 * tbi.TIMING_ROUNDS
    timed.clear()
    assert cle.algo_for(torch.randn(50, 48), b, time_ms=time_ms) == TWIN  # same bucket: no retiming
    assert not timed
    big = torch.randn(2048, 48)  # training-sized: the reference itself
    assert cle.algo_for(big, b, time_ms=time_ms) == GOOD


def test_capture_before_a_reference_is_an_error_and_an_untimed_bucket_gets_the_reference(
        fake_lt, monkeypatch):
    b = torch.randn(48, 64)
    monkeypatch.setattr(cle, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        cle.algo_for(torch.randn(8, 48), b)
    monkeypatch.setattr(cle, "_capturing", lambda device: False)
    cle.reference(64, 48, torch.float32, "cpu")
    monkeypatch.setattr(cle, "_capturing", lambda device: True)
    assert cle.algo_for(torch.randn(8, 48), b) == GOOD  # no timing inside capture


def test_no_batch_invariant_algorithm_is_an_error_naming_the_fix(fake_lt):
    offered, _ = fake_lt
    offered[:] = [SPLIT]
    with pytest.raises(RuntimeError, match="none of the 1 .*unset\\s+R1MEGA_EXACT_GEMM"):
        cle.reference(64, 48, torch.float32, "cpu")


def _takes(a, b) -> bool:
    """What csrc/exact_gemm_lt.cpp checks of a and w = b.T."""
    w, e = b.t(), a.element_size()
    return (a.stride(1) == 1 and w.stride(1) == 1 and a.data_ptr() % clt.ALIGN == 0
            and w.data_ptr() % clt.ALIGN == 0 and (a.stride(0) * e) % clt.ALIGN == 0
            and (w.stride(0) * e) % clt.ALIGN == 0)


def test_matmul_gives_the_library_aligned_row_major_operands(fake_lt, monkeypatch):
    _, calls = fake_lt
    monkeypatch.setattr(cle, "algo_for", lambda a, b: GOOD)
    w = torch.randn(64, 48)
    big = torch.randn(70, 48)
    cases = [(torch.randn(10, 60)[:, 6:54], w.t()),  # a column slice: rows strided, base off
             (torch.randn(3, 48 * 3).as_strided((1, 48), (3, 1)), w.t()),  # one row, odd row stride
             (torch.randn(5, 48), big[3:67].t()),  # a weight whose base is off alignment
             (torch.randn(5, 48), w.t().contiguous())]  # a weight not transposed row-major
    for a, b in cases:
        out = cle.matmul(a, b)
        algo, a_in, b_in = calls[-1]
        assert _takes(a_in, b_in), (a.stride(), b.stride())
        torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
    a, b = torch.randn(7, 48), w.t()
    cle.matmul(a, b)
    assert calls[-1][1] is a and calls[-1][2].data_ptr() == w.data_ptr()  # aligned: no copies
    with pytest.raises(ValueError, match="multiples of 4 elements"):
        cle.matmul(torch.randn(3, 50), torch.randn(64, 50).t())  # 200-byte rows
    assert cle.matmul(torch.randn(0, 48), w.t()).shape == (0, 64)


def test_mode_is_read_from_the_environment_and_wrong_values_are_refused(monkeypatch):
    monkeypatch.setenv("R1MEGA_EXACT_GEMM", "cublaslt")
    assert bi._cuda_gemm_mode() == ("cublaslt", 0)
    monkeypatch.setenv("R1MEGA_EXACT_GEMM", "cublasLt")
    with pytest.raises(ValueError, match="'triton', 'cublaslt' or 'cublas:ROWS'"):
        bi._cuda_gemm_mode()


def test_only_cuda_half_precision_with_the_extension_is_supported(monkeypatch):
    assert not cle.supported(torch.zeros(2, 2, dtype=torch.bfloat16))  # CPU
    monkeypatch.setattr(clt, "get", lambda: object())

    class FakeCuda:
        is_cuda = True

        def __init__(self, dtype):
            self.dtype = dtype

    assert cle.supported(FakeCuda(torch.bfloat16)) and cle.supported(FakeCuda(torch.float16))
    assert not cle.supported(FakeCuda(torch.float32))  # float32 stays on the Triton kernel
    a = FakeCuda(torch.bfloat16)
    a.shape, a.element_size = (5, 2048), lambda: 2
    assert cle.supported(a, torch.zeros(2048, 32000))
    assert not cle.supported(a, torch.zeros(2048, 50257))  # a GPT-2 vocabulary: Triton
    monkeypatch.setattr(clt, "get", lambda: None)
    assert not cle.supported(FakeCuda(torch.bfloat16))


def test_algos_for_drops_algorithms_that_want_workspace_at_few_rows(monkeypatch):
    """cuBLASLt's heuristic answers for its query's M; an algorithm may want workspace only at a
    larger M (seen on the H200: none at 8,192 rows, 4 bytes at 16,384), where the extension
    refuses it. Such an algorithm is used in slices of the rows it was found free at; one that
    wants workspace below MIN_ROWS is not offered. The heuristic's order is kept, each once."""
    import contextlib

    blobs = {m: [torch.tensor([t], dtype=torch.uint8) for t in tags]
             for m, tags in {clt.HEURISTIC_ROWS[0]: (5, 6, 7), clt.HEURISTIC_ROWS[1]: (7, 8, 6, 9)}.items()}
    asked = []

    class Ext:
        def algos(self, m, n, k, dtype, per):
            return blobs[m]

        def describe(self, blob):
            return [int(blob[0])] + [0] * 8

        def workspace(self, m, n, k, dtype, blob):
            asked.append((int(blob[0]), m))
            tag = int(blob[0])
            if tag == 9:  # refused (-1) above 301 rows
                return -1 if m > 301 else 0
            return 4 if (tag == 6 and m >= 16384) or (tag == 8 and m == 1) else 0

    monkeypatch.setattr(clt, "get", lambda: Ext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(clt, "_algos", {})
    got = clt.algos_for(64, 48, torch.bfloat16, "cuda:0")
    assert [(a.config[0], a.max_rows) for a in got] == [(5, clt.MAX_ROWS), (6, 4096), (7, clt.MAX_ROWS)]
    assert {m for t, m in asked if t == 5} == set(clt.WORKSPACE_ROWS)  # every row count asked
    assert max(clt.WORKSPACE_ROWS) == clt.MAX_ROWS and {301, 4096, 16384} <= set(clt.WORKSPACE_ROWS)
    assert clt.algos_for(64, 48, torch.bfloat16, "cuda:0") is got  # one query per shape
    ws = dict(clt.rejected[("cuda:0", torch.bfloat16, 64, 48)])
    assert set(ws) == {(8,) + (0,) * 8, (9,) + (0,) * 8}
    assert ws[(9,) + (0,) * 8] == tuple(-1 if m > 301 else 0 for m in clt.WORKSPACE_ROWS)
    why = clt.why_none(64, 48, torch.bfloat16, "cuda:0")
    assert "(8, 0, 0, 0, 0, 0, 0, 0, 0): (4, 0, 0, 0, 0)" in why, why


def test_calls_above_an_algorithms_rows_run_in_slices_with_it(monkeypatch):
    """An algorithm is checked for workspace only up to its max_rows; a larger product is cut
    into row slices of at most that many, each through the same algorithm, stacked in order."""
    seen = []

    class Ext:
        def matmul(self, a, w, blob):
            seen.append((a.shape[0], bytes(blob.numpy().tobytes())))
            return a @ w.t()

    monkeypatch.setattr(clt, "get", lambda: Ext())
    a, w = torch.randn(37, 48), torch.randn(64, 48)
    algo = _algo(9)._replace(dtype=torch.float32, max_rows=16)
    got = clt.matmul(a, w.t(), algo)
    # each slice's own product, stacked (the whole product may differ in its last bits: a CPU
    # BLAS may block M = 37 otherwise than M = 16)
    want = torch.cat([a[i:i + 16] @ w.t() for i in range(0, 37, 16)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, a @ w.t())
    assert seen == [(16, bytes([9]) * 8), (16, bytes([9]) * 8), (5, bytes([9]) * 8)]
    seen.clear()
    clt.matmul(a[:16], w.t(), algo)
    assert seen == [(16, bytes([9]) * 8)]
