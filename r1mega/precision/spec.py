"""Applying the FP8 policy to layer specs: swap megatron's parallel linears for the FP8 ones.

A spec rewrite rather than new spec builders: whatever layer spec a family builds (dense, MoE,
with or without q/k norms), its ColumnParallelLinear / RowParallelLinear entries become
:class:`Fp8ColumnParallelLinear` / :class:`Fp8RowParallelLinear` with the policy as a param.
Layers the policy keeps in bf16 (first/last N) keep their spec untouched. r1mega's MoE layer gets
the policy as a param when ``precision.fp8_experts`` is on (its routed and shared experts are not
megatron linears); the output layer outside the blocks stays bf16.
"""
from __future__ import annotations

import dataclasses

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from r1mega.precision.linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from r1mega.precision.policy import Fp8Policy

_SWAP = {ColumnParallelLinear: Fp8ColumnParallelLinear, RowParallelLinear: Fp8RowParallelLinear}


def with_fp8_linears(spec, policy: Fp8Policy):
    """A copy of ``spec`` (ModuleSpec, submodules dataclass or class) with FP8 linears."""
    if isinstance(spec, type) and spec in _SWAP:
        return ModuleSpec(module=_SWAP[spec], params={"fp8_policy": policy})
    if isinstance(spec, ModuleSpec):
        if spec.module in _SWAP:
            return dataclasses.replace(spec, module=_SWAP[spec.module],
                                       params={**spec.params, "fp8_policy": policy})
        if policy.experts and _is_moe_layer(spec.module):
            return dataclasses.replace(spec, params={**spec.params, "fp8_policy": policy})
        if spec.submodules is None:
            return spec
        return dataclasses.replace(spec, submodules=with_fp8_linears(spec.submodules, policy))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: with_fp8_linears(getattr(spec, f.name), policy)
                   for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec


def _is_moe_layer(module) -> bool:
    from r1mega.moe.layer import MoELayer

    return isinstance(module, type) and issubclass(module, MoELayer)


def fp8_layer_specs(layer_specs: list, policy: Fp8Policy, *, first_layer: int,
                    num_layers: int) -> list:
    """Per-layer specs of layers [first_layer, first_layer + len(layer_specs)) of a
    ``num_layers`` model, FP8 where the policy says so."""
    return [with_fp8_linears(s, policy) if policy.layer_is_fp8(first_layer + i, num_layers) else s
            for i, s in enumerate(layer_specs)]
