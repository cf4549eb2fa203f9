"""The SFT cold start inside `r1mega train` is checkpointed and resumes phase-aware.

One uninterrupted tiny run (6 SFT steps, then 3 GRPO steps with a KL reference and held-out
evaluation) is the reference. Then: a run stopped by SIGTERM or SIGKILL inside SFT resumes mid-SFT
and ends bit-identical to it (SFT losses, GRPO metrics, final parameters); runs resumed after SFT
finished (from the phase boundary, from a finished cold start whose boundary was never written,
from mid-RL) never rerun SFT and report the "before RL" accuracy the reference measured.

Each run is `run_train` in a fresh spawned process (one CPU rank). The stops are made
deterministic from inside that process: SIGTERM is raised during a chosen SFT step, SIGKILL right
after a chosen cold-start checkpoint is written.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.distributed.harness import run_ranks

from r1mega.rewards.registry import RewardResult, register_reward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SFT_STEPS, GRPO_STEPS = 6, 3
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=2", "model.num_query_groups=1",
        "data.num_examples=64", "data.eval_examples=16", "data.global_batch_prompts=4",
        "rollout.group_size=2", "rollout.max_new_tokens=8", "grpo.kl_beta=0.05",
        "optimizer.warmup_steps=1", f"train.sft_steps={SFT_STEPS}", "train.sft_batch_examples=4",
        f"train.steps={GRPO_STEPS}", "checkpoint.save_every_steps=2", "checkpoint.keep_last=10",
        "logging.samples_every_steps=0", "logging.tensorboard=false",
        "logging.progress_bar=false"]


@register_reward("test_digit_share_cold")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    """Differs between random completions, so GRPO's advantages and gradients are not zero."""
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


def _train(rank, world_size, run_dir, ckpt_dir, stop):
    """run_train on the tiny config; ``stop``: None, ("sigterm", sft_step) or ("sigkill",
    cold-start checkpoint step). Returns its exit code, console output and final parameters."""
    import contextlib
    import io
    import signal

    import r1mega.train.trainer as trainer
    from r1mega.config import load_config
    from r1mega.parallel.sharding import named_global_parameters
    from r1mega.train.checkpoint import CheckpointManager
    from r1mega.train.sft import SFTStep

    built = []
    build = trainer._build_policy

    def recording_build(*args, **kwargs):  # the first one built is the GRPO policy
        built.append(build(*args, **kwargs))
        return built[-1]

    trainer._build_policy = recording_build
    if stop and stop[0] == "sigterm":
        sft_call = SFTStep.__call__

        def call(self, step):  # the signal lands mid-step, as a real preemption notice would
            signal.raise_signal(signal.SIGTERM)
            return sft_call(self, step)

        SFTStep.__call__ = lambda self, step: (call if step == stop[1] else sft_call)(self, step)
    if stop and stop[0] == "sigkill":
        save = CheckpointManager.save

        def save_then_die(self, step, *args, **kwargs):
            path = save(self, step, *args, **kwargs)
            if os.path.basename(self.root) == "cold_start" and step == stop[1]:
                os.kill(os.getpid(), signal.SIGKILL)  # no handler, no goodbye
            return path

        CheckpointManager.save = save_then_die
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"),
                      TINY + [f"logging.run_dir={run_dir}", f"checkpoint.dir={ckpt_dir}"])
    cfg.rewards.spec = {"arithmetic": {"exact_match": 1.0, "test_digit_share_cold": 0.5}}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = trainer.run_train(cfg)
    params = {k: p.detach().clone() for k, p in named_global_parameters(built[0].chunks)}
    return {"code": code, "out": out.getvalue(), "params": params}


def _rows(run_dir) -> dict:
    """{"sft": {step: row}, "grpo": {step: row}, "eval": [rows]} of one run directory."""
    rows = {"sft": {}, "grpo": {}, "eval": []}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        if "sft/loss" in row:
            rows["sft"][row["step"]] = row
        elif "loss" in row:
            rows["grpo"][row["step"]] = row
        elif "eval/accuracy" in row:
            rows["eval"].append(row)
    return rows


def _lines(out: str, marker: str) -> list:
    return [line for line in out.splitlines() if marker in line]


def _assert_same_end(got: dict, ref: dict, got_rows: dict, ref_rows: dict, sft_from: int) -> None:
    for step in range(sft_from, SFT_STEPS + 1):
        for key in ("sft/loss", "sft/grad_norm", "sft/lr"):
            assert got_rows["sft"][step][key] == ref_rows["sft"][step][key], (step, key)
    assert sorted(got_rows["grpo"]) == list(range(1, GRPO_STEPS + 1))
    for step in range(1, GRPO_STEPS + 1):
        for key in ("loss", "grad_norm", "kl", "reward/mean", "response/length_mean"):
            assert got_rows["grpo"][step][key] == ref_rows["grpo"][step][key], (step, key)
    assert got["params"].keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        assert torch.equal(got["params"][name], value), name
    # The demo's gain line, minus its wall time: same before, same after.
    strip = lambda line: line.split(" in ")[0]  # noqa: E731
    assert [strip(x) for x in _lines(got["out"], "RL changed strict held-out accuracy")] == \
        [strip(x) for x in _lines(ref["out"], "RL changed strict held-out accuracy")] != []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    run_dir, ckpt = str(base / "run"), str(base / "ckpt")
    ref = run_ranks(_train, 1, args=(run_dir, ckpt, None))[0]
    assert ref["code"] == 0, ref["out"][-3000:]
    return ref, run_dir, ckpt


def test_cold_start_is_checkpointed_and_marks_the_boundary(uninterrupted):
    from r1mega.train.checkpoint import list_checkpoints, verify_checkpoint
    from r1mega.train.phases import trainer_meta

    ref, run_dir, ckpt = uninterrupted
    cold = list_checkpoints(os.path.join(ckpt, "cold_start"))
    assert [s for s, _ in cold] == [6, 4, 2]
    assert all(verify_checkpoint(p) is None and trainer_meta(p)["phase"] == "cold_start"
               and os.path.isdir(os.path.join(p, "optimizer")) for _, p in cold)
    grpo = dict(list_checkpoints(ckpt))
    assert sorted(grpo) == [0, 2, 3]
    boundary = trainer_meta(grpo[0])
    assert boundary["phase"] == "grpo" and boundary["step"] == 0
    assert not os.path.exists(os.path.join(grpo[0], "optimizer"))  # RL's Adam starts empty
    before_row = _rows(run_dir)["eval"][0]
    assert before_row["step"] == 0
    for meta in (boundary, trainer_meta(grpo[3])):
        assert meta["before_eval"]["eval/accuracy"] == before_row["eval/accuracy"]
        assert meta["before_eval"]["eval/reward_mean"] == before_row["eval/reward_mean"]
        # Its time rides along, for a resumed run's time budget; on CPU nothing is captured.
        assert meta["before_eval"]["eval/seconds"] == before_row["eval/seconds"] > 0
        assert meta["before_eval"]["eval/capture_s"] == 0.0
    rows = _rows(run_dir)
    assert sorted(rows["sft"]) == list(range(1, SFT_STEPS + 1))
    # The comparisons in the tests below have teeth: RL really moves the weights.
    assert all(r["grad_norm"] > 0 and r["kl"] != 0 for s, r in rows["grpo"].items() if s > 1)


@pytest.mark.parametrize("stop", [("sigterm", 3), ("sigkill", 4)], ids=lambda s: s[0])
def test_stopped_in_cold_start_resumes_mid_sft_bit_identical(uninterrupted, tmp_path, stop):
    from r1mega.train.checkpoint import list_checkpoints

    ref, ref_run, _ = uninterrupted
    run_dir, ckpt = str(tmp_path / "run"), str(tmp_path / "ckpt")
    if stop[0] == "sigterm":
        first = run_ranks(_train, 1, args=(run_dir, ckpt, stop))[0]
        assert first["code"] == 0 and "preemption signal" in first["out"], first["out"][-3000:]
    else:
        with pytest.raises(AssertionError, match="no result"):  # the rank died by SIGKILL
            run_ranks(_train, 1, args=(run_dir, ckpt, stop))
    stopped_at = stop[1]
    assert list_checkpoints(ckpt) == []  # nothing of GRPO yet
    assert list_checkpoints(os.path.join(ckpt, "cold_start"))[0][0] == stopped_at

    got = run_ranks(_train, 1, args=(run_dir, ckpt, None))[0]
    assert got["code"] == 0, got["out"][-3000:]
    assert f"cold_start/step_{stopped_at:08d} at COLD_START step {stopped_at}" in got["out"]
    assert f"continuing after step {stopped_at}" in got["out"]
    rows = _rows(run_dir)
    # Only the steps after the checkpoint ran again: SFT row count = all steps + none repeated.
    assert sorted(rows["sft"]) == list(range(1, SFT_STEPS + 1))
    _assert_same_end(got, ref, rows, _rows(ref_run), sft_from=1)


def _drop(ckpt: str, keep) -> None:
    """Delete the GRPO checkpoints whose step fails ``keep`` (as if the run died before them)."""
    from r1mega.train.checkpoint import list_checkpoints

    for step, path in list_checkpoints(ckpt):
        if not keep(step):
            shutil.rmtree(path)


@pytest.mark.parametrize("where", ["boundary", "sft_finished", "mid_rl"])
def test_resumed_after_cold_start_does_not_rerun_it(uninterrupted, tmp_path, where):
    ref, ref_run, ref_ckpt = uninterrupted
    run_dir, ckpt = str(tmp_path / "run"), str(tmp_path / "ckpt")
    shutil.copytree(ref_ckpt, ckpt)
    if where == "boundary":  # died in GRPO step 1
        _drop(ckpt, lambda s: s == 0)
    elif where == "sft_finished":  # died after SFT's last checkpoint, before the boundary
        _drop(ckpt, lambda s: False)
        shutil.rmtree(os.path.join(ckpt, "reference"))
    else:  # died in GRPO step 3
        _drop(ckpt, lambda s: s <= 2)
    got = run_ranks(_train, 1, args=(run_dir, ckpt, None))[0]
    assert got["code"] == 0, got["out"][-3000:]
    out = got["out"]
    assert "SFT cold start" not in out and "sft step" not in out
    resumed = {"boundary": "step_00000000 at GRPO step 0",
               "sft_finished": "cold_start/step_00000006 at GRPO step 0",
               "mid_rl": "step_00000002 at GRPO step 2"}[where]
    assert f"resumed from {os.path.join(ckpt, '')}" in out and resumed in out, out[-3000:]
    rows = _rows(run_dir)
    assert rows["sft"] == {}  # this process logged no SFT step
    ref_rows = _rows(ref_run)
    ref_before = _lines(ref["out"], "held-out accuracy before RL")
    before = _lines(out, "held-out accuracy before RL")
    assert len(before) == 1 and before[0].startswith(ref_before[0])
    if where == "sft_finished":  # measured again on the same weights, and a boundary written
        clock = ("time", "eval/seconds", "eval/capture_s")  # wall-clock readings differ
        assert rows["eval"][0] == {**ref_rows["eval"][0], **{k: rows["eval"][0][k] for k in clock}}
        assert os.path.isdir(os.path.join(ckpt, "step_00000000"))
    else:  # read from the checkpoint, not re-measured on the resumed weights
        assert "read from the checkpoint" in before[0]
        assert [r["step"] for r in rows["eval"]] == [GRPO_STEPS]  # only "after RL" evaluated
    first_grpo = 3 if where == "mid_rl" else 1
    assert sorted(rows["grpo"]) == list(range(first_grpo, GRPO_STEPS + 1))
    rows["grpo"] = {**{s: r for s, r in ref_rows["grpo"].items() if s < first_grpo},
                    **rows["grpo"]}
    _assert_same_end(got, ref, rows, ref_rows, sft_from=SFT_STEPS + 1)
