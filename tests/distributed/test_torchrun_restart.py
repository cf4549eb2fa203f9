"""launch/torchrun.sh with MAX_RESTARTS: a rank SIGKILLed after the first checkpoint makes torchrun
restart the workers, which resume from that checkpoint and finish the run (exit 0).

Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (set by the launcher when MAX_RESTARTS > 0) the
restarted round read the dead round's addresses from torchrun's shared store and failed in
init_process_group ("Gloo connectFullMesh failed ... Connection refused"). The drill is the one
tools/gpu_multi.sh runs on GPUs (tools/multi_failures.py), here on 2 CPU ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_killed_rank_is_restarted_and_resumes_from_the_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "multi_failures.py"), "--cpu",
                           "--nproc", "2", "--only", "restart", "--timeout-s", "30",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "fail_restart.log").read_text() if (tmp_path / "fail_restart.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + log[-3000:]
    drill = json.loads(done.stdout.strip().splitlines()[-1])["drills"][0]
    assert drill["drill"] == "restart" and drill["rc"] == 0 and drill["last_step"] == drill["steps"]
    assert "resumed from" in drill["resumed_line"]
    assert int(drill["resumed_line"].rsplit(" step ", 1)[1]) > 0  # from a checkpoint, not step 0
