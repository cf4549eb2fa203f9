#!/usr/bin/env bash
# Build DeepGEMM's wheel (deepseek-ai/DeepGEMM; optional: R1MEGA_FP8_BLOCKWISE_GEMM=deepgemm) here, on
# the CPU machine, for the GPU machine (Python 3.12, torch 2.11.0+cu130), into .whl/ where
# tools/gpu_all.sh installs it. Only its host module is compiled here; it compiles its kernels with
# nvcc on the GPU on first use. The venv is tools/gpu_abi_venv.sh's.
#   DG_SRC: a DeepGEMM checkout with its submodules (git clone --recursive), or unset to export
#   commit $DG_COMMIT and the CUTLASS and fmt commits it pins from the fetched mirrors below.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
. tools/gpu_abi_venv.sh
DG_COMMIT=${DG_COMMIT:-54e2261}
B=/tmp/dgbuild
if [ -z "${DG_SRC:-}" ]; then
  M=/work/.mirror
  DG_SRC=$B/src
  rm -rf "$DG_SRC" && mkdir -p "$DG_SRC"
  git -C $M/deepseek-ai+DeepGEMM/repo archive "$DG_COMMIT" | tar -x -C "$DG_SRC"
  pins=$(git -C $M/deepseek-ai+DeepGEMM/repo ls-tree "$DG_COMMIT" third-party/)
  cut_pin=$(awk '/third-party\/cutlass$/ {print $3}' <<<"$pins")
  fmt_pin=$(awk '/third-party\/fmt$/ {print $3}' <<<"$pins")
  git -C $M/NVIDIA+cutlass/repo archive "$cut_pin" include 2>/dev/null | tar -x -C "$DG_SRC/third-party/cutlass"
  git -C $M/fmtlib+fmt/repo archive "$fmt_pin" include | tar -x -C "$DG_SRC/third-party/fmt"
fi
# torch's pip CUDA libraries have only versioned names (libnvrtc.so.13): link names for the build
nv=$("$venv/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13
mkdir -p $B/linklibs
ln -sf "$nv/lib/libnvrtc.so.13" $B/linklibs/libnvrtc.so
ln -sf "$nv/lib/libcudart.so.13" $B/linklibs/libcudart.so
cd "$DG_SRC"
rm -rf build dist ./*.egg-info
# DG_FORCE_BUILD: never the download of a prebuilt wheel; DG_JIT_* unset, or setup.py bakes them in
env -u DG_JIT_CACHE_DIR -u DG_JIT_PRINT_COMPILER_COMMAND -u DG_JIT_CPP_STANDARD \
  CPLUS_INCLUDE_PATH="$nv/include" LDFLAGS="-L$B/linklibs" TORCH_CUDA_ARCH_LIST=9.0 \
  DG_FORCE_BUILD=1 DG_USE_LOCAL_VERSION=1 "$venv/bin/python" setup.py bdist_wheel >$B/build.log 2>&1 \
  || { tail -30 $B/build.log; exit 1; }
mkdir -p "$repo/.whl" && cp dist/deep_gemm-*.whl "$repo/.whl/"
ls -la "$repo"/.whl/deep_gemm-*.whl
