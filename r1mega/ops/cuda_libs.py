"""Where cuBLASLt's header and library are, for building csrc/exact_gemm_lt.cpp (setup.py loads
this file by path, before r1mega is installed: standard library only).

A CUDA toolkit has them under CUDA_HOME; a pip-installed torch brings its own copy in the
``nvidia`` wheels (``nvidia/cu13/include`` and ``lib``, or ``nvidia/cublas/...``), where the
library has only its versioned name (libcublasLt.so.13): linked by that name, the extension
resolves to the very library torch has loaded.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Optional


def _lib_flags(lib_dir: str) -> Optional[list]:
    if os.path.exists(os.path.join(lib_dir, "libcublasLt.so")):
        return [f"-L{lib_dir}", "-lcublasLt", f"-Wl,-rpath,{lib_dir}"]
    versioned = sorted(glob.glob(os.path.join(lib_dir, "libcublasLt.so.[0-9]*")), key=len)
    if versioned:
        return [f"-L{lib_dir}", f"-l:{os.path.basename(versioned[0])}", f"-Wl,-rpath,{lib_dir}"]
    return None


def cublaslt_flags(cuda_home: Optional[str], search: Optional[list] = None) -> Optional[tuple]:
    """(include dirs, linker flags) for cuBLASLt, or None when no header and library are found.
    The pip wheels come first: they are what torch runs with."""
    roots = []
    for base in (sys.path if search is None else search):
        roots += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include", "cublasLt.h")))
    if cuda_home:
        roots.append(os.path.join(cuda_home, "include", "cublasLt.h"))
    for header in roots:
        if not os.path.exists(header):
            continue
        top = os.path.dirname(os.path.dirname(header))
        for lib_dir in (os.path.join(top, "lib"), os.path.join(top, "lib64")):
            flags = _lib_flags(lib_dir)
            if flags:
                return [os.path.dirname(header)], flags
    return None
