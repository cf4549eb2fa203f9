"""Finding a csrc/ extension: the setup.py build first, then a just-in-time build, else None.

Loading is attempted once per process. A failure is remembered (``load_error``) so that
``impl='auto'`` callers fall back to their PyTorch reference quietly while ``impl='cuda'`` can say
why it cannot run. ``<ENV>_JIT=0`` forbids the just-in-time build (about a minute per extension).
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "csrc")


def _arch_flags() -> list[str]:
    """Machine code for every GPU present (not PTX for the driver to compile at start)."""
    ccs = sorted({"%d%d" % torch.cuda.get_device_capability(i)
                  for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in ccs]


class CudaExtension:
    def __init__(self, name: str, sources: list[str], env: str, cuda_flags: list[str],
                 fallback: str, libraries=None, arch_flags=None):
        """``libraries``: a function giving (include dirs, linker flags) for the JIT build, or
        None when the libraries it needs are not found (no JIT build then). ``arch_flags``: the
        JIT build's -gencode flags instead of the present GPUs' (an sm_90a-only extension)."""
        self.name, self.env, self.cuda_flags, self.fallback = name, env, cuda_flags, fallback
        self.libraries = libraries
        self.arch_flags = arch_flags
        self.sources = [os.path.join(CSRC, s) for s in sources]
        self._lock = threading.Lock()
        self._tried, self._module, self._error = False, None, None

    def _load(self):
        try:
            return importlib.import_module(self.name), None  # built by setup.py
        except ImportError as exc:
            first_error = f"prebuilt module: {exc}"
        if not torch.cuda.is_available() or torch.version.cuda is None:
            return None, first_error + "; no CUDA device/torch for a JIT build"
        if os.environ.get(f"{self.env}_JIT", "1") == "0":
            return None, first_error + f"; JIT build disabled by {self.env}_JIT=0"
        if not all(os.path.exists(s) for s in self.sources):
            return None, first_error + f"; sources missing: {self.sources}"
        includes, ldflags = [], []
        if self.libraries is not None:
            found = self.libraries()
            if found is None:
                return None, first_error + "; the libraries it links were not found for a JIT build"
            includes, ldflags = found
        try:
            from torch.utils.cpp_extension import load

            module = load(name=self.name, sources=self.sources, extra_cflags=["-O3"],
                          extra_cuda_cflags=["-O3", *self.cuda_flags,
                                             *(self.arch_flags or _arch_flags())],
                          extra_include_paths=includes, extra_ldflags=ldflags,
                          verbose=os.environ.get(f"{self.env}_JIT_VERBOSE") == "1")
            return module, None
        except Exception as exc:  # a broken toolchain must not stop training: the reference works
            return None, f"{first_error}; JIT build failed: {exc}"

    def get(self):
        """The extension module, or None when it cannot be had."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._module, self._error = self._load()
                    self._tried = True
                    if self._module is None and torch.cuda.is_available():
                        warnings.warn(f"{self.name} unavailable, {self.fallback}: {self._error}")
        return self._module

    def loaded(self):
        """The module if it has been loaded already, else None: never loads (safe while dynamo
        traces, where an import would break the graph)."""
        return self._module

    def load_error(self):
        return self._error
