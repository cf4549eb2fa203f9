"""FP8 paged decode attention in CUDA (csrc/paged_decode*, extension ``r1mega_attn_cuda``).

The same contract as :func:`r1mega.rollout.triton_paged.paged_decode_attention` on an FP8 cache
(e4m3 K/V with float32 per-(token, head) scales), for the shapes the kernel takes (:func:`why_not`).
The decode op sends its FP8-cache calls to the tensor-core kernel (csrc/paged_decode_mma.cuh, f16
MMAs; ``R1MEGA_PAGED_FP8=mma``, the default) where they fit and the extension loads, and Triton's
kernel serves the rest; ``=cuda`` picks the CUDA-core kernel, ``=triton`` Triton's for every call
(`r1mega bench decode-attention` times all three beside a bf16 cache). ``R1MEGA_ATTN_JIT=0`` forbids the just-in-time
build. The reference is :func:`r1mega.rollout.attention.attend_decode_gather` on the dequantised
cache (tests/gpu/test_paged_decode_cuda_gpu.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega import switches
from r1mega.ops.extension import CudaExtension

_EXT = CudaExtension("r1mega_attn_cuda", ["paged_decode.cpp", "paged_decode_kernel.cu"], "R1MEGA_ATTN",
                     ["-lineinfo", "--use_fast_math"], "FP8 paged decode attention uses Triton")
SOURCES = _EXT.sources
get, load_error, loaded = _EXT.get, _EXT.load_error, _EXT.loaded


def _impl_from_env() -> str:
    return switches.choice("R1MEGA_PAGED_FP8", "mma", {
        "triton": "r1mega/rollout/triton_paged.py's kernel for an FP8 cache",
        "cuda": "csrc/paged_decode_kernel.cu (CUDA cores) where the shapes allow, else Triton's",
        "mma": "csrc/paged_decode_mma.cuh (tensor cores, f16 MMAs) where the shapes allow, else "
               "Triton's"})


def grid_from_env() -> str:
    return switches.choice("R1MEGA_PAGED_GRID", "seqs", {
        "seqs": "the decode kernels' CTAs (programs) walk the sequences of one KV head, then the next head",
        "heads": "a sequence's KV heads are neighbouring CTAs (programs), which read the "
                 "interleaved head rows of a cache slot at about the same time",
        "seq": "the tensor-core kernel runs one CTA a sequence, all its KV heads (1, 2 or 4 with "
               "head_dim x heads <= 512; otherwise, and for the other kernels, as 'seqs'): a cache "
               "slot's head rows are read together"})


def warps_from_env() -> int:
    return int(switches.choice("R1MEGA_PAGED_FP8_WARPS", "4", {
        "4": "the tensor-core kernel's four warps split a KV head's chunks",
        "2": "two warps a KV head (CTAs of 64 threads): each walks twice the chunks",
        "1": "one warp a KV head: no merge across warps"}))


# Read once, at import (a bad value fails the run's start, not its first decode step)
IMPL = _impl_from_env()
WARPS_PER_HEAD = warps_from_env()
HEADS_INNER = grid_from_env() == "heads"
SEQ_CTA = grid_from_env() == "seq"


def why_not(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
            pointers: bool = True) -> Optional[str]:
    """None when the CUDA kernel takes these operands, else the reason. ``pointers`` False leaves
    out the base address's alignment (shapes and strides only: what dynamo can trace)."""
    if not q.is_cuda:
        return f"q is on {q.device}, not a CUDA device"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"q is {q.dtype}; the kernel takes bfloat16 or float16"
    if k_cache.dtype != torch.float8_e4m3fn or k_scale is None:
        return "the cache is not float8_e4m3fn with scales"
    d = q.shape[-1]
    if d not in (64, 128, 256):
        return f"head_dim {d} is not 64, 128 or 256"
    _, bs, hkv, _ = k_cache.shape
    if bs % 16:
        return f"{bs}-token cache blocks (the kernel takes multiples of 16)"
    if q.shape[1] % hkv or q.shape[1] // hkv > 8:
        return f"{q.shape[1]} query heads over {hkv} KV heads (a group of at most 8)"
    if (k_cache.stride(-1) != 1 or any(s % 16 for s in k_cache.stride()[:3])
            or (pointers and k_cache.data_ptr() % 16)):
        return f"the cache's strides {k_cache.stride()} are not 16-byte multiples with unit stride on D"
    return None


def _ready(caller: str, q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
           check=None):
    """(the extension, q with unit stride on D), or the reason the kernel cannot run, raised;
    ``check``: the conditions (default :func:`why_not`)."""
    reason = (check or why_not)(q, k_cache, k_scale)
    if reason is not None:
        raise ValueError(f"{caller}: {reason}")
    ext = get()
    if ext is None:
        raise RuntimeError(f"{caller}: r1mega_attn_cuda is unavailable: {load_error()}")
    return ext, (q if q.stride(-1) == 1 else q.contiguous())


def paged_decode_fp8_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                          k_scale: torch.Tensor, v_scale: torch.Tensor,
                          out: Optional[torch.Tensor] = None,
                          tensor_cores: Optional[bool] = None,
                          heads_inner: Optional[bool] = None,
                          seq_cta: Optional[bool] = None,
                          warps_per_head: Optional[int] = None) -> torch.Tensor:
    """q (B, Hq, D) -> (B, Hq, D) over the FP8 paged cache; raises with the reason when the kernel
    cannot take the operands or the extension is missing. ``tensor_cores``: the MMA kernel;
    ``heads_inner``: the (Hkv, B) grid; ``seq_cta``: the MMA kernel with one CTA a sequence where
    its heads fit; ``warps_per_head``: the MMA kernel's warps a KV head, 4, 2 or 1 (None: the
    switches' choices)."""
    ext, q = _ready("paged_decode_fp8_cuda", q, k_cache, k_scale)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tensor_cores is None:
        tensor_cores = IMPL == "mma"
    if heads_inner is None:
        heads_inner = HEADS_INNER
    if seq_cta is None:
        seq_cta = SEQ_CTA and tensor_cores and _seq_heads_why_not(q, k_cache) is None
    if warps_per_head is None:
        warps_per_head = WARPS_PER_HEAD if tensor_cores and not seq_cta else 4
    ext.paged_decode_fp8(q, k_cache, v_cache, k_scale, v_scale, block_tables, ctx_lens, out,
                         float(scale), bool(tensor_cores), bool(heads_inner), seq_cta=bool(seq_cta),
                         warps_per_head=int(warps_per_head))
    return out


def serves(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor]) -> bool:
    """Whether the decode op should send this call here: the switch, the shapes, the extension."""
    return IMPL in ("cuda", "mma") and why_not(q, k_cache, k_scale) is None and get() is not None


# The output projection's row quantiser as the MMA kernel's epilogue (csrc/paged_decode_rows.cuh)
ROWS = switches.flag("R1MEGA_PAGED_FP8_ROWS", False,
                     "the FP8 rollout's decode attention kernel (tensor cores, one CTA a sequence) also "
                     "writes its output rows in e4m3 with row scales, for the output projection (one "
                     "kernel a layer fewer)")


# The same rows from the one-CTA-a-KV-head kernel, a sequence's CTAs one thread-block cluster that
# exchanges the row's amax through distributed shared memory (csrc/paged_decode_rows.cuh)
ROWS_CLUSTER = switches.flag("R1MEGA_PAGED_FP8_ROWS_CLUSTER", False,
                             "the FP8 rollout's decode attention kernel (tensor cores, one CTA a KV head, "
                             "a sequence's KV heads one thread-block cluster: Hopper) also writes its "
                             "output rows in e4m3 with row scales, for the output projection (one "
                             "kernel a layer fewer); where it cannot, R1MEGA_PAGED_FP8_ROWS decides")

# device index -> whether it launches thread-block clusters (sm_90+); filled eagerly by
# prepare(), read while tracing (a capability query inside the traced step breaks its graph)
_CLUSTERS: dict = {}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def prepare(device: torch.device) -> None:
    """Load the extension and note whether ``device`` launches clusters, eagerly, before a decode
    step that takes an epilogue route is traced."""
    if device.type != "cuda":
        return
    get()
    idx = _device_index(device)
    _CLUSTERS[idx] = torch.cuda.get_device_capability(idx) >= (9, 0)


def _seq_heads_why_not(q: torch.Tensor, k_cache: torch.Tensor) -> Optional[str]:
    hkv, d = k_cache.shape[2], q.shape[-1]
    if hkv not in (1, 2, 4) or hkv * d > 512:
        return (f"{hkv} KV heads of head_dim {d} a rank: one CTA a sequence takes 1, 2 or 4 heads "
                f"with head_dim x heads <= 512")
    return None


def rows_why_not(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
                 pointers: bool = True) -> Optional[str]:
    """None when the tensor-core kernel can also quantise its output rows, else the reason: it
    runs one CTA a sequence with all its KV heads, 1, 2 or 4 of them with head_dim x heads <= 512
    (the CTA's shared memory), besides :func:`why_not`'s conditions."""
    return _seq_heads_why_not(q, k_cache) or why_not(q, k_cache, k_scale, pointers)


def _thread_a_dim_why_not(q: torch.Tensor, what: str) -> Optional[str]:
    """The tiles' thread layout (the tiles and cluster rows epilogues): one CTA a KV head of four
    warps, one thread a dim of head_dim 128."""
    if q.shape[-1] != 128:
        return f"head_dim {q.shape[-1]}: {what} takes 128"
    if SEQ_CTA or WARPS_PER_HEAD != 4:
        return (f"{what} runs one CTA a KV head of four warps (R1MEGA_PAGED_GRID=seq or "
                "R1MEGA_PAGED_FP8_WARPS set otherwise)")
    return None


def rows_cluster_why_not(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
                         pointers: bool = True) -> Optional[str]:
    """None when the tensor-core kernel can quantise its output rows through a cluster of a
    sequence's KV heads, else the reason: head_dim 128 and one CTA a KV head of four warps (the
    tiles' thread layout), at most 8 KV heads (a portable cluster), a device with clusters
    (sm_90+; while tracing, as :func:`prepare` found it), besides :func:`why_not`'s conditions."""
    reason = _thread_a_dim_why_not(q, "the cluster rows epilogue")
    if reason is None and k_cache.shape[2] > 8:
        reason = f"{k_cache.shape[2]} KV heads: a cluster holds at most 8"
    reason = reason or why_not(q, k_cache, k_scale, pointers)
    if reason is not None:
        return reason
    idx = _device_index(q.device)
    if not torch.compiler.is_compiling() and idx not in _CLUSTERS:
        prepare(q.device)
    if not _CLUSTERS.get(idx, False):
        return "the device has no thread-block clusters (sm_90+), or prepare() did not see it"
    return None


def rows_mode(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
              pointers: bool = True) -> Optional[str]:
    """Which rows epilogue serves these operands under the switches: "cluster", "seq" (one CTA a
    sequence) or None."""
    if ROWS_CLUSTER and rows_cluster_why_not(q, k_cache, k_scale, pointers) is None:
        return "cluster"
    if ROWS and rows_why_not(q, k_cache, k_scale, pointers) is None:
        return "seq"
    return None


def serves_rows(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor]) -> bool:
    """Whether a rows call runs an epilogue: switched on, and the tensor-core kernel takes these
    operands with one of them (:func:`rows_mode`). Traced by dynamo in the compiled decode step, where ``data_ptr()`` or
    loading the extension would break the graph at every layer: while compiling, the base
    address's alignment is left out (the op itself checks it again, eagerly, and falls back if it
    must) and only an extension loaded before counts (the model runner loads it when the switch
    is on)."""
    if not ((ROWS or ROWS_CLUSTER) and IMPL == "mma"):
        return False
    tracing = torch.compiler.is_compiling()
    return ((loaded() if tracing else get()) is not None
            and rows_mode(q, k_cache, k_scale, pointers=not tracing) is not None)


def paged_decode_fp8_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                          k_scale: torch.Tensor, v_scale: torch.Tensor, power2: bool = True,
                          pad: int = 16, cluster: Optional[bool] = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Hq, D) -> (out (B, Hq, D), e4m3 rows (B', Hq * D), float32 scales (B', 1)): the
    tensor-core kernel's attention, and ``out.reshape(B, -1)`` quantised as
    ``triton_fp8_rows.fp8_rows(..., power2, pad=pad)`` does it (rows padded to B', a multiple of
    ``pad``, with zero rows of scale 1). ``cluster``: one CTA a KV head, a sequence's CTAs one
    cluster (True), or one CTA a sequence (False); None: as :func:`rows_mode` picks, else False."""
    if cluster is None:
        cluster = ROWS_CLUSTER and rows_cluster_why_not(q, k_cache, k_scale) is None
    return _with_epilogue("paged_decode_fp8_rows", rows_cluster_why_not if cluster else rows_why_not,
                          q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale, v_scale, power2,
                          pad, tiles=False, cluster=cluster)


def _with_epilogue(caller, check, q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale,
                   v_scale, power2: bool, pad: int, tiles: bool, cluster: bool = False):
    """The tensor-core kernel with its rows (scales (B', 1); one CTA a sequence, or with
    ``cluster`` a cluster of one-KV-head CTAs) or tiles (scales (B', Hq)) epilogue; padding rows
    zero with scale 1."""
    ext, q = _ready(caller, q, k_cache, k_scale, check)
    b, hq = q.shape[0], q.shape[1]
    bp = -(-b // pad) * pad
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q8 = torch.empty(bp, hq * q.shape[2], dtype=torch.float8_e4m3fn, device=q.device)
    s8 = torch.empty(bp, hq if tiles else 1, dtype=torch.float32, device=q.device)
    if bp > b:
        q8[b:].view(torch.uint8).zero_()
        s8[b:].fill_(1.0)
    ext.paged_decode_fp8(q, k_cache, v_cache, k_scale, v_scale, block_tables, ctx_lens, out,
                         float(scale), True, bool(HEADS_INNER), q8, s8 if tiles else s8.view(-1),
                         bool(power2), tiles=tiles, cluster=cluster)
    return out, q8, s8


@torch.library.custom_op("r1mega::paged_decode_attention_rows", mutates_args=())
def decode_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                          k_scale: torch.Tensor, v_scale: torch.Tensor, power2: bool,
                          pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`paged_decode_fp8_rows` where it serves (:func:`serves_rows`); elsewhere the decode
    op's attention and the reference row quantiser (the same contract)."""
    if serves_rows(q, k_cache, k_scale):
        return paged_decode_fp8_rows(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale,
                                     v_scale, power2, pad)
    return _attention_quantised(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale, v_scale,
                                power2, pad, "row")


def _attention_quantised(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale, v_scale,
                         power2: bool, pad: int, granularity: str):
    """The epilogue ops' contract without the epilogue: the decode op's attention, and its output
    rows quantised by the reference (``granularity`` "row": scales (B', 1); "tile": (B', C / 128)
    with unit column stride, as the kernel writes them)."""
    from r1mega.precision.linear import _pad_rows
    from r1mega.precision.quantize import quantize_reference
    from r1mega.rollout import triton_paged  # noqa: F401  (registers the decode op)

    out = torch.ops.r1mega.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                                  k_scale, v_scale)
    a = quantize_reference(_pad_rows(out.reshape(q.shape[0], -1), pad), granularity, "e4m3", power2)
    return out, a.data, a.scale.reshape(a.data.shape[0], -1).contiguous()


def _fake_quantised(q, pad: int, scales_a_row: int):
    bp = -(-q.shape[0] // pad) * pad
    return (q.new_empty(q.shape), q.new_empty((bp, q.shape[1] * q.shape[2]), dtype=torch.float8_e4m3fn),
            q.new_empty((bp, scales_a_row), dtype=torch.float32))


@decode_attention_rows.register_fake
def _(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale, v_scale, power2, pad):
    return _fake_quantised(q, pad, 1)


# o_proj's input quantised by the MMA kernel one head at a time (one CTA a KV head, no cross-CTA
# step): each head's D = 128 outputs are a 1 x 128 tile with its own scale, which the split-K FP8
# GEMM (r1mega/precision/triton_skinny_gemm.py) applies per K block
TILES = switches.flag("R1MEGA_PAGED_FP8_TILES", False,
                      "the FP8 rollout's decode attention kernel (tensor cores, one CTA a KV head) also "
                      "writes its output in e4m3 with one scale a head (1 x 128 tiles), for the output "
                      "projection through the split-K FP8 GEMM (one kernel a layer fewer)")


def tiles_why_not(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
                  pointers: bool = True) -> Optional[str]:
    """None when the tensor-core kernel can also write its output as e4m3 head tiles, else the
    reason: head_dim 128 (one thread a dim of four warps), one CTA a KV head of four warps,
    besides :func:`why_not`'s conditions."""
    return _thread_a_dim_why_not(q, "the tiles epilogue") or why_not(q, k_cache, k_scale, pointers)


def serves_tiles(q: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor]) -> bool:
    """As :func:`serves_rows`, for the tiles epilogue (switched by ``R1MEGA_PAGED_FP8_TILES``)."""
    if not (TILES and IMPL == "mma"):
        return False
    tracing = torch.compiler.is_compiling()
    return ((loaded() if tracing else get()) is not None
            and tiles_why_not(q, k_cache, k_scale, pointers=not tracing) is None)


def paged_decode_fp8_tiles(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                           k_scale: torch.Tensor, v_scale: torch.Tensor, power2: bool = True,
                           pad: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Hq, 128) -> (out (B, Hq, 128), e4m3 rows (B', Hq * 128), float32 scales (B', Hq)):
    the tensor-core kernel's attention, and ``out.reshape(B, -1)`` quantised in 1 x 128 tiles as
    ``quantize_reference(..., "tile", power2=power2)`` does it (rows padded to B', a multiple of
    ``pad``, with zero rows of scale 1)."""
    return _with_epilogue("paged_decode_fp8_tiles", tiles_why_not, q, k_cache, v_cache, block_tables,
                          ctx_lens, scale, k_scale, v_scale, power2, pad, tiles=True)


@torch.library.custom_op("r1mega::paged_decode_attention_tiles", mutates_args=())
def decode_attention_tiles(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                           k_scale: torch.Tensor, v_scale: torch.Tensor, power2: bool,
                           pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`paged_decode_fp8_tiles` where it serves (:func:`serves_tiles`); elsewhere the decode
    op's attention and the reference tile quantiser (the same contract)."""
    if serves_tiles(q, k_cache, k_scale):
        return paged_decode_fp8_tiles(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale,
                                      v_scale, power2, pad)
    return _attention_quantised(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale, v_scale,
                                power2, pad, "tile")


@decode_attention_tiles.register_fake
def _(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale, v_scale, power2, pad):
    return _fake_quantised(q, pad, -(-(q.shape[1] * q.shape[2]) // 128))
