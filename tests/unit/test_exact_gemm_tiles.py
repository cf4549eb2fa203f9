"""The exact GEMM's tile choice (r1mega/ops/triton_batch_invariant.py): configuration parsing, and
that a small-M configuration serves only where the device check found LARGE's bits. The bits
themselves are checked on CUDA (tests/gpu/test_exact_gemm_gpu.py)."""
from __future__ import annotations

import pytest
import torch

tbi = pytest.importorskip("r1mega.ops.triton_batch_invariant")


def test_parse_tiles_accepts_five_powers_of_two_and_refuses_the_rest():
    assert tbi.parse_tiles("64,32,64,4,4") == tbi.Tiles(64, 32, 64, 4, 4)
    assert tbi.parse_tiles("64,32,64,4,4,1") == tbi.Tiles(64, 32, 64, 4, 4, tma=1)
    assert tbi.parse_tiles("64,32,64,4,4,1,1") == tbi.Tiles(64, 32, 64, 4, 4, tma=1, ws=1)
    assert tbi.parse_tiles("64,32,64,4,4,0,0,1") == tbi.Tiles(64, 32, 64, 4, 4, split=1)
    for bad in ("64,32,64,4", "64,48,64,4,4", "8,64,64,4,4", "64,64,64,3,4", "64,64,64,4,0", "a,b,c,d,e",
                "64,32,64,4,4,2", "64,32,64,4,4,0,1", "64,32,64,4,4,1,2", "64,32,64,4,4,1,1,1,1",
                "64,32,64,4,4,0,0,2", "64,32,512,4,4"):
        with pytest.raises(ValueError, match="BM,BN,BK|powers of two"):
            tbi.parse_tiles(bad)


class _Fake:
    """What tiles_for reads of an operand: shape, device, dtype (no GPU needed)."""
    def __init__(self, *shape, device="cuda:7", dtype="bf16"):
        self.shape, self.device, self.dtype, self.is_cuda = shape, device, dtype, False


def _fresh(monkeypatch, small):
    monkeypatch.setattr(tbi, "LARGE", tbi.Tiles(128, 128, 64, 8, 3))
    monkeypatch.setattr(tbi, "SMALL", small)
    monkeypatch.setattr(tbi, "_small_ok", {})
    monkeypatch.setattr(tbi, "_choice", {})


def test_small_m_calls_get_the_fastest_bit_checked_candidate_per_shape(monkeypatch):
    a, b = tbi.Tiles(64, 64, 128, 4, 3), tbi.Tiles(64, 128, 64, 4, 3)
    _fresh(monkeypatch, (a, b))
    dev = "cuda:7"
    tbi._small_ok[(dev, "bf16", a, tbi.LARGE)] = True
    tbi._small_ok[(dev, "bf16", b, tbi.LARGE)] = True
    speed = {(2048, a): 1.0, (2048, b): 2.0, (2048, tbi.LARGE): 3.0,   # N=2048: a wins
             (11264, a): 3.0, (11264, b): 1.0, (11264, tbi.LARGE): 2.0,  # N=11264: b wins
             (32000, a): 3.0, (32000, b): 2.0, (32000, tbi.LARGE): 1.0}  # N=32000: LARGE wins
    timed = []

    def timer(n):
        return lambda t: (timed.append((n, t)), speed[(n, t)])[1]

    for n, want in ((2048, a), (11264, b), (32000, tbi.LARGE)):
        assert tbi.tiles_for(_Fake(256, 2048), _Fake(2048, n), timer(n)) == want
    r = tbi.TIMING_ROUNDS  # every candidate timed once a round
    assert len(timed) == 9 * r and set(timed) == set(speed)
    # the same row bucket and shape reuse the choice untimed; another bucket is timed anew
    assert tbi.tiles_for(_Fake(200, 2048), _Fake(2048, 11264), timer(11264)) == b
    assert len(timed) == 9 * r
    tbi.tiles_for(_Fake(16, 2048), _Fake(2048, 11264), timer(11264))
    assert len(timed) == 12 * r
    # above SMALL_M_MAX rows: LARGE, nothing timed
    assert tbi.tiles_for(_Fake(tbi.SMALL_M_MAX + 1, 2048), _Fake(2048, 2048), timer(2048)) == tbi.LARGE
    assert tbi.tiles_for(_Fake(tbi.SMALL_M_MAX, 2048), _Fake(2048, 2048), timer(2048)) == a
    assert len(timed) == 15 * r


def test_fastest_interleaves_rounds_so_a_warming_clock_favours_no_candidate():
    """A GPU's clock ramps up while the first candidates are timed: timed once each in order, the
    truly faster first candidate looks slower. Interleaved rounds, least time each, pick it."""
    cost = {"a": 1.0, "b": 1.1}
    order = []

    def time_ms(t):
        order.append(t)
        return cost[t] * (2.0 if len(order) == 1 else 1.0)  # the first timing at a low clock

    assert tbi.fastest(["a", "b"], time_ms, rounds=1) == "b"  # the bias this removes
    order.clear()
    assert tbi.fastest(["a", "b"], time_ms) == "a"
    assert order == ["a", "b"] * tbi.TIMING_ROUNDS and tbi.TIMING_ROUNDS >= 3


def test_a_candidate_the_device_check_refused_is_never_timed_nor_used(monkeypatch):
    a, b = tbi.Tiles(64, 64, 128, 4, 3), tbi.Tiles(64, 128, 64, 4, 3)
    _fresh(monkeypatch, (a, b))
    dev = "cuda:7"
    tbi._small_ok[(dev, "bf16", a, tbi.LARGE)] = False  # other bits on this device
    tbi._small_ok[(dev, "bf16", b, tbi.LARGE)] = True
    timed = []
    pick = tbi.tiles_for(_Fake(64, 512), _Fake(512, 512), lambda t: (timed.append(t), 0.0)[1])
    assert a not in timed and pick == b  # b and LARGE tie: the first (the small one)
    tbi._small_ok[(dev, "bf16", b, tbi.LARGE)] = False
    monkeypatch.setattr(tbi, "_choice", {})
    assert tbi.tiles_for(_Fake(64, 512), _Fake(512, 512), lambda t: 1 / 0) == tbi.LARGE
    monkeypatch.setattr(tbi, "SMALL", ())
    assert tbi.tiles_for(_Fake(64, 512), _Fake(512, 512), lambda t: 1 / 0) == tbi.LARGE


def test_row_buckets_are_powers_of_two_from_16():
    assert [tbi.row_bucket(m) for m in (1, 16, 17, 256, 257, 1024)] == [16, 16, 32, 256, 512, 1024]


def test_setting_a_configuration_forgets_the_device_checks_and_choices(monkeypatch):
    monkeypatch.setattr(tbi, "LARGE", tbi.LARGE)
    monkeypatch.setattr(tbi, "SMALL", tbi.SMALL)
    monkeypatch.setattr(tbi, "_small_ok", {("cuda:0", None, None): True})
    monkeypatch.setattr(tbi, "_choice", {("cuda:0",): None})
    tbi.set_small_tiles("64,64,64,4,4; 64,128,64,4,3")
    assert tbi._small_ok == {} and tbi._choice == {}
    assert tbi.SMALL == (tbi.Tiles(64, 64, 64, 4, 4), tbi.Tiles(64, 128, 64, 4, 3))
    tbi.set_small_tiles("none")
    assert tbi.SMALL == ()
    tbi.set_tiles("128,256,64,8,3")
    assert tbi.LARGE == tbi.Tiles(128, 256, 64, 8, 3)
    with pytest.raises(ValueError, match="R1MEGA_EXACT_GEMM_SMALL_TILES"):
        tbi.set_small_tiles("64,64,64,4,4;64,48,64,4,4")


def test_tma_variants_are_candidates_only_for_eligible_operands_and_only_where_checked(monkeypatch):
    """With R1MEGA_EXACT_GEMM_TMA=1 and TMA-eligible operands each candidate (LARGE too, above
    SMALL_M_MAX rows) also runs as its TMA variant; a variant serves only where the device check
    found LARGE's bits, and the timing picks among the checked ones."""
    a = tbi.Tiles(64, 64, 128, 4, 3)
    _fresh(monkeypatch, (a,))
    dev = "cuda:7"
    large_tma, a_tma = tbi.LARGE._replace(tma=1), a._replace(tma=1)
    for t, ok in ((a, True), (a_tma, True), (large_tma, False)):
        tbi._small_ok[(dev, "bf16", t, tbi.LARGE)] = ok
    monkeypatch.setattr(tbi, "tma_eligible", lambda x, y: True)
    monkeypatch.setattr(tbi, "TMA_CANDIDATES", True)
    timed = []
    speed = {a: 3.0, a_tma: 1.0, tbi.LARGE: 2.0, large_tma: 0.5}
    pick = tbi.tiles_for(_Fake(256, 2048), _Fake(2048, 2048), lambda t: (timed.append(t), speed[t])[1])
    assert pick == a_tma and set(timed) == {a, a_tma, tbi.LARGE}  # the refused LARGE-TMA: never timed
    # above SMALL_M_MAX: LARGE and its TMA variant only; refused there too, so LARGE untimed
    assert tbi.tiles_for(_Fake(4096, 2048), _Fake(2048, 2048), lambda t: 1 / 0) == tbi.LARGE
    tbi._small_ok[(dev, "bf16", large_tma, tbi.LARGE)] = True
    assert tbi.tiles_for(_Fake(8192, 2048), _Fake(2048, 2048), lambda t: speed[t]) == large_tma
    # operands TMA cannot take: the plain candidates only
    monkeypatch.setattr(tbi, "tma_eligible", lambda x, y: False)
    monkeypatch.setattr(tbi, "_choice", {})
    assert tbi.tiles_for(_Fake(256, 2048), _Fake(2048, 2048), lambda t: speed[t]) == tbi.LARGE
    assert tbi.tiles_for(_Fake(8192, 2048), _Fake(2048, 2048), lambda t: 1 / 0) == tbi.LARGE


def test_warp_specialised_variants_join_only_when_enabled_and_only_where_checked(monkeypatch):
    """R1MEGA_EXACT_GEMM_WS=1 adds each TMA candidate's warp-specialised twin; like every other
    candidate it serves only where the device check found LARGE's bits."""
    a = tbi.Tiles(64, 64, 128, 4, 3)
    _fresh(monkeypatch, (a,))
    dev = "cuda:7"
    a_tma, a_ws = a._replace(tma=1), a._replace(tma=1, ws=1)
    large_tma, large_ws = tbi.LARGE._replace(tma=1), tbi.LARGE._replace(tma=1, ws=1)
    for t, ok in ((a, True), (a_tma, True), (a_ws, True), (large_tma, True), (large_ws, False)):
        tbi._small_ok[(dev, "bf16", t, tbi.LARGE)] = ok
    monkeypatch.setattr(tbi, "tma_eligible", lambda x, y: True)
    monkeypatch.setattr(tbi, "TMA_CANDIDATES", True)
    speed = {a: 3.0, a_tma: 2.5, a_ws: 1.0, tbi.LARGE: 2.0, large_tma: 1.5, large_ws: 0.1}
    timed = []

    def time_ms(t):
        timed.append(t)
        return speed[t]

    monkeypatch.setattr(tbi, "WS_CANDIDATES", False)
    assert tbi.tiles_for(_Fake(256, 2048), _Fake(2048, 2048), time_ms) == large_tma
    assert not any(t.ws for t in timed)
    monkeypatch.setattr(tbi, "WS_CANDIDATES", True)
    monkeypatch.setattr(tbi, "_choice", {})
    wide, square = tbi.WS_TILES[1], tbi.WS_TILES[0]
    tbi._small_ok[(dev, "bf16", wide, tbi.LARGE)] = True
    tbi._small_ok[(dev, "bf16", square, tbi.LARGE)] = False
    speed.update({wide: 0.9, square: 0.01})
    timed.clear()
    assert tbi.tiles_for(_Fake(256, 2048), _Fake(2048, 2048), time_ms) == wide
    assert large_ws not in timed and square not in timed  # refused by the check: never timed
    # training-sized calls: LARGE, its TMA twin and the whole-warpgroup tiles
    timed.clear()
    assert tbi.tiles_for(_Fake(8192, 2048), _Fake(2048, 2048), time_ms) == wide
    assert set(timed) == {tbi.LARGE, large_tma, wide}


def test_tma_eligibility_reads_layout_alignment_and_device():
    x = torch.zeros(64, 1000)
    assert not tbi.tma_eligible(x, torch.zeros(777, 1000).t())  # a CPU tensor: never
    assert tbi._tma_layout_ok(x, torch.zeros(777, 1000).t())
    assert not tbi._tma_layout_ok(x, torch.zeros(1000, 777))  # b row-major: b.T is not
    assert not tbi._tma_layout_ok(torch.zeros(64, 1001)[:, :1000], torch.zeros(777, 1000).t())  # rows not 16-B aligned
    with pytest.raises(ValueError, match="TMA tiles need"):
        tbi.matmul(torch.zeros(8, 16), torch.zeros(16, 8), tiles=tbi.Tiles(16, 16, 16, 4, 3, 1))


def test_cublaslt_algorithms_are_candidates_only_when_enabled_eligible_and_checked(monkeypatch):
    """R1MEGA_EXACT_GEMM_CUBLASLT=1: the weight shape's fixed cuBLASLt algorithms join the timed
    candidates (at every row count) where the operands allow it, each only where the device
    check found LARGE's bits; off, or for operands cuBLASLt cannot take, they are never timed."""
    clt = tbi.clt
    a = tbi.Tiles(64, 64, 128, 4, 3)
    _fresh(monkeypatch, (a,))
    dev = "cuda:7"
    good = clt.LtAlgo(2048, 2048, "bf16", b"\x01" * 8, (1, 2, 3, 1, 0, 0, 0, 0, 0))
    bad = clt.LtAlgo(2048, 2048, "bf16", b"\x02" * 8, (4, 5, 6, 1, 0, 0, 0, 0, 0))
    tbi._small_ok[(dev, "bf16", a, tbi.LARGE)] = True
    tbi._small_ok[(dev, "bf16", good, tbi.LARGE)] = True
    tbi._small_ok[(dev, "bf16", bad, tbi.LARGE)] = False  # other bits: never timed
    monkeypatch.setattr(clt, "algos_for", lambda n, k, dtype, device: [good, bad])
    monkeypatch.setattr(clt, "eligible", lambda x, y: True)
    speed = {a: 3.0, tbi.LARGE: 2.0, good: 1.0}
    timed = []

    def timer(t):
        timed.append(t)
        return speed[t]

    monkeypatch.setattr(clt, "ENABLED", False)
    assert tbi.tiles_for(_Fake(256, 2048), _Fake(2048, 2048), timer) == tbi.LARGE
    assert good not in timed
    monkeypatch.setattr(clt, "ENABLED", True)
    timed.clear()
    assert tbi.tiles_for(_Fake(256, 2048), _Fake(2048, 2048), timer) == good
    assert set(timed) == {a, tbi.LARGE, good}
    # above SMALL_M_MAX: LARGE and the algorithms (training's row counts too)
    assert tbi.tiles_for(_Fake(8192, 2048), _Fake(2048, 2048), timer) == good
    monkeypatch.setattr(clt, "eligible", lambda x, y: False)
    monkeypatch.setattr(tbi, "_choice", {})
    timed.clear()
    assert tbi.tiles_for(_Fake(8192, 2048), _Fake(2048, 2048), timer) == tbi.LARGE and not timed


def test_cublaslt_is_never_eligible_off_cuda_or_for_layouts_it_cannot_take():
    clt = tbi.clt
    w = torch.zeros(777, 1000, dtype=torch.bfloat16)
    assert not clt.eligible(torch.zeros(64, 1000, dtype=torch.bfloat16), w.t())  # CPU tensors


def test_cublaslt_paths_are_found_in_pip_wheels_and_toolkits(tmp_path):
    """The pip layout (nvidia/cu13/include + lib with only the versioned library) links that
    versioned name; a toolkit's unversioned library links as -lcublasLt; neither: None."""
    from r1mega.ops.cuda_libs import cublaslt_flags

    site = tmp_path / "site"
    (site / "nvidia" / "cu13" / "include").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "include" / "cublasLt.h").write_text("")
    (site / "nvidia" / "cu13" / "lib").mkdir()
    (site / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13").write_text("")
    inc, flags = cublaslt_flags(None, [str(site)])
    assert inc == [str(site / "nvidia" / "cu13" / "include")]
    assert "-l:libcublasLt.so.13" in flags and f"-L{site / 'nvidia' / 'cu13' / 'lib'}" in flags
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    (home / "include" / "cublasLt.h").write_text("")
    (home / "lib64").mkdir()
    (home / "lib64" / "libcublasLt.so").write_text("")
    assert cublaslt_flags(str(home), [])[1][:2] == [f"-L{home / 'lib64'}", "-lcublasLt"]
    assert cublaslt_flags(str(tmp_path / "none"), [str(tmp_path / "empty")]) is None
    # a header without its library is not enough
    (home / "lib64" / "libcublasLt.so").unlink()
    assert cublaslt_flags(str(home), []) is None


def test_k_chunks_are_a_function_of_k_alone(monkeypatch):
    monkeypatch.setattr(tbi, "K_CHUNKS", 1)
    assert [tbi.chunk_len(k) for k in (100, 2048, 5632)] == [100, 2048, 5632]
    monkeypatch.setattr(tbi, "K_CHUNKS", 4)
    # K / 4 rounded up to a multiple of 256 (every BK divides it); at least 256
    assert [tbi.chunk_len(k) for k in (100, 1000, 2048, 5632, 4096)] == [256, 256, 512, 1536, 1024]
    monkeypatch.setenv("R1MEGA_EXACT_GEMM_KCHUNKS", "four")
    with pytest.raises(ValueError, match="R1MEGA_EXACT_GEMM_KCHUNKS='four'.*whole number"):
        tbi._k_chunks_from_env()
    monkeypatch.setenv("R1MEGA_EXACT_GEMM_KCHUNKS", "0")
    with pytest.raises(ValueError, match="from 1"):
        tbi._k_chunks_from_env()


def test_split_variants_are_candidates_only_with_k_chunks_and_small_m(monkeypatch):
    """With K in chunks each small-M candidate also runs split (a program per chunk, then their
    sum); like every candidate it serves only where the device check found LARGE's bits."""
    a = tbi.Tiles(64, 64, 128, 4, 3)
    _fresh(monkeypatch, (a,))
    dev = "cuda:7"
    a_split, large_split = a._replace(split=1), tbi.LARGE._replace(split=1)
    for t, ok in ((a, True), (a_split, True), (large_split, False)):
        tbi._small_ok[(dev, "bf16", t, tbi.LARGE)] = ok
    monkeypatch.setattr(tbi, "tma_eligible", lambda x, y: False)
    monkeypatch.setattr(tbi, "K_CHUNKS", 4)
    speed = {a: 3.0, a_split: 1.0, tbi.LARGE: 2.0, large_split: 0.5}
    timed = []
    pick = tbi.tiles_for(_Fake(256, 5632), _Fake(5632, 2048), lambda t: (timed.append(t), speed[t])[1])
    assert pick == a_split and set(timed) == {a, a_split, tbi.LARGE}
    # a K that makes one chunk, and row counts above SMALL_M_MAX: nothing to split
    assert tbi.tiles_for(_Fake(256, 200), _Fake(200, 2048), lambda t: speed[t]) == tbi.LARGE
    assert tbi.tiles_for(_Fake(4096, 5632), _Fake(5632, 2048), lambda t: 1 / 0) == tbi.LARGE
    # one chain over K (the default): no split candidates
    monkeypatch.setattr(tbi, "K_CHUNKS", 1)
    monkeypatch.setattr(tbi, "_choice", {})
    timed.clear()
    tbi.tiles_for(_Fake(256, 5632), _Fake(5632, 2048), lambda t: (timed.append(t), speed[t])[1])
    assert set(timed) == {a, tbi.LARGE}
