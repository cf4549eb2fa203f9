"""Start-up of the parallel runtime: process group, megatron parallel_state, seeds.

megatron's ``parallel_state`` is global; we read it ONCE here into a :class:`ParallelRuntime`
that is passed explicitly to everything that communicates. Code below ``r1mega.parallel`` never
calls ``parallel_state.get_*``.

Order (fixed, because each step needs the previous one):
  1. read the launch environment (torchrun / Slurm / single process);
  2. pick device and backend; switch on CPU mode when there is no GPU;
  3. ``torch.distributed.init_process_group``;
  4. ``parallel_state.initialize_model_parallel`` (tp-cp-ep-dp-pp order);
  5. seeds: same on every rank for data, megatron's model-parallel RNG tracker on GPU.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from r1mega.config import ConfigError, ParallelConfig, PrecisionConfig, derive_data_parallel
from r1mega.parallel.peers import record_peers
from r1mega.parallel import fused_fallbacks
from r1mega.parallel.cpu_mode import enable_cpu_mode
from r1mega.parallel.launch_env import LaunchEnv, read_launch_env


@dataclass
class ParallelRuntime:
    """Sizes, ranks and process groups of this process; passed explicitly, never global."""

    env: LaunchEnv
    device: torch.device
    # Parameter/compute dtype for the model (bf16 on GPU, fp32 on CPU unless configured).
    dtype: torch.dtype
    tp_size: int
    pp_size: int
    vp_size: int  # virtual pipeline stages per rank (1 = plain 1F1B)
    cp_size: int
    ep_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    cp_group: Any
    dp_cp_group: Any
    mp_group: Any
    ep_group: Any
    embd_group: Any
    # megatron's ProcessGroupCollection built from the groups above (for modules that take one).
    pg_collection: Any = None
    sequence_parallel: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pp_last_rank(self) -> int:
        """Global rank of the last pipeline stage in this rank's pipeline."""
        return dist.get_process_group_ranks(self.pp_group)[-1]

    @property
    def pp_first_rank(self) -> int:
        return dist.get_process_group_ranks(self.pp_group)[0]


def resolve_dtype(precision: PrecisionConfig, device: torch.device) -> torch.dtype:
    name = precision.dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _pick_device(env: LaunchEnv, backend: str) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        torch.cuda.set_device(env.local_rank % n)
        device = torch.device("cuda", env.local_rank % n)
        return device, ("nccl" if backend == "auto" else backend)
    if backend == "nccl":
        raise ConfigError("parallel.backend=nccl but no GPU is visible; use parallel.backend=gloo.")
    enable_cpu_mode()
    return torch.device("cpu"), "gloo"


def seed_everything(seed: int, pp_rank: int = 0) -> None:
    """Same seed on every TP/DP rank (identical init of replicated parts); offset per PP stage
    as megatron does so that stages do not draw identical weights. megatron's model-parallel
    RNG tracker (CPU generator states in CPU mode) gets per-TP-rank streams for dropout."""
    s = seed + 100 * pp_rank
    random.seed(s)
    torch.manual_seed(s)
    try:
        import numpy as np

        np.random.seed(s % (2**32))
    except ImportError:
        pass
    from megatron.core import tensor_parallel

    # Different streams per TP rank for dropout/init of sharded weights, same for the rest.
    tensor_parallel.model_parallel_cuda_manual_seed(s)


def init_parallel(
    parallel: ParallelConfig,
    precision: Optional[PrecisionConfig] = None,
    env: Optional[LaunchEnv] = None,
) -> ParallelRuntime:
    """Initialise torch.distributed + megatron parallel_state from ``parallel`` (cfg.parallel)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    env = env or read_launch_env()
    precision = precision or PrecisionConfig()
    device, backend = _pick_device(env, parallel.backend)
    dp = derive_data_parallel(parallel, env.world_size)
    timeout = datetime.timedelta(seconds=parallel.timeout_s)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        kwargs = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=backend, init_method=env.init_method, rank=env.rank,
            world_size=env.world_size, timeout=timeout, **kwargs,
        )
    record_peers()  # so that a rank that loses a peer can later say which one
    vp = parallel.virtual_stages if parallel.virtual_stages > 1 else None
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=vp,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        # r1mega's routed experts are never split over TP (each TP rank routes its own sequence
        # shard, megatron's ETP=1 layout): the EP group is then carved from TP x DP, and an
        # expert's gradient is reduced over the ranks holding the same experts (expert-DP).
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=max(1, parallel.timeout_s // 60),
        # The distributed optimizer's checkpoint gathers run on gloo side-groups.
        create_gloo_process_groups=True,
    )
    rt = ParallelRuntime(
        env=env,
        device=device,
        dtype=resolve_dtype(precision, device),
        tp_size=parallel.tensor,
        pp_size=parallel.pipeline,
        vp_size=parallel.virtual_stages,
        cp_size=parallel.context,
        ep_size=parallel.expert,
        dp_size=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        mp_group=ps.get_model_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        embd_group=ps.get_embedding_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        sequence_parallel=parallel.sequence_parallel,
    )
    seed_everything(parallel.seed, rt.pp_rank)
    fused_fallbacks.install()  # megatron's no-TE/no-apex fallbacks sync once per parameter
    return rt


def destroy_parallel() -> None:
    """Tear down megatron state and the process group (tests start several worlds in a row)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
