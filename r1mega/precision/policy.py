"""The FP8 precision policy: which recipe, which backend, which layers, which gradient format.

bf16 master weights stay untouched everywhere (megatron's optimizer keeps fp32 masters); FP8 is
compute only: the linear layers of the transformer blocks run their GEMMs on FP8 copies of their
operands. Two backends:

  native  r1mega's own FP8 linear (r1mega/precision/linear.py) in megatron's column/row-parallel
          layers, through ``torch.nn.functional.scaled_mm`` / ``torch._scaled_mm``. Recipes:
            tensorwise  one current scale per tensor;
            rowwise     one scale per row of each GEMM operand (along the contraction);
            blockwise   DeepSeek-V3: 1x128 tiles for activations and gradients, 128x128 blocks
                        for weights, power-of-2 scales.
  te      megatron's Transformer Engine spec; megatron's TransformerBlock enters TE's
          ``fp8_autocast`` with the recipe built from ``TransformerConfig.fp8_recipe``
          (delayed, current = TE's Float8CurrentScaling, blockwise, mxfp8).

Every check that can fail raises :class:`ConfigError` naming the ``precision.*`` key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from r1mega.config import ConfigError, PrecisionConfig

NATIVE_RECIPES = ("tensorwise", "rowwise", "blockwise")
TE_RECIPES = ("delayed", "current", "blockwise", "mxfp8")
GRAD_FORMATS = ("e4m3", "e5m2")
BLOCKWISE_E4M3_ONLY = ("torch's blockwise scaled_mm (cuBLAS's DeepSeek-V3 kernels) multiplies e4m3 "
                       "operands only; set precision.fp8_grad_format=e4m3 (DeepSeek-V3's choice) or "
                       "use precision.fp8_recipe=tensorwise or rowwise for e5m2 gradients.")
GROUPED_E4M3_ONLY = ("torch's scaled grouped GEMM (the FP8 experts) multiplies e4m3 operands "
                     "only; set precision.fp8_grad_format=e4m3 or precision.fp8_experts=false.")
# r1mega's TE recipe names -> megatron's Fp8Recipe values (megatron calls "current" tensorwise).
TE_RECIPE_TO_MEGATRON = {"delayed": "delayed", "current": "tensorwise", "blockwise": "blockwise",
                         "mxfp8": "mxfp8"}


def transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Fp8Policy:
    """The resolved FP8 policy the model and the rollout read (None of it changes during a run)."""

    recipe: str                 # one of NATIVE_RECIPES or TE_RECIPES, per backend
    backend: str                # "native" | "te"
    grad_format: str = "e4m3"   # gradients' FP8 format in dgrad / wgrad
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0
    emulate: bool = False       # native only: quantise -> dequantise -> fp32 matmul
    rollout: bool = False       # FP8 weight copies for the rollout's decode
    experts: bool = False       # native only: MoE experts in FP8 (r1mega/precision/grouped.py)

    @property
    def power2_scales(self) -> bool:
        # DeepSeek-V3 and TE's Float8BlockScaling round block scales down to a power of 2: the
        # scaling then only shifts exponents, so dequantisation adds no rounding error.
        return self.recipe == "blockwise"

    def layer_is_fp8(self, layer: int, num_layers: int) -> bool:
        """Whether global layer ``layer`` (0-based) of ``num_layers`` runs its linears in FP8."""
        return self.bf16_first_layers <= layer < num_layers - self.bf16_last_layers


def _native_support_error(recipe: str, device_type: str) -> Optional[str]:
    """Why this machine cannot run native FP8 ``recipe`` (None when it can)."""
    if device_type != "cuda":
        return ("native FP8 needs a CUDA GPU of compute capability 8.9+ (Ada/Hopper); this run is "
                "on the CPU. Set precision.fp8_emulate=true to emulate FP8 numerics (tests), or "
                "precision.fp8=false.")
    if not hasattr(torch, "_scaled_mm"):
        return (f"torch {torch.__version__} has no torch._scaled_mm; native FP8 needs torch >= 2.4 "
                f"(blockwise: >= 2.10). Upgrade torch or set precision.fp8=false.")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return (f"this GPU has compute capability {major}.{minor}; FP8 tensor cores need 8.9+ "
                f"(Ada/Hopper). Set precision.fp8=false (or precision.fp8_emulate=true to test).")
    if recipe == "blockwise":
        f = torch.nn.functional
        if not (hasattr(f, "scaled_mm") and hasattr(f, "ScalingType")
                and hasattr(f.ScalingType, "BlockWise1x128")):
            return (f"precision.fp8_recipe=blockwise needs torch.nn.functional.scaled_mm with "
                    f"ScalingType.BlockWise1x128 (torch >= 2.10); torch {torch.__version__} has "
                    f"none. Use precision.fp8_recipe=tensorwise or rowwise, or upgrade torch.")
        if major != 9:
            return (f"precision.fp8_recipe=blockwise runs on cuBLAS's Hopper (sm_90) kernels; this "
                    f"GPU is sm_{major}{minor}. Use precision.fp8_recipe=tensorwise or rowwise.")
    return None


def _grouped_support_error() -> Optional[str]:
    """Why this machine cannot run the FP8 experts (None when it can); CUDA is checked before."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return (f"torch {torch.__version__} has no torch._scaled_grouped_mm (torch >= 2.9); "
                f"upgrade torch or set precision.fp8_experts=false.")
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return (f"torch's scaled grouped GEMM runs on sm_90 (Hopper); this GPU is sm_{major}{minor}. "
                f"Set precision.fp8_experts=false.")
    return None


def resolve_fp8_policy(precision: PrecisionConfig, device_type: str,
                       te_available: Optional[bool] = None) -> Optional[Fp8Policy]:
    """The policy for ``precision`` on ``device_type`` ("cuda"/"cpu"); None when FP8 is off.

    Raises ConfigError (naming the key) for recipes/backends this machine or torch cannot run.
    """
    p = precision
    if p.fp8_grad_format not in GRAD_FORMATS:
        raise ConfigError(f"precision.fp8_grad_format: '{p.fp8_grad_format}' is not one of "
                          f"{list(GRAD_FORMATS)}.")
    if p.fp8_backend not in ("auto", "native", "te"):
        raise ConfigError(f"precision.fp8_backend: '{p.fp8_backend}' is not one of "
                          f"['auto', 'native', 'te'].")
    for key in ("fp8_bf16_first_layers", "fp8_bf16_last_layers"):
        if getattr(p, key) < 0:
            raise ConfigError(f"precision.{key} must be >= 0, got {getattr(p, key)}.")
    if p.fp8_experts and not p.fp8:
        raise ConfigError("precision.fp8_experts=true needs precision.fp8=true.")
    if not p.fp8:
        return None
    te = transformer_engine_importable() if te_available is None else te_available
    backend = p.fp8_backend
    if backend == "auto":
        backend = "te" if te and not p.fp8_emulate else "native"
    if backend == "te":
        if not te:
            raise ConfigError(
                "precision.fp8_backend=te needs Transformer Engine, which is not importable here. "
                "Install transformer-engine[pytorch] or set precision.fp8_backend=native "
                "(r1mega's own FP8 linear through torch's scaled_mm).")
        if p.fp8_recipe not in TE_RECIPES:
            raise ConfigError(f"precision.fp8_recipe: '{p.fp8_recipe}' is not a Transformer Engine "
                              f"recipe; with precision.fp8_backend=te use one of {list(TE_RECIPES)}.")
        if p.fp8_emulate:
            raise ConfigError("precision.fp8_emulate=true is the native path's CPU emulation; "
                              "set precision.fp8_backend=native or precision.fp8_emulate=false.")
        if p.fp8_recipe == "delayed" and (p.fp8_bf16_first_layers or p.fp8_bf16_last_layers):
            raise ConfigError("precision.fp8_bf16_first_layers/last_layers cannot be used with "
                              "precision.fp8_recipe=delayed (megatron's TE path refuses it); use "
                              "fp8_recipe=current or blockwise, or set both to 0.")
        if p.fp8_rollout:
            raise ConfigError("precision.fp8_rollout=true is implemented for the native backend "
                              "only; set precision.fp8_backend=native or precision.fp8_rollout=false.")
        if p.fp8_experts:
            raise ConfigError("precision.fp8_experts=true is implemented for the native backend "
                              "only; set precision.fp8_backend=native or precision.fp8_experts=false.")
    else:
        if p.fp8_recipe not in NATIVE_RECIPES:
            raise ConfigError(f"precision.fp8_recipe: '{p.fp8_recipe}' is not a native FP8 recipe; "
                              f"with precision.fp8_backend=native use one of "
                              f"{list(NATIVE_RECIPES)} (TE's recipes need Transformer Engine).")
        if not p.fp8_emulate:
            why = _native_support_error(p.fp8_recipe, device_type)
            if why:
                raise ConfigError(f"precision.fp8=true: {why}")
            if p.fp8_recipe == "blockwise" and p.fp8_grad_format != "e4m3":
                raise ConfigError(f"precision.fp8_recipe=blockwise with precision.fp8_grad_format="
                                  f"{p.fp8_grad_format}: {BLOCKWISE_E4M3_ONLY}")
            if p.fp8_experts:
                why = _grouped_support_error()
                if why:
                    raise ConfigError(f"precision.fp8_experts=true: {why}")
        if p.fp8_experts and p.fp8_grad_format != "e4m3":
            raise ConfigError(f"precision.fp8_experts=true with precision.fp8_grad_format="
                              f"{p.fp8_grad_format}: {GROUPED_E4M3_ONLY}")
    return Fp8Policy(recipe=p.fp8_recipe, backend=backend, grad_format=p.fp8_grad_format,
                     bf16_first_layers=p.fp8_bf16_first_layers,
                     bf16_last_layers=p.fp8_bf16_last_layers, emulate=p.fp8_emulate,
                     rollout=p.fp8_rollout, experts=p.fp8_experts)


def resolve_rollout_fp8_policy(precision: PrecisionConfig, device_type: str) -> Optional[Fp8Policy]:
    """The rollout's FP8 weight policy (``precision.fp8_rollout``; None when off).

    Independent of FP8 training: with ``precision.fp8=false`` the training stays bf16 and only
    the decode reads FP8 weight copies (r1mega/precision/rollout.py), in ``precision.fp8_recipe``
    through the native path.
    """
    p = precision
    if not p.fp8_rollout:
        return None
    if p.fp8 and p.fp8_backend == "te":
        raise ConfigError("precision.fp8_rollout=true is implemented for the native backend "
                          "only; set precision.fp8_backend=native or precision.fp8_rollout=false.")
    if p.fp8_recipe not in NATIVE_RECIPES:
        raise ConfigError(f"precision.fp8_rollout=true: precision.fp8_recipe '{p.fp8_recipe}' is "
                          f"not a native FP8 recipe; use one of {list(NATIVE_RECIPES)}.")
    if not p.fp8_emulate:
        why = _native_support_error(p.fp8_recipe, device_type)
        if why:
            raise ConfigError(f"precision.fp8_rollout=true: {why}")
    return Fp8Policy(recipe=p.fp8_recipe, backend="native", emulate=p.fp8_emulate, rollout=True)


def default_device_type() -> str:
    """Where a run of this process will compute (what config validation checks FP8 against)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def te_fp8_token_multiple(config) -> int:
    """Tokens per rank a micro-batch must be a multiple of under TE's FP8 (megatron's
    TransformerConfig ``config``): TE's FP8 GEMMs take 2-D inputs whose rows are a multiple of
    8 (16 here, the width cuBLAS's FP8 kernels like), of 128 for its blockwise recipe (its
    quantisers' tile) and of 32 for MXFP8; 1 without TE's FP8."""
    if not getattr(config, "fp8", None):
        return 1
    recipe = getattr(config, "fp8_recipe", None)
    recipe = getattr(recipe, "value", recipe)  # megatron's Fp8Recipe (a str enum) or a str
    return {"blockwise": 128, "mxfp8": 32}.get(recipe, 16)


def te_transformer_config_kwargs(policy: Optional[Fp8Policy], num_layers: int) -> dict:
    """megatron TransformerConfig FP8 fields for the TE backend ({} otherwise).

    megatron's TransformerBlock wraps its forward (or each layer) in TE's ``fp8_autocast`` with
    the recipe these fields describe; without them TE layers run in bf16 and nothing says so.
    """
    if policy is None or policy.backend != "te":
        return {}
    kwargs = dict(
        # "hybrid" is TE's name for e4m3 forward / e5m2 backward.
        fp8="hybrid" if policy.grad_format == "e5m2" else "e4m3",
        fp8_recipe=TE_RECIPE_TO_MEGATRON[policy.recipe],
    )
    first, last = policy.bf16_first_layers, policy.bf16_last_layers
    if first or last:
        if first + last >= num_layers:
            raise ConfigError(
                f"precision.fp8_bf16_first_layers + precision.fp8_bf16_last_layers = "
                f"{first + last} leaves no FP8 layer of model.num_layers={num_layers}.")
        kwargs.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=first,
                      num_layers_at_end_in_bf16=last)
    return kwargs
