# Sourced (not run) by tools/gpu_te.sh prepare and tools/gpu_prebuild.sh, on the CPU machine: a
# Python 3.12 venv holding the GPU machine's torch (2.11.0, the cu130 build PyPI serves) at
# $TE_VENV (default /tmp/te312), and the CUDA, nccl and cudnn headers and libraries of torch's pip
# packages on CPATH / LIBRARY_PATH, which the local toolkit (nvcc 13.0) lacks. Sets $venv; exports
# CPATH, LIBRARY_PATH, CUDA_HOME.
venv=${TE_VENV:-/tmp/te312}
[ -x "$venv/bin/python" ] || "${TE_PYTHON:-python3.12}" -m venv "$venv"
"$venv/bin/pip" install -q torch==2.11.0 numpy ninja pybind11 packaging wheel setuptools
_nv=$("$venv/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')
export CPATH=$_nv/cu13/include:$_nv/nccl/include:$_nv/cudnn/include${CPATH:+:$CPATH}
export LIBRARY_PATH=$_nv/cu13/lib:$_nv/nccl/lib:$_nv/cudnn/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
unset _nv
