"""Finding the ``r1mega_moe_cuda`` extension: the setup.py build first, then a just-in-time build.

Same pattern as r1mega/ops/_cuda_ext.py: loading is attempted once per process, a failure is
remembered (:func:`load_error`) so that ``impl='auto'`` falls back to the PyTorch reference quietly
while ``impl='cuda'`` can say why it cannot run. ``R1MEGA_MOE_JIT=0`` forbids the JIT build.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
SOURCES = [os.path.join(_CSRC, "moe_dispatch.cpp"), os.path.join(_CSRC, "moe_dispatch_kernel.cu")]

_lock = threading.Lock()
_state = {"tried": False, "module": None, "error": None}


def _arch_flags() -> list[str]:
    ccs = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in ccs]


def _load():
    try:
        import r1mega_moe_cuda  # built by setup.py
        return r1mega_moe_cuda, None
    except ImportError as exc:
        first_error = f"prebuilt module: {exc}"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None, first_error + "; no CUDA device/torch for a JIT build"
    if os.environ.get("R1MEGA_MOE_JIT", "1") == "0":
        return None, first_error + "; JIT build disabled by R1MEGA_MOE_JIT=0"
    if not all(os.path.exists(s) for s in SOURCES):
        return None, first_error + f"; sources missing: {SOURCES}"
    try:
        from torch.utils.cpp_extension import load
        module = load(name="r1mega_moe_cuda", sources=SOURCES, extra_cflags=["-O3"],
                      extra_cuda_cflags=["-O3", "-lineinfo"] + _arch_flags(),
                      verbose=os.environ.get("R1MEGA_MOE_JIT_VERBOSE") == "1")
        return module, None
    except Exception as exc:  # a broken toolchain must not stop training: the reference still works
        return None, f"{first_error}; JIT build failed: {exc}"


def get():
    """The extension module, or None when it cannot be had."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                module, error = _load()
                _state.update(tried=True, module=module, error=error)
                if module is None and torch.cuda.is_available():
                    warnings.warn(f"r1mega_moe_cuda unavailable, MoE dispatch uses PyTorch: {error}")
    return _state["module"]


def load_error():
    return _state["error"]
