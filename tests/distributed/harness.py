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

Backend switch: ``R1MEGA_TEST_BACKEND=nccl`` runs the same ranks on GPUs, one per rank (LOCAL_RANK
= rank picks ``cuda:rank``; the runtime then uses NCCL and bf16), and fails a rank on which CPU
mode got switched on. The default, ``gloo``, hides the GPUs from the ranks so that the CPU
behaviour (gloo, fp32, CPU mode) is the same on a GPU machine. Tests read :func:`on_gpus` to pick
their bf16 tolerances.
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

BACKEND_ENV = "R1MEGA_TEST_BACKEND"


def backend_name() -> str:
    """``gloo`` (default: CPU ranks) or ``nccl`` (one GPU per rank); anything else is an error."""
    name = os.environ.get(BACKEND_ENV, "gloo").strip().lower() or "gloo"
    if name not in ("gloo", "nccl"):
        raise ValueError(f"{BACKEND_ENV}={name!r}: use gloo (CPU ranks, the default) or nccl "
                         f"(one GPU per rank)")
    return name


def on_gpus() -> bool:
    """True when the ranks run on GPUs (NCCL, bf16): tests then use their bf16 tolerances."""
    return backend_name() == "nccl"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple,
            timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpus = on_gpus()
    if not gpus:
        # Before anything touches CUDA: the runtime then picks CPU mode, as on a CPU-only box.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    path = os.path.join(out_dir, f"rank{rank}.pt")
    # A hung rank writes its Python stacks just before the parent gives up on it.
    stacks = open(os.path.join(out_dir, f"rank{rank}.stack"), "w")
    faulthandler.dump_traceback_later(max(timeout_s - 5, 1), exit=False, file=stacks)
    try:
        result = fn(rank, world_size, *args)
        if gpus:
            from r1mega.parallel.cpu_mode import cpu_mode_enabled

            # CPU mode redirects megatron's CUDA calls to the CPU: on a GPU rank it would hide bugs.
            if cpu_mode_enabled():
                raise AssertionError("CPU mode is on in a GPU rank (R1MEGA_TEST_BACKEND=nccl)")
            if "megatron.core.parallel_state" in sys.modules and torch.distributed.is_initialized():
                backend = torch.distributed.get_backend()
                if backend != "nccl":
                    raise AssertionError(f"rank ran on backend {backend!r}, expected nccl")
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
    if on_gpus():
        n = torch.cuda.device_count()
        if n == 0:
            raise RuntimeError(f"{BACKEND_ENV}=nccl needs GPUs (one per rank); none is visible. "
                               f"Unset it to run the ranks on CPU (gloo).")
        if n < world_size:  # e.g. a 4-rank layout on a 2-GPU machine: not this machine's test
            import pytest

            pytest.skip(f"{world_size} ranks on NCCL need {world_size} GPUs; {n} visible")
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
            # On CPU: GPU ranks' tensors come back as CPU tensors, so that a test can pass one run's
            # result (an initial state) to the next ranks without CUDA IPC between processes.
            rec = torch.load(path, weights_only=False, map_location="cpu")
            if not rec["ok"]:
                errors.append(f"rank {r} raised:\n{rec['error']}")
            results.append(rec.get("result"))
        if errors:
            raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
        return results


# bf16 tolerances for R1MEGA_TEST_BACKEND=nccl, as relative errors of a whole tensor
# (||got - ref|| / ||ref||), not per element: bf16 keeps 8 significant bits (unit roundoff
# u = 2**-8 ~ 3.9e-3), and a layout moves where rounding happens (TP all-reduces bf16 partial
# sums, PP/DP pack other micro-batches, the single GPU fuses other GEMM shapes), so single
# elements near zero can differ by 100 % while the tensor agrees to a few u.
#   loss, log-probs    2e-2  ~5 u: a mean over every token, each logit a few roundings deep
#   gradients, norms   5e-2  ~13 u: the backward runs twice as many bf16 GEMMs as the forward
#   params after the   Adam moves a weight by ~lr * m/sqrt(v), about lr * sign(g) in the first
#   optimizer steps    steps: where a gradient is near zero, its bf16 sign can differ between
#                      layouts and that weight then moves the other way (a difference of 2 lr per
#                      step, whatever the gradient's size). So the check is on the update
#                      (param - init): within 0.5 of the reference update as a whole tensor (a
#                      wrong shard or a missed update is off by >= 1.0), and no element further
#                      than 2.5 x the summed lr (+ 2 u of bf16 storage) from the reference.
BF16_REL = {"loss": 2e-2, "logprobs": 2e-2, "grad": 5e-2, "grad_norm": 5e-2, "update": 0.5}


def rel_error(got, ref) -> float:
    got, ref = torch.as_tensor(got).double().cpu(), torch.as_tensor(ref).double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def assert_rel_close(got, ref, kind: str, msg: str = "") -> None:
    """``got`` within :data:`BF16_REL[kind]` of ``ref`` as a whole tensor (see the table)."""
    err, tol = rel_error(got, ref), BF16_REL[kind]
    assert err <= tol, f"{msg}: relative error {err:.3e} > {tol:.0e} ({kind}, bf16 on GPUs)"


def assert_update_close(got, ref, init, lr_sum: float, msg: str = "") -> None:
    """Parameters after a few Adam steps (bf16 on GPUs): see the update row of the table above."""
    got, ref, init = (torch.as_tensor(t).double().cpu() for t in (got, ref, init))
    assert_rel_close(got - init, ref - init, "update", f"{msg} (update)")
    slack = 2.5 * lr_sum + 2 * 2.0**-8 * float(ref.abs().max())
    worst = float((got - ref).abs().max())
    assert worst <= slack, f"{msg}: an element is {worst:.3e} from the reference (> {slack:.3e})"
