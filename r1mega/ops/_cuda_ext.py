"""The ``r1mega_grpo_cuda`` extension (csrc/grpo_loss*): see r1mega/ops/extension.py.
``R1MEGA_GRPO_JIT=0`` forbids the just-in-time build."""
from r1mega.ops.extension import CudaExtension

_EXT = CudaExtension("r1mega_grpo_cuda", ["grpo_loss.cpp", "grpo_loss_kernel.cu"], "R1MEGA_GRPO",
                     ["--use_fast_math", "-lineinfo"], "GRPO loss uses PyTorch")
SOURCES = _EXT.sources
get, load_error = _EXT.get, _EXT.load_error
