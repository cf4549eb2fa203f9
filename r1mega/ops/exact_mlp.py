"""How the exact mode's dense MLPs reach the fused SwiGLU kernels (r1mega/ops/triton_swiglu.py).

megatron's ``MLP.forward`` has three activation paths: its torch.compile'd fusion
(``bias_activation_fusion``: inductor kernels, outside the exact mode), the unfused ``glu``
(chunk, silu, mul, and autograd's cat: five passes over the activations), and the
``use_te_activation_func`` path, which adds fc1's bias and calls the module's own
``activation_func`` attribute on the whole (..., 2F) output. The last is the one seam that takes
a per-module function, so on CUDA each plain SwiGLU ``MLP`` of an exact model gets
:func:`exact_swiglu` there, with its own shallow copy of the config that turns that path on.

Why not the alternatives: the compiled path calls the module-global ``bias_swiglu_impl``, so
swapping it is a process-wide monkeypatch that would reach every model, default mode included;
routing inside the ``TorchFunctionMode`` would have to recognise a ``chunk`` followed by
``silu`` and ``mul`` across calls. Why a config copy: the model's config object is shared by all
its modules and by other chunks built with it; flipping ``use_te_activation_func`` there would
make any MLP not rewired here apply ``silu`` to its whole fc1 output.

The rollout's model runner calls the same ``layer.mlp`` modules, so decode and training run the
same kernel. Off CUDA (and with ``R1MEGA_EXACT_TRITON=0``) nothing changes: the unfused path
runs inside the exact mode, with its deterministic CPU ``silu``.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from r1mega.ops import triton_swiglu


def exact_swiglu(x: torch.Tensor) -> torch.Tensor:
    """The activation the rewired MLPs call: fc1's output (..., 2F) -> (..., F). Looked up
    through the module at call time, so a test can count the calls."""
    return triton_swiglu.swiglu(x)


def fused_swiglu_wanted(device: torch.device) -> bool:
    """Whether an exact model on ``device`` uses the fused kernels (CUDA with Triton, and the
    exact mode's Triton kernels not switched off by R1MEGA_EXACT_TRITON=0)."""
    return (device.type == "cuda" and triton_swiglu.HAVE_TRITON
            and os.environ.get("R1MEGA_EXACT_TRITON", "1") != "0")


def plain_swiglu(mlp) -> bool:
    """megatron's own MLP (not a subclass with another forward) computing silu(gate) * up with
    nothing the fused kernels leave out (clamp, linear offset, a TE activation)."""
    if type(mlp) is not MLP:
        return False
    c = mlp.config
    return (c.gated_linear_unit and mlp.activation_func is F.silu
            and not c.use_te_activation_func and c.activation_func_clamp_value is None
            and c.glu_linear_offset == 0.0)


def route_swiglu(model: torch.nn.Module) -> list:
    """Point each plain SwiGLU MLP of ``model`` at :func:`exact_swiglu` when its weights live
    where :func:`fused_swiglu_wanted`; returns what :func:`restore_swiglu` puts back."""
    saved = []
    for mlp in model.modules():
        if not plain_swiglu(mlp):
            continue
        weight = mlp.linear_fc1.weight
        if not fused_swiglu_wanted(weight.device):
            continue
        cfg = copy.copy(mlp.config)  # this module's alone (module docstring)
        cfg.use_te_activation_func = True
        cfg.bias_activation_fusion = False
        saved.append((mlp, mlp.config, mlp.activation_func))
        mlp.config, mlp.activation_func = cfg, exact_swiglu
    return saved


def restore_swiglu(saved: list) -> None:
    for mlp, config, activation in saved:
        mlp.config, mlp.activation_func = config, activation
