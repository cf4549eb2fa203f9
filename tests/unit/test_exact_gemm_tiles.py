"""The exact GEMM's tile choice (r1mega/ops/triton_batch_invariant.py): configuration parsing, and
that a small-M configuration serves only where the device check found LARGE's bits. The bits
themselves are checked on CUDA (tests/gpu/test_exact_gpu.py)."""
from __future__ import annotations

import pytest

tbi = pytest.importorskip("r1mega.ops.triton_batch_invariant")


def test_parse_tiles_accepts_five_powers_of_two_and_refuses_the_rest():
    assert tbi.parse_tiles("64,32,64,4,4") == tbi.Tiles(64, 32, 64, 4, 4)
    for bad in ("64,32,64,4", "64,48,64,4,4", "8,64,64,4,4", "64,64,64,3,4", "64,64,64,4,0", "a,b,c,d,e"):
        with pytest.raises(ValueError, match="BM,BN,BK|powers of two"):
            tbi.parse_tiles(bad)


def test_small_tiles_serve_small_m_only_where_the_device_check_passed(monkeypatch):
    monkeypatch.setattr(tbi, "LARGE", tbi.Tiles(128, 128, 64, 8, 3))
    monkeypatch.setattr(tbi, "SMALL", tbi.Tiles(64, 64, 64, 4, 4))
    monkeypatch.setattr(tbi, "_small_ok", {})
    dev = "cuda:7"
    key = (dev, tbi.SMALL, tbi.LARGE)
    tbi._small_ok[key] = True
    assert tbi.tiles_for(256, dev) == tbi.SMALL
    assert tbi.tiles_for(tbi.SMALL_M_MAX, dev) == tbi.SMALL
    assert tbi.tiles_for(tbi.SMALL_M_MAX + 1, dev) == tbi.LARGE
    tbi._small_ok[key] = False  # the device gave other bits: LARGE everywhere
    assert tbi.tiles_for(256, dev) == tbi.LARGE
    monkeypatch.setattr(tbi, "SMALL", None)
    assert tbi.tiles_for(256, dev) == tbi.LARGE


def test_setting_a_configuration_forgets_the_device_checks(monkeypatch):
    monkeypatch.setattr(tbi, "LARGE", tbi.LARGE)
    monkeypatch.setattr(tbi, "SMALL", tbi.SMALL)
    monkeypatch.setattr(tbi, "_small_ok", {("cuda:0", None, None): True})
    tbi.set_small_tiles("64,64,64,4,4")
    assert tbi._small_ok == {} and tbi.SMALL == tbi.Tiles(64, 64, 64, 4, 4)
    tbi.set_small_tiles("none")
    assert tbi.SMALL is None
    tbi.set_tiles("128,256,64,8,3")
    assert tbi.LARGE == tbi.Tiles(128, 256, 64, 8, 3)
