"""FP8 weight copies for the rollout's decode; training keeps its bf16 weights and numerics.

A decode step reads every weight once for at most a few hundred tokens: FP8 copies halve the
bytes it reads and double the tensor cores' rate once the batch makes it compute-bound. :class:`Fp8RolloutWeights` keeps one persistent FP8 copy (data + scales,
the policy's weight recipe) of each linear weight of the transformer blocks and, while
:meth:`decoding` is active, routes those layers' GEMMs through them: the activation is quantised
per call (the recipe's activation granularity), the GEMM is ``fp8_gemm``. Outside ``decoding``
-- the training step, the old/reference log-prob passes -- the layers run as before.

The copies are refreshed in place, once per weight generation (``new_weight_generation`` runs
after every optimizer step and before every pass), at the start of ``decoding``: the same
tensors every time, so CUDA graphs captured over them stay valid after an update.

The hook is an instance attribute ``_forward_impl`` on each megatron linear (the call its
forward makes for the GEMM and its TP collectives, see r1mega/precision/linear.py); layers that
already run FP8 for training are left alone (they quantise their own weights).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from r1mega import switches
from r1mega.precision import linear as fp8_linear_mod
from r1mega.precision import triton_act_gemm, triton_fp8_rows
from r1mega.ops.exact_mlp import plain_swiglu
from r1mega.precision.gemm import alignment, fp8_gemm, row_tensor_gemm_unscaled, unit_scale_ready
from r1mega.precision.linear import RECIPE_GRANULARITY, _Fp8ForwardImpl, _pad_rows
from r1mega.precision.policy import Fp8Policy
from r1mega.precision.quantize import BLOCK, Fp8Tensor, quantize, reusable


# where Transformer Engine's layer classes live (its own package and megatron's wrappers of it)
_TE_MODULES = ("transformer_engine", "megatron.core.extensions.transformer_engine")

# Above this many rows (a prefill chunk, run eagerly) the row route takes the one-pass row kernel
# and cuBLAS's rowwise GEMM (r1mega/precision/gemm.py); without them (no GPU, emulation) such
# calls take the recipe's scaling: the float32 pass over the output that the decode graph fuses
# away cost an eager prefill more than the tensor scale's one amax.
ROW_ACT_MAX_ROWS = 2048


def act_choice() -> str:
    return switches.choice("R1MEGA_FP8_ROLLOUT_ACT", "auto", {
        "auto": "row for tensorwise weights, the recipe's scaling otherwise",
        "recipe": "the recipe's activation scaling",
        "row": "tensorwise weights: per-row power-of-two activation scales, cuBLAS's tensorwise "
               "kernel and the row scales on its output"})


def decode_gemm(x2: torch.Tensor, q: Fp8Tensor, act: str, power2: bool, emulate: bool,
                fused: bool = False, rows_kernel: bool = False) -> torch.Tensor:
    """(T, in) x an FP8 weight copy (out, in) -> (T, out) in x's dtype: one rollout GEMM.
    ``fused``: decode-sized calls through r1mega/precision/triton_act_gemm.py (blockwise or
    tensorwise weights, x in 1x128 tiles). ``rows_kernel``: row scales from the one-pass kernel
    of r1mega/precision/triton_fp8_rows.py (for an x no compiled kernel of ours makes)."""
    t = x2.shape[0]
    if fused and t <= triton_act_gemm.MAX_ROWS:
        return torch.ops.r1mega.fp8_act_gemm(x2.contiguous(), q.data, q.scale, x2.dtype)
    # Row scales from the one-pass kernel where no compiled kernel of ours makes x (rows_kernel)
    # or nothing is compiled (prefill); in the decode graph inductor fuses the quantiser below.
    if (act == "row" and not emulate and triton_fp8_rows.supported(x2, False)
            and (rows_kernel or not torch.compiler.is_compiling())):
        a = triton_fp8_rows.fp8_rows(x2, power2)
        return fp8_gemm(a, q, x2.dtype, emulate=False, fast_accum=True)[:t]
    # Compiled (the decode forward): the quantiser in torch ops, which inductor fuses into the
    # kernel that makes x (the norm before qkv and fc1, SwiGLU before fc2), so a decode step does
    # not launch one or more quantiser kernels per linear. Eager: the fused Triton kernel (the
    # same quantisation but for inductor's division, which may round a scale an ulp differently).
    impl = ("reference" if torch.compiler.is_compiling() and fp8_linear_mod.graph_side_enabled()
            else "auto")
    # the decode batch is the GEMM's M: 16 rows at least for cuBLAS's FP8 kernels
    a = quantize(_pad_rows(x2, 1 if emulate else 16), act, "e4m3", power2, impl=impl)
    return fp8_gemm(a, q, x2.dtype, emulate=emulate, fast_accum=True)[:t]


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def qkv_unscaled(linear_qkv, hidden_states):
    """(linear_qkv's output (T, out) before its rows' scales, the scales (T,) float32) where the
    FP8 rollout's row route serves this call, else None (the caller runs the linear)."""
    fn = getattr(linear_qkv, "_fp8_row_qkv", None)
    return None if fn is None else fn(hidden_states)


def proj_from_rows(linear_proj, make_rows, t: int, out_dtype: torch.dtype):
    """linear_proj's output (out (T, 1, H), bias) from its input's e4m3 rows and their scales,
    ``make_rows(power2) -> (data (T', C), scales (T', 1) or (T', C / 128))``, where the FP8 rollout's row route
    serves this call (else None, and ``make_rows`` is not called)."""
    fn = getattr(linear_proj, "_fp8_row_proj", None)
    return None if fn is None else fn(make_rows, t, out_dtype)


def _norm_fed_rows(x2: torch.Tensor) -> Fp8Tensor:
    """Power-of-two row scales of a norm's output (T, K): compiled, in torch ops that inductor
    fuses into the norm's kernel (as decode_gemm does); eagerly, the one-pass row kernel."""
    if torch.compiler.is_compiling():
        return quantize(_pad_rows(x2, 16), "row", "e4m3", True, impl="reference")
    return triton_fp8_rows.fp8_rows(x2, True)


class Fp8RolloutWeights:
    """Persistent FP8 copies of one model chunk's block linears, used only while decoding."""

    def __init__(self, model, policy: Fp8Policy):
        m = _unwrap(model)
        self.policy = policy
        self.act, self.wgt, _ = RECIPE_GRANULARITY[policy.recipe]
        self.act_power2 = policy.power2_scales
        self.big_act = self.act  # above ROW_ACT_MAX_ROWS rows (prefill): the recipe's scaling
        # Decode-sized GEMMs with x quantised inside (r1mega/precision/triton_act_gemm.py)
        self.fused_gemm = not policy.emulate and triton_act_gemm.gemm_choice() == "fused"
        choice = act_choice()
        if self.wgt == "tensor" and (choice == "row" or choice == "auto" and not self.fused_gemm):
            # no pass over the whole activation for its amax: a row's scale comes from the
            # kernel that makes the row (inductor fuses the reduction into the norm or SwiGLU)
            self.act, self.act_power2 = "row", True
        self.active = False
        self.refreshes = 0
        if self.fused_gemm and (policy.recipe not in ("blockwise", "tensorwise")
                                or not triton_act_gemm.HAVE_TRITON):
            raise ValueError(f"R1MEGA_FP8_ROLLOUT_GEMM=fused serves the blockwise and tensorwise "
                             f"recipes on a GPU with Triton; precision.fp8_recipe is {policy.recipe!r}"
                             + ("" if triton_act_gemm.HAVE_TRITON else " and Triton is missing"))
        self._generation = None
        self.linears = [mod for mod in m.decoder.modules()
                        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear))
                        and not isinstance(mod, _Fp8ForwardImpl)]
        te = sorted({type(mod).__name__ for mod in m.decoder.modules()
                     if type(mod).__module__.startswith(_TE_MODULES)})
        if te:
            raise ValueError(f"precision.fp8_rollout: this model's layers hold Transformer Engine "
                             f"modules ({', '.join(te)}), whose GEMMs the FP8 weight copies do not "
                             f"reach (the decode would stay bf16). Build it with model.spec=local, "
                             f"or set precision.fp8_rollout=false.")
        if not self.linears and not any(isinstance(mod, _Fp8ForwardImpl)
                                        for mod in m.decoder.modules()):
            raise ValueError("precision.fp8_rollout: the model's decoder has no megatron parallel "
                             "linear to route through FP8 copies; the decode would stay bf16.")
        # attention's output projection: its input comes from the paged attention op, which
        # inductor cannot fuse a quantiser into
        opaque_inputs = {id(mod) for name, mod in m.decoder.named_modules()
                         if name.endswith("self_attention.linear_proj")}
        cublas_align = 1 if policy.emulate else alignment(self.act, self.wgt)
        # the fused kernel works in whole 128-wide K blocks and N blocks
        align = max(cublas_align, BLOCK) if self.fused_gemm else cublas_align
        for mod in self.linears:
            out_size, in_size = mod.weight.shape
            if out_size % align or in_size % align:
                fix = ("Unset R1MEGA_FP8_ROLLOUT_GEMM (the quantiser + cuBLAS route)"
                       if out_size % cublas_align == 0 and in_size % cublas_align == 0
                       else "Use precision.fp8_recipe=tensorwise")
                raise ValueError(
                    f"precision.fp8_rollout: a {type(mod).__name__} weight of this rank is "
                    f"({out_size}, {in_size}); the {policy.recipe} FP8 GEMM needs multiples of "
                    f"{align}. {fix}, or precision.fp8_rollout=false.")
            mod._fp8_rollout_weight = None
            mod._forward_impl = self._make_impl(mod, rows_kernel=id(mod) in opaque_inputs)
        # Row-scaled activations on tensorwise weights (not the rowwise recipe, whose weights
        # are row-scaled too): a GEMM's output then lacks only x's row scales, which the kernel
        # reading it next applies
        row_chain = self.act == "row" and self.wgt == "tensor" and not policy.emulate
        hooked = {id(mod) for mod in self.linears} if row_chain else set()
        # Dense SwiGLU MLPs whose two linears both have copies: under row scales, decode runs
        # them as one chain (see _make_mlp_forward)
        self.mlps = [mlp for mlp in m.decoder.modules()
                     if plain_swiglu(mlp) and id(mlp.linear_fc1) in hooked
                     and id(mlp.linear_fc2) in hooked and not mlp.config.add_bias_linear]
        for mlp in self.mlps:
            mlp.forward = self._make_mlp_forward(mlp)
        # the output projection: under row scales its input's rows may come quantised from the
        # decode attention kernel's epilogue (see _make_proj_rows)
        for mod in self.linears:
            if id(mod) in hooked and id(mod) in opaque_inputs:
                mod._fp8_row_proj = self._make_proj_rows(mod)
        # attention's qkv projection: under row scales the rollout's fused RoPE kernel applies
        # them (qkv_unscaled), one pointwise pass over qkv a layer fewer
        self.qkv_linears = [mod for name, mod in m.decoder.named_modules()
                            if name.endswith("self_attention.linear_qkv") and id(mod) in hooked]
        for mod in self.qkv_linears:
            mod._fp8_row_qkv = self._make_qkv_rows(mod)

    def _quantize_weight(self, weight: torch.Tensor, out: Optional[Fp8Tensor] = None) -> Fp8Tensor:
        return quantize(weight.detach(), self.wgt, "e4m3", self.policy.power2_scales, out=out)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-quantise every weight into its persistent copy (in place after the first time: the
        captured decode graphs read those tensors)."""
        for mod in self.linears:
            old = reusable(mod._fp8_rollout_weight, mod.weight, self.wgt)
            mod._fp8_rollout_weight = self._quantize_weight(mod.weight, out=old)
        if self.linears:
            unit_scale_ready(self.linears[0].weight.device)
        self._generation = fp8_linear_mod._current[0]
        self.refreshes += 1

    @contextlib.contextmanager
    def decoding(self):
        """Route the block linears through the FP8 copies (refreshed if the weights moved on)."""
        if self._generation != fp8_linear_mod._current[0]:
            self.refresh()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def _make_impl(self, mod, rows_kernel: bool = False):
        bf16_impl = type(mod)._forward_impl.__get__(mod)

        def forward_impl(input, weight, bias=None, gradient_accumulation_fusion=False,
                         allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None,
                         wgrad_deferral_limit=None, tp_group=None, **unused):
            q = mod._fp8_rollout_weight
            if (not self.active or torch.is_grad_enabled() or sequence_parallel or q is None
                    or weight is not mod.weight):
                return bf16_impl(input, weight, bias=bias,
                                 gradient_accumulation_fusion=gradient_accumulation_fusion,
                                 allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                                 grad_output_buffer=grad_output_buffer,
                                 wgrad_deferral_limit=wgrad_deferral_limit, tp_group=tp_group)
            x2 = input.reshape(-1, input.shape[-1])
            act, power2 = self.act, self.act_power2
            if (act == "row" and x2.shape[0] > ROW_ACT_MAX_ROWS
                    and (self.policy.emulate or not triton_fp8_rows.supported(x2, False))):
                act, power2 = self.big_act, self.policy.power2_scales
            y = decode_gemm(x2, q, act, power2, self.policy.emulate, self.fused_gemm, rows_kernel)
            y = y.view(*input.shape[:-1], weight.shape[0])                         # (..., out)
            return y + bias if bias is not None else y

        return forward_impl

    def _make_mlp_forward(self, mlp):
        """fc1 -> SwiGLU -> fc2 of a decode step under row scales: fc1's GEMM output goes to
        the one-pass SwiGLU quantiser (r1mega/precision/triton_fp8_rows.py) with fc1's row scales
        still to apply, which the kernel does on its read (exact: powers of two). The unfused
        chain ran a reduction kernel of inductor's that computed SwiGLU twice (decode), or the
        SwiGLU kernel, an amax and a quantiser (prefill). Anything else (the training forward,
        no GPU kernel) runs megatron's forward."""
        module_forward = type(mlp).forward.__get__(mlp)
        fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2

        def forward(hidden_states, per_token_scale=None, **kwargs):
            w1, w2 = fc1._fp8_rollout_weight, fc2._fp8_rollout_weight
            x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
            if (per_token_scale is not None or kwargs or not self.active or torch.is_grad_enabled()
                    or w1 is None or w2 is None or fc1.sequence_parallel
                    or not triton_fp8_rows.supported(x2, False)):
                return module_forward(hidden_states, per_token_scale, **kwargs)
            t = x2.shape[0]
            a1 = _norm_fed_rows(x2)
            y1 = row_tensor_gemm_unscaled(a1, w1, x2.dtype, fast_accum=True)   # (T', 2F)
            a2 = triton_fp8_rows.fp8_rows(y1, True, swiglu=True, in_scale=a1.scale)
            y = fp8_gemm(a2, w2, x2.dtype, emulate=False, fast_accum=True)[:t]  # (T, H)
            if fc2.tp_group is not None and fc2.tp_group.size() > 1:
                y = reduce_from_tensor_model_parallel_region(y, group=fc2.tp_group)
            return y.view(*hidden_states.shape[:-1], y.shape[-1]), None

        return forward

    def _make_qkv_rows(self, mod):
        def qkv_rows(hidden_states):
            q = mod._fp8_rollout_weight
            x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
            if (not self.active or torch.is_grad_enabled() or q is None or mod.bias is not None
                    or mod.sequence_parallel or mod.gather_output or x2.shape[0] > ROW_ACT_MAX_ROWS
                    or not triton_fp8_rows.supported(x2, False)):
                return None
            t = x2.shape[0]
            a = _norm_fed_rows(x2)
            y = row_tensor_gemm_unscaled(a, q, x2.dtype, fast_accum=True)[:t]    # (T, out)
            return y, a.scale.reshape(-1)[:t]

        return qkv_rows

    def _make_proj_rows(self, mod):
        def proj_rows(make_rows, t: int, out_dtype: torch.dtype):
            q = mod._fp8_rollout_weight
            if (not self.active or torch.is_grad_enabled() or q is None or mod.sequence_parallel
                    or mod.explicit_expert_comm or not mod.input_is_parallel or t > ROW_ACT_MAX_ROWS):
                return None
            data, scale = make_rows(self.act_power2)
            # (T', 1): one scale a row; (T', heads): one a head's 1 x 128 tile
            gran = "row" if scale.shape[1] == 1 else "tile"
            y = fp8_gemm(Fp8Tensor(data, scale, gran, "e4m3"), q, out_dtype, emulate=False,
                         fast_accum=True)[:t]                                      # (T, out)
            if mod.tp_group is not None and mod.tp_group.size() > 1:
                y = reduce_from_tensor_model_parallel_region(y, group=mod.tp_group)
            y = y.view(t, 1, -1)
            if mod.skip_bias_add:
                return y, mod.bias
            return (y + mod.bias if mod.bias is not None else y), None

        return proj_rows

    def remove(self) -> None:
        """Uninstall the hooks and drop the copies (the layers are plain megatron again)."""
        for mod in self.linears:
            mod.__dict__.pop("_fp8_row_proj", None)
        for mod in self.qkv_linears:
            mod.__dict__.pop("_fp8_row_qkv", None)
        for mlp in self.mlps:
            mlp.__dict__.pop("forward", None)
        for mod in self.linears:
            mod.__dict__.pop("_forward_impl", None)
            mod._fp8_rollout_weight = None
