"""The wgmma FP8 decode GEMM's host side on the CPU (r1mega/precision/wgmma_gemm.py): the
configuration table equals the CUDA source's, each fits Hopper's shared memory, the pick for the
852M shape's decode GEMMs fills the SMs in one wave, and operands it cannot take are refused
with the reason (the kernel itself runs in tests/gpu/test_fp8_wgmma_gpu.py)."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

from r1mega.precision import gemm, wgmma_gemm as wg

CSRC = os.path.join(os.path.dirname(__file__), "..", "..", "csrc")


def test_the_table_is_the_cuda_sources():
    kernel = open(os.path.join(CSRC, "fp8_wgmma_kernel.cu")).read()
    launches = re.findall(r"case (\d+): launch<(\d+), (\d+), (\d+), (\d+)>", kernel)
    assert [int(c) for c, *_ in launches] == list(range(len(wg.CONFIGS)))
    assert tuple(tuple(int(v) for v in cfg) for _, *cfg in launches) == wg.CONFIGS
    binding = open(os.path.join(CSRC, "fp8_wgmma.cpp")).read()
    table = re.search(r"kConfigs\[\]\[3\] = \{(.*?)\};", binding, re.S).group(1)
    triples = [tuple(int(v) for v in t) for t in re.findall(r"\{(\d+), (\d+), (\d+)\}", table)]
    assert triples == [cfg[:3] for cfg in wg.CONFIGS]


@pytest.mark.parametrize("index", range(len(wg.CONFIGS)))
def test_each_configuration_fits_a_cta(index):
    bm, bn, split, stages = wg.CONFIGS[index]
    stage = (bm + bn) * 128                   # e4m3 rows of one 128-byte K block
    assert stage % 1024 == 0                  # every stage starts on a swizzle atom
    need = max(stages * stage, bm * (bn + 8) * 4 if split > 1 else 0) + 1024
    assert wg.smem_bytes(wg.CONFIGS[index]) == need <= 227 * 1024
    assert bm in (64, 128, 256) and bn in (64, 128) and stages >= 3 and split <= 8  # cluster: 8 portable


@pytest.mark.parametrize("name,n,k,want", [("qkv", 3072, 2048, (128, 128, 2)), ("o_proj", 2048, 2048, (128, 64, 2)),
                                           ("fc1", 11264, 2048, (128, 128, 1)), ("fc2", 2048, 5632, (128, 64, 2))])
def test_the_852m_decode_gemms_fill_the_sms_in_one_wave(name, n, k, want):
    i = wg.config(256, n, k, sms=132)
    bm, bn, split, stages = wg.CONFIGS[i]
    assert (bm, bn, split) == want
    ctas = math.ceil(256 / bm) * (n // bn) * split
    per_sm = (228 * 1024) // (wg.smem_bytes(wg.CONFIGS[i]) + 1024)
    assert ctas <= 132 * per_sm and ctas >= 96


def test_small_batches_take_64_row_tiles_and_odd_sizes_none():
    assert wg.CONFIGS[wg.config(16, 3072, 2048)][0] == 64
    assert wg.CONFIGS[wg.config(65, 3072, 2048)][0] == 128
    assert wg.config(256, 1000, 2048) is None   # N not a multiple of 64
    assert wg.config(256, 2048, 1000) is None   # K not a multiple of 256
    assert wg.config(256, 2048, 128) is None    # one K block: nothing to pipeline


@pytest.mark.parametrize("m", [1, 16, 64, 65, 200, 256, 512])
@pytest.mark.parametrize("n,k", [(128, 256), (3072, 2048), (2048, 5632), (11264, 2048), (384, 768)])
def test_the_static_shape_check_leaves_a_configuration_at_every_row_count(m, n, k):
    # why_not checks N and K alone (a traced decode step has a symbolic batch): whatever the
    # batch, the op must then find a configuration
    assert n % 128 == 0 and k % 256 == 0
    assert wg.config(m, n, k) is not None


def test_env_forces_a_configuration_it_checks(monkeypatch):
    monkeypatch.setenv("R1MEGA_FP8_WGMMA_CONFIG", "5")
    assert wg.config(256, 2048, 2048) == 5
    assert wg.config(256, 2048, 1280) is None


def test_cpu_operands_are_refused_and_the_gemm_takes_cublas_or_emulation():
    a = torch.zeros(16, 256).to(torch.float8_e4m3fn)
    assert "not a GPU" in wg.why_not(a, a)
    with wg.enabled(True):
        assert not wg.serves(a, a, torch.bfloat16)
        assert wg.ENABLED
    assert not wg.ENABLED
    with pytest.raises(ValueError, match="not a GPU"):
        wg.wgmma_gemm(a, a, torch.ones(()), torch.bfloat16)
    assert gemm.wgmma_gemm is wg
