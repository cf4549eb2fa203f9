"""The CUDA FP8 dual quantiser (csrc/fp8_quant_kernel.cu) against the PyTorch reference, bit for
bit, on an FP8 GPU (skipped elsewhere): x and x.T, every granularity it serves, both formats,
power-of-2 scales, bf16 and fp16, ragged blocks, zero / NaN / inf / subnormal tiles, one CTA a
block and persistent (Triton's persistent launch too); and the FP8 linear's forward and backward
through it equal to the same linear through Triton's quantiser."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an FP8 GPU (sm_89+)")

from r1mega.precision import cuda_quant, triton_quant  # noqa: E402
from r1mega.precision.quantize import quantize_dual, quantize_reference  # noqa: E402

needs_ext = pytest.mark.skipif(cuda_quant.get() is None,
                               reason=f"r1mega_fp8_cuda unavailable: {cuda_quant.load_error()}")


def _same_bits(a, b):
    """Bitwise equal, NaN matching NaN (a NaN's sign/payload is not the kernel's choice)."""
    nan = torch.isnan(a.float()) & torch.isnan(b.float())
    return bool(((a.view(torch.uint8) == b.view(torch.uint8)) | nan).all())


def _same_scales(a, b):
    return torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))


def _matrix(shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g) * torch.logspace(-4, 4, shape[1], device="cuda")
    x = x.to(dtype)
    x[0, : min(128, shape[1])] = 0                       # a zero tile
    if shape[0] > 2:
        x[2, 5] = float("nan")                           # a NaN tile
    if shape[0] > 20:
        x[20, -1] = float("inf")                         # an inf tile: mult 0, dequantised NaN
    if shape[0] > 40 and shape[1] > 130:
        x[40, 128:] = torch.finfo(dtype).tiny / 4        # a subnormal tile
    return x


@needs_ext
@pytest.mark.parametrize("gran", ["tensor", "tile", "block"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("power2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 16), (272, 1008), (4096, 2048), (144, 4112)])
@pytest.mark.parametrize("persistent", [False, True])
def test_cuda_dual_quantizer_equals_reference_of_x_and_xt_bitwise(gran, fmt, power2, dtype, shape,
                                                                  persistent):
    x = _matrix(shape, dtype)
    amaxes = [None]
    if gran == "tensor":
        # the tensor's own amax (NaN here), and a finite one given by the caller
        amaxes.append(x[3:].float().abs().nan_to_num(0.0, 0.0, 0.0).amax().reshape(1))
    for amax in amaxes:
        q, qt = cuda_quant.quantize_dual_cuda(x, gran, fmt, power2, amax=amax, persistent=persistent)
        for got, src in ((q, x), (qt, x.t())):
            ref = quantize_reference(src, gran, fmt, power2, amax)
            assert got.data.shape == ref.data.shape and got.data.is_contiguous()
            assert got.data.dtype == ref.data.dtype
            assert _same_bits(got.data, ref.data), (gran, fmt, power2, dtype, shape, amax, persistent)
            assert _same_scales(got.scale, ref.scale)
            if gran == "tile":
                assert got.scale.stride() == (1, got.scale.shape[0])   # cuBLAS: strides (1, M)


@pytest.mark.parametrize("gran", ["tensor", "tile"])
@pytest.mark.parametrize("fmt,power2", [("e4m3", False), ("e5m2", True)])
@pytest.mark.parametrize("shape", [(16, 16), (272, 1008), (4096, 2048), (144, 4112)])
@pytest.mark.parametrize("config", [(8, 1, 2), (4, 2, 3), (16, 1, 2)])
def test_triton_persistent_dual_quantizer_equals_reference_bitwise(gran, fmt, power2, shape, config,
                                                                   monkeypatch):
    warps, per_sm, stages = config
    monkeypatch.setitem(triton_quant._PERSISTENT, "warps", warps)
    monkeypatch.setitem(triton_quant._PERSISTENT, "per_sm", per_sm)
    monkeypatch.setitem(triton_quant._PERSISTENT, "stages", stages)
    x = _matrix(shape, torch.bfloat16)
    q, qt = triton_quant.quantize_dual_triton(x, gran, fmt, power2, persistent=True)
    for got, src in ((q, x), (qt, x.t())):
        ref = quantize_reference(src, gran, fmt, power2)
        assert _same_bits(got.data, ref.data), (gran, fmt, shape, config)
        assert _same_scales(got.scale, ref.scale)


@needs_ext
@pytest.mark.parametrize("gran", ["tensor", "tile", "block"])
def test_cuda_and_triton_dual_quantizers_agree(gran):
    x = torch.randn(1024, 3072, device="cuda").bfloat16()
    for a, b in zip(cuda_quant.quantize_dual_cuda(x, gran), triton_quant.quantize_dual_triton(x, gran)):
        assert _same_bits(a.data, b.data) and _same_scales(a.scale, b.scale)


@needs_ext
def test_dispatch_takes_cuda_where_it_can_and_triton_elsewhere(monkeypatch):
    monkeypatch.setenv("R1MEGA_FP8_QUANT", "cuda")
    calls = []
    real = cuda_quant.quantize_dual_cuda
    monkeypatch.setattr(cuda_quant, "quantize_dual_cuda", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(256, 512, device="cuda").bfloat16()
    q, qt = quantize_dual(x, "tile")
    assert calls == [1]
    ref = quantize_reference(x.t(), "tile")
    assert _same_bits(qt.data, ref.data)
    for odd in (torch.randn(257, 512, device="cuda").bfloat16(),       # rows not a multiple of 16
                torch.randn(512, 256, device="cuda").bfloat16().t(),   # not contiguous
                torch.randn(256, 512, device="cuda")):                 # float32
        q, qt = quantize_dual(odd, "tile")
        assert calls == [1]
        assert _same_bits(qt.data, quantize_reference(odd.t(), "tile").data)
    with pytest.raises(ValueError, match="multiples of 16"):
        quantize_dual(torch.randn(257, 512, device="cuda").bfloat16(), "tile", impl="cuda")


@needs_ext
@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_linear_through_the_cuda_quantizer_equals_triton_bitwise(recipe, monkeypatch):
    from r1mega.precision.linear import Fp8LinearOps, fp8_linear
    from r1mega.precision.policy import Fp8Policy

    if recipe == "blockwise" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("blockwise scaled_mm runs on sm_90")
    g = torch.Generator(device="cuda").manual_seed(2)
    T, K, N = 1000, 2048, 1536                 # tokens padded inside the linear (16 / 128)
    x = torch.randn(T, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
    dy = torch.randn(T, N, device="cuda", generator=g).bfloat16()
    out = {}
    for impl in ("triton", "cuda"):
        monkeypatch.setenv("R1MEGA_FP8_QUANT", impl)
        ops = Fp8LinearOps(Fp8Policy(recipe=recipe, backend="native"))
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, None, ops)
        y.backward(dy)
        out[impl] = (y.detach(), xr.grad, wr.grad)
    for got, ref in zip(out["cuda"], out["triton"]):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("impl", ["triton", pytest.param("cuda", marks=needs_ext)])
@pytest.mark.parametrize("gran", ["tensor", "tile", "block"])
def test_dual_quantizers_write_into_given_tensors(impl, gran):
    """``out=``: the kernels write x's and x.T's bytes and scales into the given tensors, the
    same bits as into new ones."""
    x, y = _matrix((272, 1008), torch.bfloat16), _matrix((272, 1008), torch.bfloat16, seed=1)
    pair = quantize_dual(y, gran, impl=impl)
    ptrs = [t.data_ptr() for q in pair for t in (q.data, q.scale)]
    got = quantize_dual(x, gran, impl=impl, out=pair)
    want = quantize_dual(x, gran, impl=impl)
    assert [t.data_ptr() for q in got for t in (q.data, q.scale)] == ptrs
    for a, b in zip(got, want):
        assert _same_bits(a.data, b.data) and _same_scales(a.scale, b.scale)


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise", "rowwise"])
def test_weight_cache_refresh_copies_no_weight(recipe):
    """After an optimizer update the training linear's FP8 weight copies are re-quantised into
    their own tensors: no device-to-device copy of a whole weight a step (the profiler sees none),
    and the copies equal a fresh quantisation of the new weight."""
    from torch.profiler import ProfilerActivity, profile

    from r1mega.precision.linear import RECIPE_GRANULARITY, Fp8LinearOps, new_weight_generation
    from r1mega.precision.policy import Fp8Policy

    gran = RECIPE_GRANULARITY[recipe][1]
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    ops = Fp8LinearOps(Fp8Policy(recipe=recipe, backend="native"))
    new_weight_generation()
    fwd = ops.cache.get_pair(w, ops.policy)
    dgrad = ops.cache.get(w, "dgrad", ops.policy)
    before = (fwd.data.data_ptr(), dgrad.data.data_ptr())
    with torch.no_grad():
        w.mul_(1.7)
    new_weight_generation()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd2 = ops.cache.get_pair(w, ops.policy)
        dgrad2 = ops.cache.get(w, "dgrad", ops.policy)
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert any("quant" in k for k in kernels), kernels      # the profile saw the quantiser run
    copies = [k for k in kernels if "Memcpy" in k or "copy" in k.lower()]
    assert copies == [], copies
    assert (fwd2.data.data_ptr(), dgrad2.data.data_ptr()) == before
    for got, src in ((fwd2, w), (dgrad2, w.t())):
        ref = quantize_reference(src, gran, "e4m3", ops.policy.power2_scales)
        assert _same_bits(got.data, ref.data) and _same_scales(got.scale, ref.scale)
