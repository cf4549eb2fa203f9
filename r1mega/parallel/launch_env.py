"""Who am I in the job? Read rank/world/master from torchrun or Slurm environment variables.

Pure functions of an environment mapping so that they are testable without a cluster.
torchrun wins when both are present (``srun torchrun ...`` sets both; torchrun's values are the
per-process ones).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from r1mega.errors import UserError


class LaunchEnvError(UserError, RuntimeError):
    """The environment does not describe a valid launch; the message names the variable."""

    rank_specific = True  # each process reads its own variables: every rank that errs says so


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    # "torchrun" | "slurm" | "single"
    launcher: str

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: ``gpu[01-03,07]`` -> gpu01 gpu02 gpu03 gpu07; ``a[1-2],b3``.

    Zero padding of the range bounds is kept (``[08-10]`` -> 08 09 10).
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"SLURM_JOB_NODELIST '{nodelist}': unbalanced ']'.")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise LaunchEnvError(f"SLURM_JOB_NODELIST '{nodelist}': unbalanced '['.")
    parts.append(cur)
    for part in parts:
        part = part.strip()
        if not part:
            continue
        hosts.extend(_expand_one(part, nodelist))
    if not hosts:
        raise LaunchEnvError(f"SLURM_JOB_NODELIST '{nodelist}' names no host.")
    return hosts


def _expand_one(pattern: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        return [pattern]
    prefix, suffix = pattern[: m.start()], pattern[m.end():]
    out = []
    for item in m.group(1).split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise LaunchEnvError(f"SLURM_JOB_NODELIST '{whole}': bad range '{item}'.")
            width = len(lo)
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        elif item.isdigit():
            values = [item]
        else:
            raise LaunchEnvError(f"SLURM_JOB_NODELIST '{whole}': bad item '{item}'.")
        for v in values:
            # The suffix may hold another bracket group (``n[1-2]-ib[0-1]``).
            out.extend(_expand_one(prefix + v + suffix, whole))
    return out


def world_size_from_env(env: Optional[Mapping[str, str]] = None) -> int:
    """The launch's world size (WORLD_SIZE, else SLURM_NTASKS, else 1) without reading the rest,
    for checking a config's layout before any process group exists."""
    env = os.environ if env is None else env
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in env:
            return _int(env, key)
    return 1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchEnvError(f"Environment variable {key}={env[key]!r} is not an integer.") from None


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(env: Optional[Mapping[str, str]] = None, default_port: int = 29500) -> LaunchEnv:
    """torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), else Slurm (SLURM_*), else one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port
        launcher = "torchrun"
    elif "SLURM_PROCID" in env:
        rank = _int(env, "SLURM_PROCID")
        if "SLURM_NTASKS" not in env:
            raise LaunchEnvError("SLURM_PROCID is set but SLURM_NTASKS is not; launch with srun.")
        world = _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise LaunchEnvError(
                    "Slurm launch without MASTER_ADDR needs SLURM_JOB_NODELIST to find the master."
                )
            addr = expand_nodelist(nodelist)[0]
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            # Derive from the job id so that two jobs sharing a node do not collide.
            job = env.get("SLURM_JOB_ID", "0")
            port = 20000 + int(job) % 20000 if job.isdigit() else default_port
        launcher = "slurm"
    else:
        # One process talks to nobody: any free port will do, and a fixed one would make two
        # single-process runs on one machine collide.
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
        return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
    if world < 1 or not 0 <= rank < world:
        raise LaunchEnvError(f"Rank {rank} is outside world size {world} ({launcher} environment).")
    if local < 0:
        raise LaunchEnvError(f"Local rank {local} is negative ({launcher} environment).")
    return LaunchEnv(rank, world, local, addr, port, launcher)
