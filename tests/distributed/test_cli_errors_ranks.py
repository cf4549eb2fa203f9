"""Bad input and a lost peer in a two-rank `r1mega train` (two processes with torchrun's
variables, no elastic agent in between, so what each rank itself prints and returns is seen)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.distributed.harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=2", "model.num_query_groups=1", "train.sft_steps=0",
        "data.eval_source=null", "data.global_batch_prompts=4", "rollout.group_size=2",
        "rollout.max_new_tokens=8", "logging.samples_every_steps=0", "parallel.timeout_s=60"]


def _start_ranks(tmp_path, *overrides):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env.pop("R1MEGA_DEBUG", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "r1mega.cli", "train", DEMO, *TINY, *overrides],
            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True))
    return procs


def _finish(procs, timeout_s):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return outs


def test_bad_input_is_reported_once_and_every_rank_exits_2(tmp_path):
    procs = _start_ranks(tmp_path, f"data.source={tmp_path / 'nope.jsonl'}",
                         f"logging.run_dir={tmp_path / 'run'}")
    results = _finish(procs, 240)
    assert [rc for rc, _, _ in results] == [2, 2], results
    err = "".join(e for _, _, e in results)
    assert "Traceback" not in err, err[-3000:]
    reports = [ln for ln in err.splitlines() if "does not exist" in ln]
    assert len(reports) == 1 and reports[0].startswith("r1mega train: error: data.source="), err


def test_a_rank_that_loses_its_peer_says_which(tmp_path):
    run_dir = tmp_path / "run"
    procs = _start_ranks(tmp_path, "train.steps=400", f"logging.run_dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        assert all(p.poll() is None for p in procs), _finish(procs, 10)
        time.sleep(0.5)
    assert metrics.exists(), "training did not start"
    os.killpg(procs[1].pid, signal.SIGKILL)  # no handler, no goodbye
    t0 = time.monotonic()
    (rc, out, err), _ = _finish(procs, 180)
    assert rc not in (0, None), (rc, err[-3000:])
    assert time.monotonic() - t0 < 180
    assert "Traceback" not in err, err[-3000:]
    lost = [ln for ln in err.splitlines() if "lost contact" in ln]
    assert len(lost) == 1 and "rank 0 lost contact with rank 1" in lost[0], err[-3000:]
    print(lost[0])


def test_launch_script_reports_bad_input_in_two_lines(tmp_path):
    """launch/torchrun.sh: the rank's one line, then the launcher's one line; torchrun's exit code
    is the worker's (2), and no launcher traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    env.pop("R1MEGA_DEBUG", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "torchrun.sh"), DEMO, *TINY,
                           f"data.source={tmp_path / 'nope.jsonl'}", f"logging.run_dir={tmp_path / 'run'}"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    assert len([ln for ln in out.splitlines() if "does not exist" in ln]) == 1, out
    assert "r1mega: torchrun: rank" in out and "exited with code 2" in out, out
