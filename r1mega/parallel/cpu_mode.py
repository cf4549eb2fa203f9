"""CPU mode: run megatron-core 0.16.1 on machines without a GPU (gloo, fp32).

megatron-core asks for CUDA in several places that have nothing to do with the maths: the
pipeline schedules allocate with ``device="cuda"``, p2p communication calls
``torch.cuda.current_device()`` and ``synchronize()``, DDP and the bucket code use
``torch.cuda`` streams and events, the distributed optimizer tests
``param.type() == 'torch.cuda.FloatTensor'``. All redirections live HERE and nowhere else, so a
reader can see the complete list of lies we tell megatron on CPU:

1. ``torch.cuda`` module attributes get CPU stand-ins (streams, events, synchronize, device
   index 0, nvtx, empty_cache), and megatron's CUDA RNG tracker tracks CPU generator states. ``torch.cuda.is_available()`` still answers False so that r1mega
   itself always knows where it runs.
2. A :class:`torch.overrides.TorchFunctionMode` rewrites device arguments that name CUDA (or a
   bare device index, which torch reads as CUDA) to ``cpu``, makes ``Tensor.cuda()`` a no-op and
   answers ``Tensor.type()`` as if CPU tensors were CUDA tensors (megatron's
   optimizer only uses those to pick a code path, and the CUDA path is the one that is correct).

:func:`enable_cpu_mode` is called by :mod:`r1mega.parallel.runtime` when no GPU is present; it is
idempotent and does nothing when CUDA is available.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_mode: "_CudaToCpuMode | None" = None
_saved_cuda_attrs: dict[str, Any] = {}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        # torch reads a bare integer device as cuda:<int>.
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CPU = torch.device("cpu")

# Tensor.type() strings megatron compares against, keyed by CPU dtype.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device requests to the CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Only the query form; ``t.type(torch.float16)`` converts and is left alone.
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and args:
            args = tuple(_CPU if _is_cuda_device(a) and i > 0 else a for i, a in enumerate(args))
        elif func in (torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            # Positional integers are sizes here (x.new_zeros(3, 4)), never device ordinals.
            args = tuple(_CPU if isinstance(a, (str, torch.device)) and _is_cuda_device(a)
                         and i > 0 else a for i, a in enumerate(args))
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        self.device = _CPU

    def wait_stream(self, other) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``; timing uses the host clock."""

    def __init__(self, enable_timing: bool = False, **kwargs):
        self._t = None

    def record(self, stream=None) -> None:
        import time

        self._t = time.perf_counter()

    def wait(self, stream=None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return 1000.0 * ((end._t or 0.0) - (self._t or 0.0))


_DEFAULT_STREAM = _CpuStream()


def _stand_ins() -> dict[str, Any]:
    return {
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "stream": lambda s=None: contextlib.nullcontext(s),
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
    }


def _patch_nvtx() -> None:
    nvtx = torch.cuda.nvtx
    for name in ("range_push", "range_pop", "mark"):
        _saved_cuda_attrs.setdefault(f"nvtx.{name}", getattr(nvtx, name))
        setattr(nvtx, name, lambda *a, **k: None)
    _saved_cuda_attrs.setdefault("nvtx.range", nvtx.range)
    nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _install_cpu_rng_tracker() -> None:
    """megatron forks a "model-parallel-rng" CUDA RNG state around dropout and, under sequence
    parallelism, around the embedding. On CPU the tracked states are CPU generator states."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            if name in self.states_:
                raise Exception(f"cpu rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cpu rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recomputation saves and restores "the CUDA generator" next to the CPU one; on
    # CPU there is only the CPU generator, which megatron's checkpoint already restores itself.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def cpu_mode_enabled() -> bool:
    return _mode is not None


def enable_cpu_mode(force: bool = False) -> bool:
    """Switch CPU mode on for this process. Returns True when it is (now) on.

    Does nothing on a machine with a GPU unless ``force``; calling it twice is harmless.
    """
    global _mode
    if torch.cuda.is_available() and not force:
        return False
    with _lock:
        if _mode is not None:
            return True
        for name, fn in _stand_ins().items():
            _saved_cuda_attrs.setdefault(name, getattr(torch.cuda, name, None))
            setattr(torch.cuda, name, fn)
        _patch_nvtx()
        _install_cpu_rng_tracker()
        mode = _CudaToCpuMode()
        # Entered for the life of the process: megatron's schedules allocate at any depth.
        mode.__enter__()
        _mode = mode
    return True


def disable_cpu_mode() -> None:
    """Undo :func:`enable_cpu_mode` (tests that need a clean torch use it)."""
    global _mode
    with _lock:
        if _mode is None:
            return
        _mode.__exit__(None, None, None)
        _mode = None
        for name, fn in _saved_cuda_attrs.items():
            if name.startswith("nvtx."):
                setattr(torch.cuda.nvtx, name[5:], fn)
            elif fn is not None:
                setattr(torch.cuda, name, fn)
        _saved_cuda_attrs.clear()
