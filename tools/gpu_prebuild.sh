#!/usr/bin/env bash
# Build csrc/'s CUDA extensions here, on the CPU machine, for the GPU machine (Python 3.12, torch
# 2.11.0+cu130; setup.py's sm_80 and sm_90), so a device call carries the six .so files and skips
# its own build (GPU_SKIP_BUILD=1 tools/gpu_all.sh), which took 248 s of device time. The venv is
# tools/gpu_te.sh's (tools/gpu_abi_venv.sh). The built files need glibc 2.32 at most.
#   tools/gpu_prebuild.sh    -> r1mega_{grpo,moe,fp8,gemm,attn,wgmma}_cuda.cpython-312-x86_64-linux-gnu.so here
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/gpu_abi_venv.sh
t0=$(date +%s)
rm -rf build/temp.linux-x86_64-cpython-312
MAX_JOBS=$(nproc) "$venv/bin/python" setup.py build_ext --inplace >/tmp/r1mega_prebuild.log 2>&1 \
  || { tail -30 /tmp/r1mega_prebuild.log; exit 1; }
for f in r1mega_*_cuda.cpython-312-x86_64-linux-gnu.so; do strip --strip-debug "$f"; done  # the carry holds 64 MiB in all
# each must load against that torch (its CUDA libraries from the pip packages)
LD_LIBRARY_PATH=$LIBRARY_PATH "$venv/bin/python" -c '
import torch, r1mega_grpo_cuda, r1mega_moe_cuda, r1mega_fp8_cuda, r1mega_gemm_cuda, r1mega_attn_cuda, r1mega_wgmma_cuda'
echo "built and loaded in $(( $(date +%s) - t0 )) s (log: /tmp/r1mega_prebuild.log):"
ls -la r1mega_*_cuda.cpython-312-x86_64-linux-gnu.so
