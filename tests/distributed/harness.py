"""Spawn N CPU ranks (gloo) running one function; collect each rank's return value.

    results = run_ranks(my_fn, world_size=4, args=(cfg_dict,))   # [rank0_result, ...]

``my_fn(rank, world_size, *args)`` must be a module-level function (spawn pickles it by name).
Each rank gets torchrun-style environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) on a free port, one intra-op thread (the CI box has 2 cores for all ranks), and CPU
mode is switched on by the runtime as usual. Return values travel through ``torch.save`` files,
so tensors are fine. A rank that raises fails the test with that rank's traceback; a rank that
hangs past ``timeout_s`` is killed and the test fails naming it, with its Python stacks (taken
by faulthandler just before the deadline). The default timeout is generous because CI's two
cores are shared by every rank (and sometimes by other jobs).
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple,
            timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    path = os.path.join(out_dir, f"rank{rank}.pt")
    # A hung rank writes its Python stacks just before the parent gives up on it.
    stacks = open(os.path.join(out_dir, f"rank{rank}.stack"), "w")
    faulthandler.dump_traceback_later(max(timeout_s - 5, 1), exit=False, file=stacks)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        faulthandler.cancel_dump_traceback_later()
        try:
            # A rank that never imported megatron has no megatron state: skip its import (seconds per rank).
            if "megatron.core.parallel_state" in sys.modules:
                from r1mega.parallel.runtime import destroy_parallel

                destroy_parallel()
            elif torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:
            pass


def _wait(procs, out_dir: str, timeout_s: float) -> None:
    """Join all; once one rank has failed, give the others a few seconds, then stop waiting
    (they are usually blocked in a collective with the dead rank)."""
    deadline = time.monotonic() + timeout_s
    failed_at = None
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        if failed_at is None:
            for r, p in enumerate(procs):
                if not p.is_alive() and (p.exitcode != 0 or _failed(out_dir, r)):
                    failed_at = time.monotonic()
        elif time.monotonic() - failed_at > 10:
            return
        time.sleep(0.2)


def _failed(out_dir: str, rank: int) -> bool:
    path = os.path.join(out_dir, f"rank{rank}.pt")
    if not os.path.exists(path):
        return True
    return not torch.load(path, weights_only=False)["ok"]


def run_ranks(fn, world_size: int, args: tuple = (), timeout_s: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return results."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="r1mega_ranks_") as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, args, timeout_s),
                             daemon=False) for r in range(world_size)]
        for p in procs:
            p.start()
        _wait(procs, out_dir, timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(5)
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                stack_path = os.path.join(out_dir, f"rank{r}.stack")
                stack = open(stack_path).read() if os.path.exists(stack_path) else ""
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}"
                              f"{', killed after timeout' if r in hung else ''})"
                              + (f"; stacks when it hung:\n{stack}" if stack else ""))
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                errors.append(f"rank {r} raised:\n{rec['error']}")
            results.append(rec.get("result"))
        if errors:
            raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
        return results
