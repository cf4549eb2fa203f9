"""Core attention for packed variable-length sequences (THD + cu_seqlens), placed in the layer spec.

megatron's local ``DotProductAttention`` refuses packed sequences and materialises the full score
matrix; this module is the ``core_attention`` submodule of r1mega's local spec instead. It sees
q/k/v after the QKV projection and RoPE:

  packed (``packed_seq_params.qkv_format == "thd"``): q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)
  unpacked: q (S, B, Hq, D), k/v (S, B, Hkv, D) -> (S, B, Hq*D)

Backends (``model.attention_backend``):
  sdpa    one SDPA call; packed batches get a block-diagonal causal mask (the CPU path and the
          reference every other backend is tested against). When every packed sequence has the
          same length (known on the host, see :class:`PackedSeqs`) the batch is reshaped to
          (B, S) and SDPA runs with ``is_causal`` -- no mask, the fastest GPU path.
  varlen  ``torch.nn.attention.varlen.varlen_attn`` (flash kernels in torch, GPU only).
  flash   flash-attn's ``flash_attn_varlen_func`` when installed.
  auto    GPU: equal lengths -> SDPA causal, else flash if installed, else varlen; CPU: sdpa.

Under torch.compile (``torch.compiler.is_compiling()``, see r1mega/models/compile.py) the packed
path reads tensors only: the host tuple ``seq_lengths`` would become a guard that changes every
step (a recompile per micro-batch) and the ``.tolist()`` fallback a graph break. There the mask of
``sdpa`` is built on the device from ``cu_seqlens`` (no equal-length shortcut), and ``auto`` on a
GPU means torch's ``varlen`` (a torch custom op with autograd that dynamo keeps whole; flash-attn
is traceable only where its version registers custom ops). ``max_seqlen`` stays the symbolic int
the compiled layer receives (see :func:`compile_packed_seqs`), so one graph serves every step.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from r1mega.ops.batch_invariant import exact_active

try:  # optional, GPU clusters only
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # ImportError, or a broken CUDA build of flash-attn
    _flash_varlen = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
    _VARLEN_HAS_GQA = "enable_gqa" in inspect.signature(_torch_varlen).parameters
except Exception:
    _torch_varlen = None
    _VARLEN_HAS_GQA = False


@dataclass
class PackedSeqs(PackedSeqParams):
    """megatron's PackedSeqParams plus the sequence lengths on the host.

    Knowing the lengths without reading ``cu_seqlens`` back from the GPU lets attention choose its
    kernel without a device sync (and lets the equal-length case skip masks altogether).
    """

    seq_lengths: tuple = ()


def make_packed_seqs(seq_lengths, device) -> PackedSeqs:
    """PackedSeqParams (THD) for sequences of ``seq_lengths`` tokens laid end to end."""
    lengths = tuple(int(n) for n in seq_lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    if torch.device(device).type == "cuda":
        # From pinned memory the copy is queued; from pageable memory it blocks the host until
        # the GPU has drained its queue (seen as a sync per micro-batch in the step profile).
        cu = cu.pin_memory().to(device, non_blocking=True)
    else:
        cu = cu.to(device)
    max_len = max(lengths) if lengths else 0
    return PackedSeqs(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max_len, max_seqlen_kv=max_len, seq_lengths=lengths,
    )


def packed_seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) index of each packed token's sequence, from ``cu_seqlens`` on its device (no host
    read). Not ``cu_seqlens[1:]``: under dynamo the slice's contiguity check guards on two or
    more sequences, which a single-sequence batch breaks (a recompile)."""
    pos = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)  # (T,)
    return torch.searchsorted(cu_seqlens, pos, right=True) - 1


def block_causal_mask_from_cu(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T, T) bool, True where attention is allowed: causal inside each packed sequence."""
    seq_id = packed_seq_ids(cu_seqlens, total)  # (T,)
    pos = torch.arange(total, device=cu_seqlens.device)
    return (seq_id[:, None] == seq_id[None, :]) & (pos[None, :] <= pos[:, None])


def block_causal_mask(seq_lengths, device) -> torch.Tensor:
    """:func:`block_causal_mask_from_cu` for host-side sequence lengths."""
    lengths = [int(n) for n in seq_lengths]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return block_causal_mask_from_cu(cu.to(device), sum(lengths))


def _sdpa_masked(q, k, v, mask, scale: Optional[float]) -> torch.Tensor:
    """One SDPA call over all packed tokens with a (T, T) mask. q (T, Hq, D) -> (T, Hq, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (1, Hq, T, D)
    return out.squeeze(0).transpose(0, 1)


def sdpa_packed_cu(q, k, v, cu_seqlens, scale: Optional[float]) -> torch.Tensor:
    """:func:`sdpa_packed` without host lengths (the traced path). q (T, Hq, D) -> (T, Hq, D)."""
    return _sdpa_masked(q, k, v, block_causal_mask_from_cu(cu_seqlens, q.shape[0]), scale)


def max_seqlen_bucket(max_seqlen: int) -> int:
    """``max_seqlen`` rounded up to a multiple of 128 (flash varlen only needs an upper bound).

    128 is the flash forward's query tile, so its grid does not grow. The bucket keeps the value
    away from 0 and 1, which dynamo would specialise, and from the exact lengths of the batch.
    """
    return max(128, -(-int(max_seqlen) // 128) * 128)


def compile_packed_seqs(params: PackedSeqParams) -> PackedSeqParams:
    """The THD parameters a compiled layer receives: tensors and bucketed ints, no host tuple.

    A plain ``PackedSeqParams`` (not :class:`PackedSeqs`): ``seq_lengths`` would be guarded on by
    value. Made once per micro-batch (kept on ``params``), then shared by every layer.
    """
    made = getattr(params, "_r1mega_compiled", None)
    if made is None:
        made = PackedSeqParams(
            qkv_format=params.qkv_format,
            cu_seqlens_q=params.cu_seqlens_q, cu_seqlens_kv=params.cu_seqlens_kv,
            cu_seqlens_q_padded=params.cu_seqlens_q_padded,
            cu_seqlens_kv_padded=params.cu_seqlens_kv_padded,
            max_seqlen_q=max_seqlen_bucket(params.max_seqlen_q),
            max_seqlen_kv=max_seqlen_bucket(params.max_seqlen_kv),
        )
        params._r1mega_compiled = made
    return made


def sdpa_packed(q, k, v, seq_lengths, scale: Optional[float]) -> torch.Tensor:
    """Reference packed attention. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    hq, hkv = q.shape[1], k.shape[1]
    gqa = hq != hkv
    lengths = [int(n) for n in seq_lengths]
    if lengths and all(n == lengths[0] for n in lengths):
        b, s = len(lengths), lengths[0]
        # (T, H, D) -> (B, H, S, D): equal lengths need no mask at all.
        qb = q.view(b, s, hq, -1).transpose(1, 2)
        kb = k.view(b, s, hkv, -1).transpose(1, 2)
        vb = v.view(b, s, hkv, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(*q.shape[:2], v.shape[-1])  # (T, Hq, Dv)
    return _sdpa_masked(q, k, v, block_causal_mask(lengths, q.device), scale)


def _v_padded(fn):
    """MLA's values are narrower than its queries/keys (128 vs 192 for V3); flash kernels take one
    head size, so v is zero-padded to it and the padding columns of the output dropped (zero
    value columns contribute exactly zero)."""

    def wrapped(q, k, v, *args, **kwargs):
        dv = v.shape[-1]
        if dv == q.shape[-1]:
            return fn(q, k, v, *args, **kwargs)
        out = fn(q, k, F.pad(v, (0, q.shape[-1] - dv)), *args, **kwargs)
        return out[..., :dv]

    wrapped.__doc__ = fn.__doc__
    return wrapped


@_v_padded
def varlen_packed(q, k, v, cu_seqlens, max_seqlen: int, scale: Optional[float]) -> torch.Tensor:
    """torch's varlen flash attention, causal via window (-1, 0). q (T, Hq, D) -> (T, Hq, D)."""
    if _torch_varlen is None:
        raise RuntimeError("model.attention_backend=varlen needs torch.nn.attention.varlen "
                           "(torch >= 2.10 with CUDA); use attention_backend=sdpa.")
    hq, hkv = q.shape[1], k.shape[1]
    kwargs = {}
    if hq != hkv:
        if _VARLEN_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
    return _torch_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                         scale=scale, window_size=(-1, 0), **kwargs)


@_v_padded
def flash_packed(q, k, v, cu_seqlens, max_seqlen: int, scale: Optional[float]) -> torch.Tensor:
    if _flash_varlen is None:
        raise RuntimeError("model.attention_backend=flash but flash-attn is not importable; "
                           "install flash-attn or use attention_backend=auto.")
    return _flash_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                         softmax_scale=scale, causal=True)


class PackedCoreAttention(MegatronModule):
    """``core_attention`` submodule for r1mega's local spec (signature matches megatron's)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, backend: str = "auto", k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError("PackedCoreAttention has no context parallelism; "
                                      "set parallel.context=1.")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: PackedCoreAttention has no dropout "
                             "(RL fine-tuning does not use it); set it to 0.")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"PackedCoreAttention is causal only, got {attn_mask_type}.")
        self.softmax_scale = softmax_scale
        self.backend = backend

    def _choose(self, device: torch.device, equal_lengths: bool) -> str:
        if self.backend != "auto":
            return self.backend
        if device.type != "cuda" or equal_lengths:
            return "sdpa"
        return "flash" if _flash_varlen is not None else "varlen"

    def _choose_traced(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        if device.type != "cuda":
            return "sdpa"
        return "varlen" if _torch_varlen is not None else "flash"

    def _forward_traced(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        """The packed path under dynamo: tensors and symbolic ints only (module docstring)."""
        cu = params.cu_seqlens_q
        backend = self._choose_traced(query.device)
        if backend == "sdpa":
            return sdpa_packed_cu(query, key, value, cu, self.softmax_scale)
        # No int(): it would specialise the symbolic max_seqlen (a recompile per bucket).
        max_len = params.max_seqlen_q
        if backend == "varlen":
            return varlen_packed(query, key, value, cu, max_len, self.softmax_scale)
        if backend == "flash":
            return flash_packed(query, key, value, cu, max_len, self.softmax_scale)
        raise ValueError(f"model.attention_backend={backend!r} is not sdpa|varlen|flash|auto.")

    def _forward_exact(self, query, key, value, params: Optional[PackedSeqParams]) -> torch.Tensor:
        """r1mega/ops/exact_attention.py, the function the rollout's cache attention calls."""
        from r1mega.ops.exact_attention import exact_packed_attention

        scale = self.softmax_scale or 1.0 / math.sqrt(query.shape[-1])
        if params is None:  # (S, B, H, D): B sequences of S tokens
            s, b, hq, d = query.shape
            flat = [x.transpose(0, 1).reshape(b * s, x.shape[2], d) for x in (query, key, value)]
            out = exact_packed_attention(*flat, [s] * b, scale)  # (B*S, Hq, D)
            return out.view(b, s, hq * d).transpose(0, 1)
        lengths = getattr(params, "seq_lengths", ()) or tuple(
            (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).tolist())
        return exact_packed_attention(query, key, value, lengths, scale)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention does not take an attention_bias.")
        if exact_active():  # rollout.exact: the rollout's own per-query attention function
            return self._forward_exact(query, key, value, packed_seq_params)
        if packed_seq_params is None:
            # (S, B, H, D) -> (B, H, S, D); plain causal batch.
            # MLA: q/k are D wide, v Dv (SDPA takes the two widths).
            s, b, hq, _ = query.shape
            out = F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                is_causal=True, scale=self.softmax_scale, enable_gqa=hq != key.shape[2],
            )  # (B, Hq, S, Dv)
            return out.permute(2, 0, 1, 3).reshape(s, b, hq * value.shape[-1])
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"PackedCoreAttention expects qkv_format='thd', got "
                             f"{packed_seq_params.qkv_format!r}.")
        if torch.compiler.is_compiling():
            return self._forward_traced(query, key, value, packed_seq_params)
        seq_lengths = getattr(packed_seq_params, "seq_lengths", ())
        if not seq_lengths:
            # A plain PackedSeqParams: one device->host read of the lengths.
            cu = packed_seq_params.cu_seqlens_q
            seq_lengths = tuple((cu[1:] - cu[:-1]).tolist())
        equal = all(n == seq_lengths[0] for n in seq_lengths)
        backend = self._choose(query.device, equal)
        if backend == "sdpa":
            return sdpa_packed(query, key, value, seq_lengths, self.softmax_scale)
        cu = packed_seq_params.cu_seqlens_q
        max_len = int(packed_seq_params.max_seqlen_q)
        if backend == "varlen":
            return varlen_packed(query, key, value, cu, max_len, self.softmax_scale)
        if backend == "flash":
            return flash_packed(query, key, value, cu, max_len, self.softmax_scale)
        raise ValueError(f"model.attention_backend={backend!r} is not sdpa|varlen|flash|auto.")
