"""`r1mega bench rollout --exact` and `r1mega bench train-step --exact` end to end on CPU
(--smoke): the exact mode is timed beside the default in the same run and its log-prob gap to
the training forward is exactly 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(module: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    from tests.conftest import free_port

    env["MASTER_PORT"] = str(free_port())
    out = subprocess.run([sys.executable, "-m", module, "--smoke", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_rollout_bench_exact_smoke():
    res = run_bench("r1mega.bench.rollout", "--exact", "--exact-tokens", "30")
    ex = res["exact"]
    assert ex["logprob_gap"]["max_abs_diff"] == 0.0 and ex["logprob_gap"]["tokens"] >= 30
    assert set(ex["throughput_vs_default"]) == set(res["settings"])
    assert all(v > 0 for v in ex["throughput_vs_default"].values())


@pytest.mark.slow
def test_train_step_bench_exact_smoke():
    res = run_bench("r1mega.bench.train_step", "--exact", "--skip-hf")
    assert res["exact_vs_default"] > 0
    assert any(k.endswith(",exact]") for k in res["impls"])


def test_exact_swiglu_bench_smoke(capsys):
    """`r1mega bench exact-swiglu --smoke`: both CPU rows timed, the JSON line last, and the two
    paths agree with the float64 value to within bf16 rounding of the largest output."""
    from r1mega.bench import exact_swiglu

    assert exact_swiglu.main(["--smoke"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "exact-swiglu" and res["device"] == "cpu"
    assert set(res["impls"]) == {"r1mega fused", "megatron unfused"}
    for row in res["impls"].values():
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_x_floor"] > 0
        assert row["max_abs_diff_vs_float64"] < 0.5  # |out| < 128 here: half a bf16 ulp <= 0.25
    assert res["speedup_vs_unfused_fwd_bwd"] > 0
