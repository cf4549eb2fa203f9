"""Finding the ``r1mega_grpo_cuda`` extension: the setup.py build first, then a just-in-time build.

Loading is attempted once per process. A failure is remembered (and reported by :func:`load_error`)
so that ``impl='auto'`` falls back to PyTorch quietly while ``impl='cuda'`` can say why it cannot run.
Set ``R1MEGA_GRPO_JIT=0`` to forbid the just-in-time build (it takes about a minute).
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
SOURCES = [os.path.join(_CSRC, "grpo_loss.cpp"), os.path.join(_CSRC, "grpo_loss_kernel.cu")]

_lock = threading.Lock()
_state = {"tried": False, "module": None, "error": None}


def _jit_arch_flags():
    flags = []
    seen = set()
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        cc = f"{major}{minor}"
        if cc not in seen:
            seen.add(cc)
            flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
    return flags


def _load():
    try:
        import r1mega_grpo_cuda  # built by setup.py
        return r1mega_grpo_cuda, None
    except ImportError as exc:
        first_error = f"prebuilt module: {exc}"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None, first_error + "; no CUDA device/torch for a JIT build"
    if os.environ.get("R1MEGA_GRPO_JIT", "1") == "0":
        return None, first_error + "; JIT build disabled by R1MEGA_GRPO_JIT=0"
    if not all(os.path.exists(s) for s in SOURCES):
        return None, first_error + f"; sources missing: {SOURCES}"
    try:
        from torch.utils.cpp_extension import load
        module = load(
            name="r1mega_grpo_cuda",
            sources=SOURCES,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"] + _jit_arch_flags(),
            verbose=os.environ.get("R1MEGA_GRPO_JIT_VERBOSE") == "1",
        )
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
                    warnings.warn(f"r1mega_grpo_cuda unavailable, GRPO loss uses PyTorch: {error}")
    return _state["module"]


def load_error():
    return _state["error"]
