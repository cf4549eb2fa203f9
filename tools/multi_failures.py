"""Failure drills of the multi-GPU script (tools/gpu_multi.sh, issue 20 item 6) on a real run.

    python tools/multi_failures.py --nproc 8 --out $OUT [--timeout-s 60] [--cpu]

1. kill: NPROC ranks of `r1mega train` (a small GRPO config, launched like torchrun's workers
   but as this script's own children, so that each rank's exit code is visible), one rank
   SIGKILLed after the first logged step: every other rank must exit non-zero within
   parallel.timeout_s (+ a grace for the process teardown). On NCCL a dead peer ends in the
   collective timeout (the watchdog aborts the rank); on gloo the broken connection ends it first.
2. restart: `launch/torchrun.sh` with MAX_RESTARTS=1 and a checkpoint every 2 steps; one worker
   SIGKILLed after the first checkpoint: the elastic agent restarts the workers, which resume from
   the last checkpoint ("resumed from ... at GRPO step k", k > 0), and the job ends with exit 0
   after all its steps.

Prints one line per drill, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: r1mega from this checkout
    sys.path.insert(0, ROOT)
# A small GRPO run on the demo task: no cold start, no held-out eval, a few prompts per step.
SMALL = ["train.sft_steps=0", "data.eval_source=null", "data.global_batch_prompts=16",
         "rollout.group_size=4", "rollout.max_new_tokens=16", "logging.samples_every_steps=0"]
CPU_TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
            "model.num_attention_heads=2", "model.num_query_groups=1",
            "data.global_batch_prompts=4", "rollout.group_size=2", "rollout.max_new_tokens=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc; no psutil on the GPU machine)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    return sorted(children.get(pid, []))


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for(cond, timeout_s: float, procs=()) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        if procs and all(p.poll() is not None for p in procs):
            return cond()
        time.sleep(0.5)
    return False


def metrics_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return [r for r in rows if "loss" in r]


def drill_kill(args, config: list[str], env: dict) -> dict:
    run_dir = os.path.join(args.out_work, "kill_run")
    port = free_port()
    procs, logs = [], []
    for rank in range(args.nproc):
        renv = dict(env, RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank),
                    LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(args.out, f"fail_kill_rank{rank}.log"), "w") if rank < 2 else subprocess.DEVNULL
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "r1mega.cli", "train", *config, f"logging.run_dir={run_dir}",
             "train.steps=1000", f"parallel.timeout_s={args.timeout_s}"],
            cwd=ROOT, env=renv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    res = {"drill": "kill", "ranks": args.nproc, "timeout_s": args.timeout_s}
    try:
        started = wait_for(lambda: len(metrics_rows(run_dir)) >= 1, args.start_s, procs)
        res["started"] = started
        if not started:
            res.update(ok=False, error=f"no step logged in {args.start_s} s",
                       exit_codes=[p.poll() for p in procs])
            return res
        victim = args.nproc - 1
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        limit = args.timeout_s + args.grace_s
        others = [p for r, p in enumerate(procs) if r != victim]
        wait_for(lambda: all(p.poll() is not None for p in others), limit)
        res["exit_s"] = round(time.monotonic() - t0, 1)
        codes = [p.poll() for p in procs]
        res["exit_codes"] = codes
        res["ok"] = all(c is not None and c != 0 for c in codes)
        if not res["ok"]:
            res["error"] = (f"ranks still running after {limit} s: "
                            f"{[r for r, c in enumerate(codes) if c is None]}; "
                            f"ranks exiting 0: {[r for r, c in enumerate(codes) if c == 0]}")
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            if log is not subprocess.DEVNULL:
                log.close()


def drill_restart(args, config: list[str], env: dict) -> dict:
    from_ckpt = os.path.join(args.out_work, "restart_ckpt")
    run_dir = os.path.join(args.out_work, "restart_run")
    steps = args.restart_steps
    renv = dict(env, MAX_RESTARTS="1", NPROC_PER_NODE=str(args.nproc), MASTER_PORT=str(free_port()))
    cmd = ["bash", os.path.join(ROOT, "launch/torchrun.sh"), *config, f"train.steps={steps}",
           "checkpoint.save_every_steps=2", f"checkpoint.dir={from_ckpt}",
           f"logging.run_dir={run_dir}", f"parallel.timeout_s={args.timeout_s}"]
    log_path = os.path.join(args.out, "fail_restart.log")
    res = {"drill": "restart", "ranks": args.nproc, "steps": steps}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=renv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            from r1mega.train.checkpoint import list_checkpoints

            saved = wait_for(lambda: any(s > 0 for s, _ in list_checkpoints(from_ckpt)),
                             args.start_s, [proc])
            if not saved:
                res.update(ok=False, error=f"no checkpoint after {args.start_s} s (rc {proc.poll()})")
                return res
            # The agent's own children only: a worker's forked helpers share its command line.
            workers = [p for p in children_of(proc.pid) if "r1mega.cli" in cmdline(p)]
            res["workers_seen"] = len(workers)
            if not workers:
                res.update(ok=False, error="no worker process found to kill")
                return res
            os.kill(max(workers), signal.SIGKILL)  # the last one started: a rank > 0
            try:
                rc = proc.wait(timeout=args.restart_wait_s)
            except subprocess.TimeoutExpired:
                rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = open(log_path, errors="replace").read()
    resumed = [ln.strip() for ln in out.splitlines() if "resumed from" in ln]
    steps_logged = sorted({r["step"] for r in metrics_rows(run_dir)})
    res.update(rc=rc, resumed_line=resumed[-1][-160:] if resumed else None,
               last_step=steps_logged[-1] if steps_logged else None)
    # Resumed from a checkpoint after step 0 (not a fresh start), and ran to the end.
    at_step = resumed[-1].rsplit(" step ", 1)[-1] if resumed else ""
    res["ok"] = bool(rc == 0 and resumed and at_step.isdigit() and int(at_step) > 0
                     and res["last_step"] == steps)
    if not res["ok"]:
        res["error"] = f"rc {rc}, resumed {bool(resumed)}, last step {res['last_step']} of {steps}"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/r1mega-out"))
    ap.add_argument("--timeout-s", type=int, default=60, help="parallel.timeout_s of the runs")
    ap.add_argument("--grace-s", type=int, default=30, help="teardown allowance past the timeout")
    ap.add_argument("--start-s", type=int, default=180, help="time to the first step/checkpoint")
    ap.add_argument("--restart-steps", type=int, default=6)
    ap.add_argument("--restart-wait-s", type=int, default=240)
    ap.add_argument("--cpu", action="store_true", help="tiny model (CPU dry run)")
    ap.add_argument("--only", choices=["kill", "restart"], default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import tempfile

    args.out_work = tempfile.mkdtemp(prefix="r1mega_failures_")
    config = [os.path.join(ROOT, "configs/demo.yaml"), *SMALL, *(CPU_TINY if args.cpu else []),
              # no decode capture/compile: the drills time the failure handling, not start-up
              "rollout.cuda_graphs=false", "rollout.compile_decode=false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), ROOT) if p)
    results = []
    for name, fn in (("kill", drill_kill), ("restart", drill_restart)):
        if args.only and name != args.only:
            continue
        t = time.monotonic()
        r = fn(args, config, env)
        r["wall_s"] = round(time.monotonic() - t, 1)
        print(f"failure drill {name}: {'ok' if r.get('ok') else 'FAILED'} {r}", flush=True)
        results.append(r)
    import shutil

    shutil.rmtree(args.out_work, ignore_errors=True)
    ok = bool(results) and all(r.get("ok") for r in results)
    print(json.dumps({"bench": "failures", "ok": ok, "drills": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
