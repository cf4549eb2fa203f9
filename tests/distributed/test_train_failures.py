"""Failure handling of a training run: NaN gradients, preemption signals, a dead rank.

The NaN case runs the real TrainStep on a real megatron model. The signal and dead-rank cases run
the real `r1mega train` program (tiny config) in subprocesses, the way a user's job runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed.harness import free_port, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A tiny GRPO run: no cold start, no held-out eval, a few prompts per step.
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=2", "model.num_query_groups=1",
        "train.sft_steps=0", "data.eval_source=null", "data.global_batch_prompts=4",
        "rollout.group_size=2", "rollout.max_new_tokens=8", "train.steps=400",
        "logging.samples_every_steps=0"]


def nan_run(rank, world):
    from r1mega.config import ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.parallel.sharding import named_global_parameters
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=64)
    rt = init_parallel(ParallelConfig(), PrecisionConfig())
    chunks = build_model(cfg, rt)
    step = TrainStep(chunks, build_optimizer(OptimizerConfig(lr=1e-2), chunks, rt), rt,
                     micro_batch_tokens=32)
    base = sft_loss_fn(cfg.vocab_size, rt.tp_group)

    def poisoned(logits, mb):
        # Finite loss, NaN gradient: the case a loss check alone would miss.
        logits.register_hook(lambda g: torch.full_like(g, float("nan")))
        return base(logits, mb)

    samples = [sft_sample(torch.arange(1, 9), 2), sft_sample(torch.arange(3, 15), 2)]
    params = dict(named_global_parameters(chunks))
    before = {k: p.detach().clone() for k, p in params.items()}
    bad = step(samples, poisoned)
    unchanged = all(torch.equal(before[k], p) for k, p in params.items())
    good = step(samples, base)
    changed = any(not torch.equal(before[k], p) for k, p in params.items())
    finite = all(torch.isfinite(p).all() for p in params.values())
    return {"bad_ok": bad.update_successful, "bad_loss_finite": bool(torch.isfinite(torch.tensor(bad.loss))),
            "unchanged": unchanged, "good_ok": good.update_successful, "changed": changed, "finite": finite}


def test_nan_gradient_skips_the_update_and_training_goes_on():
    r = run_ranks(nan_run, 1)[0]
    assert r["bad_loss_finite"] and not r["bad_ok"] and r["unchanged"]
    assert r["good_ok"] and r["changed"] and r["finite"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _wait_for(path_fn, proc, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path_fn():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "r1mega.cli", "train", os.path.join(ROOT, "configs/demo.yaml"),
           *TINY, f"logging.run_dir={run_dir}", f"checkpoint.dir={ckpt}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, 300), \
            proc.communicate()[0] if proc.poll() is not None else "no step logged in 300 s"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    from r1mega.train.checkpoint import list_checkpoints, verify_checkpoint

    saved = list_checkpoints(str(ckpt))
    assert saved, out[-3000:]
    step, path = saved[0]
    assert 0 < step < 400 and verify_checkpoint(path) is None
    assert "preemption" in out


def test_a_killed_rank_ends_the_whole_job(tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "r1mega.cli", "train",
           os.path.join(ROOT, "configs/demo.yaml"), *TINY, f"logging.run_dir={run_dir}",
           "parallel.timeout_s=60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, 400), \
            "job did not start training"
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "r1mega.cli" in " ".join(c.cmdline())]
        assert len(workers) >= 2
        workers[-1].kill()  # SIGKILL: no handler, no goodbye
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=240)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-3000:]
    assert elapsed < 240
    for c in psutil.Process().children(recursive=True):
        assert "r1mega.cli" not in " ".join(c.cmdline()), "a rank outlived the job"


def _step_metrics(run_dir) -> dict:
    """step -> metrics of the last time that step was logged (a resumed run logs it again)."""
    import json

    out = {}
    for line in open(run_dir / "metrics.jsonl"):
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row
    return out


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    from r1mega.train.checkpoint import list_checkpoints

    config = [os.path.join(ROOT, "configs/demo.yaml"), *TINY, "train.steps=4",
              "checkpoint.save_every_steps=2"]
    base = [sys.executable, "-m", "r1mega.cli", "train", *config]
    ref_dir, ref_ckpt = tmp_path / "ref", tmp_path / "ref_ckpt"
    done = subprocess.run(base + [f"logging.run_dir={ref_dir}", f"checkpoint.dir={ref_ckpt}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = base + [f"logging.run_dir={run_dir}", f"checkpoint.dir={ckpt}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: list_checkpoints(str(ckpt)), proc, 400), "no checkpoint written"
    finally:
        proc.kill()  # SIGKILL mid-run: no handler runs
        proc.wait()
    # Tiny steps are fast: the process may have written later checkpoints before the kill landed.
    # Drop them, as if it had died right after step 2, so the resumed process must run 3-4 itself.
    import shutil

    for step, path in list_checkpoints(str(ckpt)):
        if step > 2:
            shutil.rmtree(path)
    resumed = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # Killed right after the step-2 checkpoint appeared, so the resumed process runs steps 3-4.
    assert "at GRPO step 2" in resumed.stdout + resumed.stderr, resumed.stdout[-2000:]

    ref, got = _step_metrics(ref_dir), _step_metrics(run_dir)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # the steps the resumed process ran itself
        for key in ("loss", "grad_norm", "reward/mean", "response/length_mean"):
            assert got[step][key] == ref[step][key], (step, key)
