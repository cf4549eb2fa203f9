"""r1mega's native FP8 linear inside megatron's ColumnParallelLinear / RowParallelLinear.

megatron's parallel linears do their tensor-parallel communication around one call,
``self._forward_impl(input, weight, bias, ..., allreduce_dgrad, sequence_parallel, tp_group)``
(``linear_with_grad_accumulation_and_async_allreduce``): the column layer's sequence-parallel
all-gather of the input and its dgrad reduce-scatter / all-reduce happen inside it, the row
layer's output reduction after it. The FP8 layers replace only that call, with
:func:`fp8_linear` (a forward and a backward custom op), which keeps those collectives and swaps
the three GEMMs for FP8 ones:

  forward  y  = x  @ w.T     x: activation recipe, w: weight recipe (cached per pass)
  dgrad    dx = dy @ w       dy: gradient recipe in ``grad_format``, w.T: weight recipe (cached)
  wgrad    dw = dy.T @ x     both quantised along the tokens (activation/gradient recipe)

Tensorwise and blockwise quantise x and dy for both layouts in one read each (quantize_dual):
the forward keeps x.T in FP8 for wgrad rather than x in bf16, and dy is quantised once.

The weight stays a bf16 parameter (megatron's optimizer keeps fp32 masters); its FP8 copies are
derived state: :class:`Fp8WeightCache` quantises each weight once per pass over the micro-batches
(``new_weight_generation`` is called at the start of each schedule run and after each optimizer
step), so micro-batches and activation recomputation reuse them; a refresh writes into the same
tensors, so a CUDA graph captured over them (the rollout's decode) stays valid.

Under tensor parallelism each rank quantises its own shard: blockwise with 128-aligned shards
gives the same tiles and blocks as one rank (tests/distributed/test_fp8_tp.py), while tensorwise
scales (and rowwise scales of a row-parallel weight) are per shard, so those recipes differ from
TP=1 by FP8 rounding, not by more.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from r1mega import switches
from r1mega.precision.gemm import alignment, fp8_gemm
from r1mega.precision.policy import BLOCKWISE_E4M3_ONLY, Fp8Policy
from r1mega.precision.quantize import Fp8Tensor, out_problems, quantize, quantize_dual, reusable

# recipe -> (activation, weight, gradient) granularity, all along the GEMM's contraction.
RECIPE_GRANULARITY = {
    "tensorwise": ("tensor", "tensor", "tensor"),
    "rowwise": ("row", "row", "row"),
    "blockwise": ("tile", "block", "tile"),
}

_GENERATION = itertools.count(1)
_current = [0]


def graph_side_enabled() -> bool:
    """R1MEGA_FP8_GRAPH: inside compiled regions the FP8 preparation that inductor can fuse runs
    as graph ops (1, the default: a tensorwise linear's amaxes here, the FP8 rollout's activation
    quantiser in r1mega/precision/rollout.py); 0 keeps r1mega's Triton kernels there too (the
    A/B of `r1mega bench fp8` across two processes). Read per call."""
    return switches.flag("R1MEGA_FP8_GRAPH", True, "graph-side FP8 preparation under torch.compile")


def new_weight_generation() -> None:
    """Invalidate every cached FP8 weight (weights may have changed since the last pass)."""
    _current[0] = next(_GENERATION)


def _fits(old: Fp8Tensor, new: Fp8Tensor) -> bool:
    """Whether ``new``'s values can be copied into ``old``'s tensors (any scale strides)."""
    if new.data.dim() != 2:  # the experts' (E, N, K) stacks
        return ((old.data.shape, old.scale.shape, old.data.device)
                == (new.data.shape, new.scale.shape, new.data.device))
    return not out_problems(old, new.data.shape, new.granularity, new.fmt, new.data.device)


class Fp8WeightCache:
    """One layer's FP8 weight copies, for the forward (w) and dgrad (w.T) GEMMs."""

    def __init__(self):
        self._entries: dict[str, tuple[tuple, Fp8Tensor]] = {}
        self.quantizations = 0  # how many times the bf16 weight was read to quantise (tests count)
        # Tensorwise: weight -> its float32 (1,) max |w| made by the optimizer's step, or None
        # (LeanAdamW.weight_amax, wired by weight_amax_from_optimizers): the quantiser then
        # skips its own pass over the weight.
        self.amax_source = None
        self.given_amaxes = 0

    def _amax(self, weight: torch.Tensor, gran: str) -> Optional[torch.Tensor]:
        if gran != "tensor" or self.amax_source is None:
            return None
        amax = self.amax_source(weight)
        self.given_amaxes += amax is not None
        return amax

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple:
        # data_ptr: megatron may re-point .data (buffers); _version: plain in-place updates.
        return (_current[0], weight.data_ptr(), weight._version, tuple(weight.shape))

    def _store(self, which: str, key: tuple, q: Fp8Tensor) -> Fp8Tensor:
        hit = self._entries.get(which)
        if hit is not None and hit[1] is not q and _fits(hit[1], q):
            # Refresh in place: a CUDA graph captured over the copy (the rollout's decode) then
            # reads the new weights on its next replay.
            hit[1].data.copy_(q.data)
            hit[1].scale.copy_(q.scale)
            q = hit[1]
        self._entries[which] = (key, q)
        return q

    def _reusable(self, which: str, src: torch.Tensor, gran: str) -> Optional[Fp8Tensor]:
        """The stale copy ``which`` if the quantiser of ``src`` can write into it: the same tensors
        for a captured graph, and no copy of a whole weight a step."""
        hit = self._entries.get(which)
        return reusable(hit[1] if hit else None, src, gran)

    def get(self, weight: torch.Tensor, which: str, policy: Fp8Policy) -> Fp8Tensor:
        gran = RECIPE_GRANULARITY[policy.recipe][1]
        w = weight.detach()
        src = w if which == "fwd" else w.t()
        return self.get_with(weight, which, lambda: quantize(
            src, gran, "e4m3", policy.power2_scales, amax=self._amax(weight, gran),
            out=self._reusable(which, src, gran)))

    def get_with(self, weight: torch.Tensor, which: str, make) -> Fp8Tensor:
        """The cached copy ``which`` of ``weight``, made by ``make()`` when stale."""
        key = self._key(weight)
        hit = self._entries.get(which)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            q = make()
        self.quantizations += 1
        return self._store(which, key, q)

    def get_pair(self, weight: torch.Tensor, policy: Fp8Policy) -> Fp8Tensor:
        """The forward copy, with the dgrad copy made from the same read of the weight (a
        training forward needs both; quantize_dual: tensorwise, or blockwise, where w.T's
        128x128 block is w's block transposed under the same amax). Bit for bit what two
        :meth:`get` calls give (tests/unit, tests/gpu)."""
        key = self._key(weight)
        fwd, dgrad = self._entries.get("fwd"), self._entries.get("dgrad")
        if fwd is not None and dgrad is not None and fwd[0] == key and dgrad[0] == key:
            return fwd[1]
        gran = RECIPE_GRANULARITY[policy.recipe][1]
        if gran not in ("tensor", "block"):
            self.get(weight, "dgrad", policy)
            return self.get(weight, "fwd", policy)
        w = weight.detach()
        out = (self._reusable("fwd", w, gran), self._reusable("dgrad", w.t(), gran))
        with torch.no_grad():
            q, qt = quantize_dual(w, gran, "e4m3", policy.power2_scales, amax=self._amax(weight, gran),
                                  out=out if None not in out else None)
        self.quantizations += 1
        self._store("dgrad", key, qt)
        return self._store("fwd", key, q)

    def clear(self) -> None:
        self._entries.clear()


def _pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(T, C) -> (ceil(T/multiple)*multiple, C) with zero rows (they add nothing to any GEMM)."""
    pad = -x.shape[0] % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


class Fp8LinearOps:
    """The three FP8 GEMMs of one linear layer under ``policy``."""

    def __init__(self, policy: Fp8Policy, tp_group=None):
        self.tp_group = tp_group
        self.op_id = next(_IDS)
        _REGISTRY[self.op_id] = weakref.ref(self, lambda _, i=self.op_id: _REGISTRY.pop(i, None))
        if policy.recipe == "blockwise" and policy.grad_format != "e4m3" and not policy.emulate:
            raise ValueError(f"FP8 blockwise with {policy.grad_format} gradients: {BLOCKWISE_E4M3_ONLY}")
        self.policy = policy
        self.cache = Fp8WeightCache()
        self.act, self.wgt, self.grad = RECIPE_GRANULARITY[policy.recipe]
        # Tokens are the GEMM's M in forward/dgrad (16 keeps cuBLAS's FP8 kernels happy) and its
        # contraction in wgrad (128 for blockwise tiles); the emulation takes any size.
        self.token_multiple = 1 if policy.emulate else 16
        self.wgrad_token_multiple = 1 if policy.emulate else alignment(self.act, self.wgt)
        # Tensorwise and blockwise quantise an operand the same way along features and along
        # tokens, so one read of x (and of dy) can write both FP8 copies (quantize_dual): the
        # forward keeps x.T in FP8 for wgrad instead of x in bf16, and backward quantises dy
        # once. Rowwise scales along tokens need whole columns: it keeps the separate passes.
        self.dual = self.act == self.grad and self.act in ("tensor", "tile")

    def _q(self, x: torch.Tensor, gran: str, fmt: str = "e4m3", amax=None) -> Fp8Tensor:
        return quantize(x, gran, fmt, self.policy.power2_scales, amax=amax)

    def forward(self, x2: torch.Tensor, weight: torch.Tensor, x_amax=None) -> torch.Tensor:
        """(T, in) x (out, in) -> (T, out) in x's dtype. ``x_amax``: max |x| made by the caller
        (tensorwise; the padding rows' zeros cannot raise it)."""
        t = x2.shape[0]
        a = self._q(_pad_rows(x2, self.token_multiple), self.act, amax=x_amax)
        b = self.cache.get(weight, "fwd", self.policy)
        # Fast accumulation in the forward only, as torchao does: the backward GEMMs sum over
        # more terms of wider range.
        return fp8_gemm(a, b, x2.dtype, emulate=self.policy.emulate, fast_accum=True)[:t]

    def forward_keep_xt(self, x2: torch.Tensor, weight: torch.Tensor,
                        x_amax=None) -> tuple[torch.Tensor, Fp8Tensor]:
        """:meth:`forward`, also returning x.T quantised for :meth:`backward_from_xt`'s wgrad:
        (T, in) -> (T, out), and (in, T') with T' the tokens padded to the wgrad multiple."""
        t = x2.shape[0]
        a, at = quantize_dual(_pad_rows(x2, self.wgrad_token_multiple), self.act, "e4m3",
                              self.policy.power2_scales, amax=x_amax)
        b = self.cache.get_pair(weight, self.policy)
        return fp8_gemm(a, b, x2.dtype, emulate=self.policy.emulate, fast_accum=True)[:t], at

    def backward_from_xt(self, dy2: torch.Tensor, weight: torch.Tensor, xt: Fp8Tensor,
                         need_wgrad: bool, out_dtype,
                         dy_amax=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """dgrad and wgrad from one quantisation of dy (T, out): dx (T, in), dw (out, in)."""
        t = dy2.shape[0]
        dyp = _pad_rows(dy2, self.wgrad_token_multiple)
        fmt, p2 = self.policy.grad_format, self.policy.power2_scales
        if need_wgrad:
            g, gt = quantize_dual(dyp, self.grad, fmt, p2, amax=dy_amax)
        else:
            g, gt = quantize(dyp, self.grad, fmt, p2, amax=dy_amax), None
        b = self.cache.get(weight, "dgrad", self.policy)
        dx = fp8_gemm(g, b, out_dtype, emulate=self.policy.emulate)[:t]
        dw = fp8_gemm(gt, xt, weight.dtype, emulate=self.policy.emulate) if need_wgrad else None
        return dx, dw

    def dgrad(self, dy2: torch.Tensor, weight: torch.Tensor, out_dtype) -> torch.Tensor:
        """(T, out) x (out, in) -> (T, in)."""
        t = dy2.shape[0]
        a = self._q(_pad_rows(dy2, self.token_multiple), self.grad, self.policy.grad_format)
        b = self.cache.get(weight, "dgrad", self.policy)
        return fp8_gemm(a, b, out_dtype, emulate=self.policy.emulate)[:t]

    def wgrad(self, dy2: torch.Tensor, x2: torch.Tensor, out_dtype) -> torch.Tensor:
        """dy (T, out), x (T, in) -> (out, in); both quantised along the tokens."""
        m = self.wgrad_token_multiple
        dy_t = _pad_rows(dy2, m).t()                         # (out, T') view, no copy
        x_t = _pad_rows(x2, m).t()                           # (in, T')
        a = self._q(dy_t, self.grad, self.policy.grad_format)
        # wgrad's x is quantised per token run like a gradient tile (1x128 along tokens) for
        # blockwise; a 128x128 block of x.T would be a second weight-style recipe for no gain.
        b = self._q(x_t, self.grad if self.grad == "tile" else self.act)
        return fp8_gemm(a, b, out_dtype, emulate=self.policy.emulate)


# The linear is a pair of custom ops (forward, backward) so that torch.compile keeps a layer
# whole around it: dynamo would otherwise trace into the weight cache (its keys change every
# step) and break the graph inside megatron's attention, which it cannot resume. The ops find
# their layer's Fp8LinearOps (policy, weight cache, TP group) through an integer id.
_REGISTRY: dict[int, "weakref.ref[Fp8LinearOps]"] = {}
_IDS = itertools.count()


def _registered(op_id: int) -> Fp8LinearOps:
    ops = _REGISTRY.get(op_id, lambda: None)()
    if ops is None:
        raise RuntimeError(f"FP8 linear {op_id}: its layer no longer exists")
    return ops


def _gather_along_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """megatron's sequence-parallel all-gather, allocated on x's device: inside a custom op the
    CPU mode's redirection of megatron's ``torch.cuda.current_device()`` does not apply."""
    n = 1 if group is None else group.size()
    if n == 1:
        return x
    out = x.new_empty(x.shape[0] * n, *x.shape[1:])
    torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_along_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    n = 1 if group is None else group.size()
    if n == 1:
        return x
    out = x.new_empty(x.shape[0] // n, *x.shape[1:])
    torch.distributed.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _tp_size(ops: Fp8LinearOps) -> int:
    return 1 if ops.tp_group is None else ops.tp_group.size()


def _layout(ops: Fp8LinearOps, sp: bool) -> str:
    """Everything that decides the op's output shapes and strides, as an argument of the op: a
    compiled graph (and inductor's on-disk cache of it) then differs wherever they differ."""
    return (f"{ops.act}:{ops.wgrad_token_multiple}:{'emulated' if ops.policy.emulate else 'cuda'}"
            f":{_tp_size(ops) if sp else 1}")


def _xt_empty(x: torch.Tensor, layout: str, tokens, n_in: int):
    """Empty tensors laid out as forward_keep_xt's x.T and its scales (for the fake op)."""
    gran, multiple, where, _ = layout.split(":")
    m = int(multiple)
    tp = -(-tokens // m) * m
    data = x.new_empty(n_in, tp, dtype=torch.float8_e4m3fn)
    if gran == "tensor":
        return data, x.new_empty(1, 1, dtype=torch.float32)
    nt = -(-tp // 128)
    if where == "emulated":                      # the reference's contiguous scales
        return data, x.new_empty(n_in, nt, dtype=torch.float32)
    return data, x.new_empty(nt, n_in, dtype=torch.float32).t()   # new_scale's (1, R) strides


@torch.library.custom_op("r1mega::fp8_linear", mutates_args=())
def _fp8_linear_op(x: torch.Tensor, weight: torch.Tensor, op_id: int, sp: bool,
                   allreduce_dgrad: bool, keep_xt: bool, layout: str,
                   x_amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """x (S, ..., in) -> y (S * tp if sp, ..., out), and x.T in FP8 for wgrad when keep_xt;
    ``x_amax``: max |x| from the caller's graph (tensorwise, without sequence parallelism)."""
    ops = _registered(op_id)
    if sp and x_amax is not None:
        raise ValueError("fp8_linear: a given amax covers this rank's tokens only, and sequence "
                         "parallelism gathers the others'")
    total = _gather_along_first_dim(x, ops.tp_group) if sp else x
    x2 = total.reshape(-1, total.shape[-1])
    if keep_xt:
        # x.T in FP8 (1 byte an element) is what wgrad reads; x itself is not kept.
        y, xt = ops.forward_keep_xt(x2, weight, x_amax)
        data, scale = xt.data, xt.scale
    else:
        y = ops.forward(x2, weight, x_amax)
        data = x.new_empty(0, dtype=torch.float8_e4m3fn)
        scale = x.new_empty(0, dtype=torch.float32)
    return y.view(*total.shape[:-1], weight.shape[0]), data, scale


@_fp8_linear_op.register_fake
def _(x, weight, op_id, sp, allreduce_dgrad, keep_xt, layout, x_amax=None):
    s0 = x.shape[0] * int(layout.split(":")[3])
    y = x.new_empty(s0, *x.shape[1:-1], weight.shape[0])
    if not keep_xt:
        return y, x.new_empty(0, dtype=torch.float8_e4m3fn), x.new_empty(0, dtype=torch.float32)
    tokens = s0
    for d in x.shape[1:-1]:
        tokens = tokens * d
    return (y, *_xt_empty(x, layout, tokens, x.shape[-1]))


@torch.library.custom_op("r1mega::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(dy: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
                            xt_scale: torch.Tensor, op_id: int, sp: bool, allreduce_dgrad: bool,
                            keep_xt: bool, need_wgrad: bool,
                            dy_amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dw like weight or empty); ``saved`` is x.T in FP8 (keep_xt) or x;
    ``dy_amax``: max |dy| from the backward graph (keep_xt only)."""
    ops = _registered(op_id)
    dy2 = dy.reshape(-1, dy.shape[-1])                                             # (T, out)
    if keep_xt:
        xt = Fp8Tensor(saved, xt_scale, ops.act, "e4m3")
        dx, dw = ops.backward_from_xt(dy2, weight, xt, need_wgrad, dy.dtype, dy_amax)
        dx = dx.view(*dy.shape[:-1], weight.shape[1])
    else:
        # megatron re-gathers the sequence-parallel input for wgrad rather than keeping it.
        total = _gather_along_first_dim(saved, ops.tp_group) if sp else saved
        dx = ops.dgrad(dy2, weight, saved.dtype).view(total.shape)
        dw = ops.wgrad(dy2, total.reshape(-1, total.shape[-1]), weight.dtype) if need_wgrad else None
    if sp:
        dx = _reduce_scatter_along_first_dim(dx, ops.tp_group)
    elif allreduce_dgrad:
        torch.distributed.all_reduce(dx, group=ops.tp_group)
    return dx, (dw if dw is not None else weight.new_empty(0))


@_fp8_linear_backward_op.register_fake
def _(dy, weight, saved, xt_scale, op_id, sp, allreduce_dgrad, keep_xt, need_wgrad, dy_amax=None):
    dx = dy.new_empty(*dy.shape[:-1], weight.shape[1]) if keep_xt else torch.empty_like(saved)
    return dx, (torch.empty_like(weight) if need_wgrad else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, op_id, sp, allreduce_dgrad, keep_xt, _, x_amax = inputs
    _, data, scale = output
    # the amax of dy made in the backward graph too, where x's was made in the forward's
    ctx.meta = (op_id, sp, allreduce_dgrad, keep_xt, weight.requires_grad,
                x_amax is not None and keep_xt)
    ctx.mark_non_differentiable(data, scale)
    ctx.save_for_backward(weight, data if keep_xt else x, scale)


def _backward(ctx, dy, _ddata, _dscale):
    weight, saved, scale = ctx.saved_tensors
    op_id, sp, allreduce_dgrad, keep_xt, need_wgrad, dy_amax_in_graph = ctx.meta
    dy_amax = _graph_amax(dy) if dy_amax_in_graph else None
    dx, dw = _fp8_linear_backward_op(dy, weight, saved, scale, op_id, sp, allreduce_dgrad,
                                     keep_xt, need_wgrad, dy_amax)
    return dx, (dw if need_wgrad else None), None, None, None, None, None, None


_fp8_linear_op.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               ops: Fp8LinearOps, *, sequence_parallel: bool = False,
               allreduce_dgrad: bool = False, tp_group=None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) with FP8 GEMMs; x (..., in), weight (out, in). megatron's
    linear_with_grad_accumulation_and_async_allreduce with FP8 GEMMs (no asynchronous overlap
    of the collectives; gradient accumulation fusion is refused)."""
    if (sequence_parallel or allreduce_dgrad) and tp_group is not ops.tp_group:
        raise ValueError("fp8_linear: tp_group differs from the one its Fp8LinearOps was built "
                         "with (Fp8LinearOps(policy, tp_group=...))")
    # The sequence-parallel path keeps megatron's re-gather of x in backward (x.T of the gathered
    # tokens would cost tp times the local shard's bytes).
    keep_xt = (ops.dual and not sequence_parallel and torch.is_grad_enabled()
               and weight.requires_grad)
    # Compiled, tensorwise: max |x| (and in backward max |dy|) as graph ops, which inductor can
    # fuse into the kernel that makes x (SwiGLU before fc2, its backward before fc1's dgrad)
    # instead of a separate read of x; the same value, so the same FP8 bytes.
    in_graph = (torch.compiler.is_compiling() and not sequence_parallel
                and ops.act == ops.grad == "tensor" and graph_side_enabled())
    y, _, _ = _fp8_linear_op(x, weight, ops.op_id, sequence_parallel, allreduce_dgrad, keep_xt,
                             _layout(ops, sequence_parallel), _graph_amax(x) if in_graph else None)
    return y + bias if bias is not None else y


# The same value written two ways, which inductor fuses differently into t's producer: each
# row's max first (a reduction over the producer's own last dimension: fused into the SwiGLU and
# its backward, RECORDS) or one reduction over every element (a split reduction: a second read).
AMAX_FORMS = {"rows": "each row's max |t|, then their max", "flat": "max |t| over all elements"}


def graph_amax_of(t: torch.Tensor, form: str) -> torch.Tensor:
    """max |t| as a float32 (1,) tensor in ``form`` (AMAX_FORMS); both exact (the max of t's own
    values) and NaN-propagating."""
    if form not in AMAX_FORMS:
        raise ValueError(f"graph_amax_of: unknown form {form!r}; expected one of {sorted(AMAX_FORMS)}")
    mag = t.detach().abs()
    m = mag.amax(dim=-1).amax() if form == "rows" else mag.amax()
    return m.float().reshape(1)


def _graph_amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| in the form R1MEGA_FP8_GRAPH_AMAX names (read while tracing)."""
    return graph_amax_of(t, switches.choice("R1MEGA_FP8_GRAPH_AMAX", "rows", AMAX_FORMS))


def weight_amax_from_optimizers(model_chunks: list, optimizers: list) -> int:
    """Point each tensorwise FP8 layer's weight cache at the optimizer that steps its weight
    (r1mega's LeanAdamW with a lean master: it writes the bf16 weight itself and can take max |w|
    on the way, ``track_amax``), so re-quantising after a step reads the weight once instead of
    twice. Returns how many layers were wired; the others keep their own amax pass.
    Off until timed on a GPU: R1MEGA_FP8_WEIGHT_AMAX=1 turns it on."""
    if not switches.flag("R1MEGA_FP8_WEIGHT_AMAX", False,
                         "tensorwise FP8 weights take max |w| from the lean optimizer's step"):
        return 0
    owner = {id(p): opt for opt in optimizers for g in opt.param_groups for p in g["params"]
             if opt.mode_of(p) != "fp32"}
    wired = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            ops = getattr(module, "fp8_ops", None)
            opt = owner.get(id(getattr(module, "weight", None)))
            if not isinstance(ops, Fp8LinearOps) or ops.wgt != "tensor" or opt is None:
                continue
            opt.track_amax(module.weight)
            ops.cache.amax_source = opt.weight_amax
            wired += 1
    return wired


def weight_alignment(policy: Fp8Policy) -> int:
    """Multiple of which a layer's weight sizes must be for ``policy``'s GEMMs."""
    return 1 if policy.emulate else 128 if policy.recipe == "blockwise" else 16


class _Fp8ForwardImpl:
    """Replaces megatron's ``_forward_impl`` (the GEMM and its TP collectives) with FP8."""

    def _init_fp8(self, fp8_policy: Fp8Policy) -> None:
        out_size, in_size = self.weight.shape
        align = weight_alignment(fp8_policy)
        if out_size % align or in_size % align:
            raise ValueError(
                f"{type(self).__name__}: the FP8 {fp8_policy.recipe} GEMM needs this rank's weight "
                f"sizes to be multiples of {align}, got (out={out_size}, in={in_size}). Keep the "
                f"layer in bf16 (precision.fp8_bf16_first_layers/last_layers), change the model "
                f"or parallel.tensor, or use precision.fp8_recipe=tensorwise.")
        self.fp8_ops = Fp8LinearOps(fp8_policy, tp_group=self.tp_group)

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False,
                      allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None,
                      wgrad_deferral_limit=None, tp_group=None, **unused):
        if gradient_accumulation_fusion or grad_output_buffer is not None:
            raise NotImplementedError(
                "r1mega's FP8 linear does not implement gradient_accumulation_fusion or deferred "
                "embedding wgrad (both off in r1mega's TransformerConfig).")
        return fp8_linear(input, weight, bias, self.fp8_ops, sequence_parallel=sequence_parallel,
                          allreduce_dgrad=allreduce_dgrad, tp_group=tp_group)


class Fp8ColumnParallelLinear(_Fp8ForwardImpl, ColumnParallelLinear):
    def __init__(self, *args, fp8_policy: Fp8Policy, **kwargs):
        ColumnParallelLinear.__init__(self, *args, **kwargs)
        self._init_fp8(fp8_policy)


class Fp8RowParallelLinear(_Fp8ForwardImpl, RowParallelLinear):
    def __init__(self, *args, fp8_policy: Fp8Policy, **kwargs):
        RowParallelLinear.__init__(self, *args, **kwargs)
        self._init_fp8(fp8_policy)
