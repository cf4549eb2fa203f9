"""Batch-invariant numerics for ``rollout.exact``: a token's values do not depend on its batch.

GRPO's importance ratio compares the rollout's log-prob of a token with the training forward's.
Both read the same weights, yet the two differ whenever an operation's reduction order depends on
the shape of the batch the token travels in: a decode step has one row per sequence, a packed
training micro-batch thousands. This module makes every such operation compute a row the same
way whatever the other rows are (the approach of "batch-invariant ops": fixed reduction order,
no shape-dependent split):

- **matmul** (:func:`bi_mm`): on CUDA a Triton GEMM with one fixed tile configuration and no
  split-K (:mod:`r1mega.ops.triton_batch_invariant`), or with ``R1MEGA_EXACT_GEMM=cublaslt`` one
  fixed cuBLASLt algorithm per weight shape (:mod:`r1mega.ops.cublaslt_exact`); elsewhere the rows go through ``torch.mm``
  in fixed blocks of :data:`ROW_BLOCK` rows, so every call a row meets has the same shape
  (CPU BLAS picks its kernel and its K blocking by M: a row's dot products change with the batch).
- **reductions** (:func:`tree_sum`, :func:`tree_max`): a pairwise tree of elementwise adds whose
  shape depends only on the reduced length. torch's own CPU reductions split long rows over
  threads when there are few rows (a decode step), so their order changes with the row count.
- **transcendentals on CPU** (:func:`det_exp`, :func:`det_log`, :func:`det_cos`, :func:`det_sin`,
  :func:`det_silu`): torch's CPU kernels run a SIMD body and a scalar tail with different
  ``exp``/``cos`` implementations, and which elements land in the tail depends on the tensor's
  size. Here they are float64 polynomials made of correctly rounded ``+ - * /`` only, rounded to
  the input dtype: the same bits at any position. CUDA's elementwise kernels already compute
  each element the same way, so on CUDA the native functions run.
- **SwiGLU on CUDA**: the dense MLPs call fused Triton kernels (r1mega/ops/triton_swiglu.py)
  instead of megatron's compiled fusion or its five-kernel unfused path
  (:func:`install_exact_forward` wires them, r1mega/ops/exact_mlp.py).

:class:`ExactNumerics` is a ``TorchFunctionMode`` that routes the model's calls (``matmul``,
``F.linear``, ``F.rms_norm``, ``F.silu``, ``torch.cos`` ...) to these while it is active; it is
entered by the rollout engine and, through :func:`install_exact_forward`, by every forward of the
policy model. Attention is routed explicitly (r1mega/ops/exact_attention.py); an SDPA call that
reaches the mode is an error, so no path silently escapes it. Backward passes use the native
kernels (gradients need no bitwise match).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROW_BLOCK = 16  # rows per torch.mm call on the blocked path (one fixed GEMM shape)
# Per thread, like torch's mode stack: a reward worker thread never sees the rollout's mode.
_state = threading.local()


def exact_active() -> bool:
    """Whether an :func:`exact_numerics` context is active (the rollout and core attention ask).
    False while dynamo traces (the exact mode never compiles, validation sees to it), so the
    default path's compiled regions do not trace the thread-local read (a graph break)."""
    if torch.compiler.is_compiling():
        return False
    return getattr(_state, "depth", 0) > 0


# ----------------------------------------------------------------------------- reductions


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` by halving: the add tree depends on ``x.shape[dim]`` alone."""
    return _tree(x, dim, torch.add, 0.0)


def tree_max(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return _tree(x, dim, torch.maximum, float("-inf"))


def _tree(x: torch.Tensor, dim: int, op, pad_value: float) -> torch.Tensor:
    dim = dim % x.dim()
    n = x.shape[dim]
    if n == 0:
        shape = list(x.shape)
        del shape[dim]
        return torch.full(shape, pad_value, dtype=x.dtype, device=x.device)
    width = 1 << (n - 1).bit_length()  # next power of two
    if width != n:
        pad_shape = list(x.shape)
        pad_shape[dim] = width - n
        x = torch.cat([x, torch.full(pad_shape, pad_value, dtype=x.dtype, device=x.device)], dim)
    while width > 1:
        width //= 2
        x = op(x.narrow(dim, 0, width), x.narrow(dim, width, width))
    return x.squeeze(dim)


# ----------------------------------------------------------------------------- transcendentals

_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2
_HALF_PI = math.pi / 2
_EXP_COEF = [1.0 / math.factorial(n) for n in range(14)]  # |r| <= ln2/2: r^14/14! < 1e-17


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2.0 ** k exactly (float64, k integral in [-1022, 1023]) from its exponent bits."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _exp64(x: torch.Tensor) -> torch.Tensor:
    """float64 exp from + - * / only: exp(x) = 2^k exp(r), r = x - k ln2, Taylor in r."""
    x = x.clamp(-708.0, 709.0)
    k = torch.round(x * _INV_LN2)
    r = x - k * _LN2
    p = torch.full_like(r, _EXP_COEF[-1])
    for c in reversed(_EXP_COEF[:-1]):
        p = p * r + c
    return p * _pow2(k)


def _log64(x: torch.Tensor) -> torch.Tensor:
    """float64 log: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1))."""
    m, e = torch.frexp(x)
    low = m < math.sqrt(0.5)
    m = torch.where(low, m * 2.0, m)
    e = (e - low.to(e.dtype)).to(torch.float64)
    s = (m - 1.0) / (m + 1.0)  # |s| < 0.172: s^23 / 23 < 1e-18
    s2 = s * s
    p = torch.full_like(s, 1.0 / 23.0)
    for n in range(21, 0, -2):
        p = p * s2 + 1.0 / n
    out = 2.0 * s * p + e * _LN2
    out = torch.where(x == 0, torch.full_like(out, float("-inf")), out)
    out = torch.where(x < 0, torch.full_like(out, float("nan")), out)
    return torch.where(torch.isinf(x) & (x > 0), x, out)


def _sincos64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (sin, cos): quadrant n = round(x / (pi/2)), Taylor on |r| <= pi/4."""
    n = torch.round(x / _HALF_PI)
    r = x - n * _HALF_PI
    r2 = r * r
    s = torch.full_like(r, (-1) ** 9 / math.factorial(19))
    for j in range(8, -1, -1):  # sin r = sum (-1)^j r^(2j+1) / (2j+1)!
        s = s * r2 + (-1) ** j / math.factorial(2 * j + 1)
    s = s * r
    c = torch.full_like(r, (-1) ** 9 / math.factorial(18))
    for j in range(8, -1, -1):
        c = c * r2 + (-1) ** j / math.factorial(2 * j)
    q = torch.remainder(n, 4.0)
    sin = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    cos = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    return sin, cos


def _on_cpu_float(x: torch.Tensor) -> bool:
    return not x.is_cuda and x.is_floating_point()


def det_exp(x: torch.Tensor) -> torch.Tensor:
    if not _on_cpu_float(x):
        return torch.exp(x)
    return _exp64(x.double()).to(x.dtype)


def det_log(x: torch.Tensor) -> torch.Tensor:
    if not _on_cpu_float(x):
        return torch.log(x)
    return _log64(x.double()).to(x.dtype)


def det_cos(x: torch.Tensor) -> torch.Tensor:
    if not _on_cpu_float(x):
        return torch.cos(x)
    return _sincos64(x.double())[1].to(x.dtype)


def det_sin(x: torch.Tensor) -> torch.Tensor:
    if not _on_cpu_float(x):
        return torch.sin(x)
    return _sincos64(x.double())[0].to(x.dtype)


def det_silu(x: torch.Tensor) -> torch.Tensor:
    if not _on_cpu_float(x):
        return F.silu(x)
    x64 = x.double()
    return (x64 / (1.0 + _exp64(-x64))).to(x.dtype)


# ----------------------------------------------------------------------------- row-wise ops


def _cuda_gemm_mode() -> tuple[str, int]:
    """R1MEGA_EXACT_GEMM: "triton" (default: the fixed-tile Triton GEMM), "cublaslt" (one fixed
    cuBLASLt algorithm per weight shape, checked batch-invariant: r1mega/ops/cublaslt_exact.py)
    or "cublas:R" (cuBLAS on blocks of exactly R rows, the last one zero-padded: every call has
    one shape, so cuBLAS picks one kernel and a row's bits do not depend on the batch).
    Process-wide, so the rollout and the trainer of a run agree; ``r1mega bench exact-gemm``
    times the candidates."""
    spec = os.environ.get("R1MEGA_EXACT_GEMM", "triton")
    if os.environ.get("R1MEGA_EXACT_TRITON", "1") == "0":
        return "cublas", ROW_BLOCK
    if spec in ("triton", "cublaslt"):
        return spec, 0
    if spec.startswith("cublas:") and spec[7:].isdigit() and int(spec[7:]) > 0:
        return "cublas", int(spec[7:])
    raise ValueError(f"R1MEGA_EXACT_GEMM={spec!r}: expected 'triton', 'cublaslt' or 'cublas:ROWS' "
                     f"(e.g. cublas:256)")


def _blocked_mm(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    """(M, K) @ (K, N) as torch.mm calls of exactly ``rows`` rows each (last block padded)."""
    m, k = a.shape
    out = torch.empty(m, b.shape[1], dtype=a.dtype, device=a.device)
    full = m - m % rows
    a = a if a.stride(-1) == 1 else a.contiguous()
    for i in range(0, full, rows):
        torch.mm(a[i:i + rows], b, out=out[i:i + rows])
    if full < m:
        padded = a.new_zeros(rows, k)
        padded[:m - full] = a[full:]
        out[full:] = torch.mm(padded, b)[:m - full]
    return out


def bi_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (K, N) -> (M, N); row i's result does not depend on M or on the other rows."""
    if a.is_cuda:
        mode, rows = _cuda_gemm_mode()
        if mode == "cublaslt":
            from r1mega.ops import cublaslt_exact

            if cublaslt_exact.supported(a, b):
                return cublaslt_exact.matmul(a, b)
            mode = "triton"  # float32, no extension, an unaligned weight shape: both sides alike
        if mode == "triton":
            from r1mega.ops import triton_batch_invariant as tbi

            if tbi.HAVE_TRITON and a.dtype in (torch.bfloat16, torch.float16, torch.float32):
                return tbi.matmul(a, b)
        else:
            return _blocked_mm(a, b.to(a.dtype), rows)
    # CPU BLAS picks its kernel and K blocking by M: fixed 16-row blocks, one shape.
    return _blocked_mm(a, b, ROW_BLOCK)


def bi_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in float32 for 16-bit inputs (as ``F.rms_norm`` does)."""
    from r1mega.ops import triton_rows

    if triton_rows.supported(x) and os.environ.get("R1MEGA_EXACT_TRITON", "1") != "0":
        return triton_rows.rms_norm(x, weight, eps)
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    ms = tree_sum(xf * xf, -1) / xf.shape[-1]
    y = (xf * (1.0 / torch.sqrt(ms + eps))[..., None]).to(x.dtype)
    return y if weight is None else y * weight.to(x.dtype)


def bi_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim (float32 for 16-bit inputs)."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    m = tree_max(xf, -1)[..., None]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return xf - m - det_log(tree_sum(det_exp(xf - m), -1))[..., None]


def bi_softmax(x: torch.Tensor) -> torch.Tensor:
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    m = tree_max(xf, -1)[..., None]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = det_exp(xf - m)
    return (e / tree_sum(e, -1)[..., None]).to(x.dtype)


# ----------------------------------------------------------------------------- autograd glue


class _NativeBackward(torch.autograd.Function):
    """Forward: the batch-invariant function; backward: autograd through the native one."""

    @staticmethod
    def forward(ctx, exact_fn, native_fn, *tensors):
        ctx.native_fn = native_fn
        ctx.save_for_backward(*tensors)
        return exact_fn(*tensors)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[2:]
        tensors = [None if t is None else t.detach().requires_grad_(n)
                   for t, n in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            out = ctx.native_fn(*tensors)
        wanted = [t for t, n in zip(tensors, needs) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None) + tuple(next(grads) if n else None for n in needs)


def _apply(exact_fn, native_fn, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _NativeBackward.apply(exact_fn, native_fn, *tensors)
    return exact_fn(*tensors)


def _matmul(a, b):
    """torch.matmul for (..., K) @ (K, N); None for shapes the model's linears never make."""
    if b.dim() != 2 or a.dim() < 2 or not a.is_floating_point():
        return None
    lead = a.shape[:-1]

    def exact(a_, b_):
        return bi_mm(a_.reshape(-1, a_.shape[-1]), b_).reshape(*lead, b_.shape[1])

    return _apply(exact, torch.matmul, a, b)


def _linear(x, w, bias=None):
    out = _matmul(x, w.t())
    return out if bias is None else out + bias


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    if len(tuple(normalized_shape)) != 1:
        return None
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _apply(lambda x_, w_: bi_rms_norm(x_, w_, eps),
                  lambda x_, w_: F.rms_norm(x_, normalized_shape, w_, eps), x, weight)


def _last_dim(fn, native):
    def route(x, dim=None, *args, **kwargs):
        if dim is None or dim not in (-1, x.dim() - 1) or kwargs.get("dtype") is not None:
            return None
        return _apply(fn, lambda x_: native(x_, dim), x)
    return route


def _unary(fn, native):
    def route(x, *args, **kwargs):
        # CUDA's elementwise kernels compute each element alike at any size: native there.
        if args or kwargs.get("out") is not None or kwargs.get("inplace") or \
                not isinstance(x, torch.Tensor) or x.is_cuda:
            return None
        return _apply(fn, native, x)
    return route


def _no_sdpa(*args, **kwargs):
    raise RuntimeError(
        "rollout.exact: scaled_dot_product_attention was called inside the batch-invariant "
        "mode, so an attention path was not routed through r1mega/ops/exact_attention.py "
        "(its key order would depend on the batch). Route that path, or set rollout.exact=false.")


_ROUTES = {
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul, F.linear: _linear,
    F.rms_norm: _rms_norm,
    torch.exp: _unary(det_exp, torch.exp), torch.Tensor.exp: _unary(det_exp, torch.exp),
    torch.log: _unary(det_log, torch.log), torch.Tensor.log: _unary(det_log, torch.log),
    torch.cos: _unary(det_cos, torch.cos), torch.Tensor.cos: _unary(det_cos, torch.cos),
    torch.sin: _unary(det_sin, torch.sin), torch.Tensor.sin: _unary(det_sin, torch.sin),
    F.silu: _unary(det_silu, F.silu),
    F.log_softmax: _last_dim(bi_log_softmax, F.log_softmax),
    torch.log_softmax: _last_dim(bi_log_softmax, torch.log_softmax),
    torch.Tensor.log_softmax: _last_dim(bi_log_softmax, torch.log_softmax),
    F.softmax: _last_dim(bi_softmax, F.softmax), torch.softmax: _last_dim(bi_softmax, torch.softmax),
    torch.Tensor.softmax: _last_dim(bi_softmax, torch.softmax),
    F.scaled_dot_product_attention: _no_sdpa,
}


class ExactNumerics(TorchFunctionMode):
    """Routes the model's row-reducing calls to the batch-invariant versions (module docstring).
    Calls it does not know, or shapes a route declines (it returns None), run natively."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        # Backward passes need no bitwise match: the native kernels are faster there.
        if route is not None and torch._C._current_graph_task_id() == -1:
            out = route(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_numerics(enabled: bool = True):
    """Run the enclosed code with batch-invariant numerics (no-op when ``enabled`` is False)."""
    if not enabled:
        yield
        return
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with ExactNumerics():
            yield
    finally:
        _state.depth -= 1


def install_exact_forward(model_chunks) -> None:
    """Every forward of these GPTModels (training, log-prob passes) runs in :func:`exact_numerics`;
    idempotent. The rollout engine calls it, so the policy it generates from trains exactly."""
    from r1mega.ops.exact_mlp import route_swiglu  # megatron import: not at this module's load

    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        m = chunk
        while hasattr(m, "module") and not hasattr(m, "decoder"):
            m = m.module
        if getattr(m, "_r1mega_exact", False):
            continue
        check_exact_supported(m)
        # megatron's GPU fusions of SwiGLU and bias-dropout-add are torch.compile'd: inductor
        # kernels outside this mode. The unfused modules (the CPU path) are read at call time.
        # On CUDA the MLPs call our fused batch-invariant SwiGLU instead (r1mega/ops/exact_mlp.py).
        # Bias-dropout-add stays unfused: with no bias and hidden_dropout 0 it is one add
        # (dropout returns its input), all the compiled fusion would do too.
        saved = (m.config.bias_activation_fusion, m.config.bias_dropout_fusion)
        m.config.bias_activation_fusion = False
        m.config.bias_dropout_fusion = False
        mlps = route_swiglu(m)
        stack = []

        def enter(module, args, kwargs, stack=stack):
            cm = exact_numerics()
            cm.__enter__()
            stack.append(cm)

        def leave(module, args, kwargs, output, stack=stack):
            stack.pop().__exit__(None, None, None)

        hooks = (m.register_forward_pre_hook(enter, with_kwargs=True),
                 m.register_forward_hook(leave, with_kwargs=True, always_call=True))
        m._r1mega_exact = (hooks, saved, mlps)


def remove_exact_forward(model_chunks) -> None:
    """Undo :func:`install_exact_forward` (benchmarks time both modes on one model)."""
    from r1mega.ops.exact_mlp import restore_swiglu

    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        m = chunk
        while hasattr(m, "module") and not hasattr(m, "decoder"):
            m = m.module
        state = getattr(m, "_r1mega_exact", None)
        if not state:
            continue
        hooks, (act, bda), mlps = state
        for h in hooks:
            h.remove()
        restore_swiglu(mlps)
        m.config.bias_activation_fusion, m.config.bias_dropout_fusion = act, bda
        m._r1mega_exact = None


def check_exact_supported(model) -> None:
    """The exact mode covers r1mega's local dense spec; anything else is refused by name."""
    from r1mega.models.attention import PackedCoreAttention

    for i, layer in enumerate(getattr(getattr(model, "decoder", None), "layers", [])):
        core = getattr(layer.self_attention, "core_attention", None)
        if not isinstance(core, PackedCoreAttention):
            raise NotImplementedError(
                f"rollout.exact: layer {i}'s core attention is {type(core).__name__}, not r1mega's "
                f"PackedCoreAttention (the Transformer Engine spec?); set model.spec=local.")
        if hasattr(layer.mlp, "router") or hasattr(layer.mlp, "experts"):
            raise NotImplementedError(
                f"rollout.exact: layer {i} is an MoE layer; the exact mode covers dense models "
                f"only (set model.num_experts=0 or rollout.exact=false).")
