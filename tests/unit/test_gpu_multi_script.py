"""tools/gpu_multi.sh (the several-GPU script) in its CPU dry run, and its summary table.

The dry run starts the same torchrun launches as on GPUs, with 2 CPU ranks (gloo) and the tiny
shapes; here only its cheapest parts (DP and EP scaling) run, the rest runs in the full dry run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "gpu_multi.sh")


def _dry_run(tmp_path, parts: str, timeout: int = 600):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_MULTI_LOGDIR=str(tmp_path / "logs"),
               GPU_MULTI_PARTS=parts,
               PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("R1MEGA_TEST_BACKEND", None)
    return subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _last_json(path):
    lines = [ln for ln in open(path).read().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def test_unknown_part_is_refused(tmp_path):
    done = _dry_run(tmp_path, "dp-scaling", timeout=60)
    assert done.returncode == 2
    assert "unknown part 'dp-scaling'" in done.stdout and "equiv dp ep" in done.stdout


def test_summary_table_of_runs(tmp_path):
    """multi_summary.py: a row per run with the figures of its JSON line; a failed run points
    at its log; a skipped run says so."""
    (tmp_path / "dp_dp2.log").write_text('noise\n{"tokens_per_s_per_gpu": 1234.0, '
                                         '"efficiency_vs_ref": 0.95, "mfu": 0.41, "ms_per_step": 20.0}\n')
    (tmp_path / "ep_ep2.log").write_text("Traceback ...\n")
    (tmp_path / "equiv_tests.log").write_text("..\n===== 7 passed, 1 skipped in 80.1s =====\n")
    (tmp_path / "runs.tsv").write_text("dp\tdp2\t0\t31\tdp_dp2.log\nep\tep2\t1\t9\tep_ep2.log\n"
                                       "equiv\ttests\t0\t80\tequiv_tests.log\n8b\ttp2\tskipped\t0\t8b_tp2.log\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "multi_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {ln.split()[1]: ln for ln in done.stdout.splitlines()[1:]}
    assert "1,234 tok/s/GPU" in rows["dp2"] and "eff 95.0%" in rows["dp2"] and "MFU 41.0%" in rows["dp2"]
    assert "see ep_ep2.log" in rows["ep2"]
    assert "7 passed" in rows["tests"] and "1 skipped" in rows["tests"]
    assert "skipped" in rows["tp2"]
    summary = json.load(open(tmp_path / "summary.json"))
    assert [r["run"] for r in summary] == ["dp2", "ep2", "tests", "tp2"]
    assert summary[0]["result"]["efficiency_vs_ref"] == 0.95


@pytest.mark.slow
def test_dry_run_dp_and_ep_scaling(tmp_path):
    done = _dry_run(tmp_path, "dp ep")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    # The summary table comes last: its header, then one row per run, all exit code 0.
    lines = out.strip().splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("================ summary"))
    table = lines[head + 2:]
    assert [ln.split()[:3] for ln in table] == [["dp", "dp1", "0"], ["dp", "dp2", "0"],
                                                ["ep", "ep1", "0"], ["ep", "ep2", "0"]], table
    logs = tmp_path / "logs"
    dp1, dp2 = _last_json(logs / "dp_dp1.log"), _last_json(logs / "dp_dp2.log")
    assert (dp1["world_size"], dp1["dp"], dp2["world_size"], dp2["dp"]) == (1, 1, 2, 2)
    assert dp2["tokens_per_step"] == 2 * dp1["tokens_per_step"]  # same per-GPU batch
    # dp2's efficiency is against dp1's per-GPU rate of the same call
    assert dp2["ref_tokens_per_s_per_gpu"] == pytest.approx(dp1["tokens_per_s_per_gpu"])
    assert dp2["efficiency_vs_ref"] == pytest.approx(dp2["tokens_per_s_per_gpu"] / dp1["tokens_per_s_per_gpu"])
    ep2 = _last_json(logs / "ep_ep2.log")
    assert ep2["ep"] == 2 and ep2["all_to_all_calls_per_step"] > 0 and ep2["all_to_all_ms_per_step"] > 0
    assert _last_json(logs / "ep_ep1.log")["all_to_all_calls_per_step"] == 0  # EP=1: no exchange
    assert all(_last_json(logs / f)["losses_finite"] for f in ("dp_dp1.log", "dp_dp2.log"))
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert [r["rc"] for r in summary] == ["0"] * 4
    # What the device tool returns (at most 8 files): the summary and one archive of the logs.
    assert sorted(os.listdir(tmp_path / "out")) == ["logs.tar.gz", "summary.json", "summary.log"]
    import tarfile

    names = tarfile.open(tmp_path / "out" / "logs.tar.gz").getnames()
    assert {"./dp_dp1.log", "./ep_ep2.log", "./runs.tsv"} <= set(names)
