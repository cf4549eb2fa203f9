"""The ``r1mega_moe_cuda`` extension (csrc/moe_dispatch*): see r1mega/ops/extension.py.
``R1MEGA_MOE_JIT=0`` forbids the just-in-time build."""
from r1mega.ops.extension import CudaExtension

_EXT = CudaExtension("r1mega_moe_cuda", ["moe_dispatch.cpp", "moe_dispatch_kernel.cu"], "R1MEGA_MOE",
                     ["-lineinfo"], "MoE dispatch uses PyTorch")
SOURCES = _EXT.sources
get, load_error = _EXT.get, _EXT.load_error
