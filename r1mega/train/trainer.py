"""The programs users run: ``run_train`` (GRPO, optionally after an SFT cold start), ``run_sft``
and ``run_demo`` (the embedded CPU default). ``r1mega/train/entry.py`` parses and calls these.

Start-up order, fixed: parallel runtime -> tokenizer -> policy (model + optimizer) -> optional
Hugging Face weights -> checkpoint resume, else the cold start (itself checkpointed and resumable;
r1mega/train/phases.py says which phase a run starts in) -> roles over the policy's weights
(rollout engine, reference) -> data cursor -> "before RL" evaluation -> the phase-boundary
checkpoint -> the step loop (log, evaluate, checkpoint, obey preemption signals) -> final
checkpoint.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable, Optional


from r1mega.config import Config, ConfigError, load_config, validate
from r1mega.rewards.detectors import reward_strict_gap

# The CPU demo's recipe, embedded so that `r1mega demo` works from any install; configs/demo.yaml
# holds the same values (a unit test keeps the two equal). See that file for the measurements.
DEMO_RECIPE: dict = {
    "model": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 352, "vocab_size": 128, "max_position_embeddings": 128},
    "parallel": {"tensor": 1, "pipeline": 1},
    "optimizer": {"lr": 2.0e-4, "warmup_steps": 10, "decay_style": "cosine", "adam_beta2": 0.99,
                  "clip_grad": 1.0, "weight_decay": 0.0},
    "data": {"source": "builtin:arithmetic", "eval_source": "builtin:arithmetic",
             "task_options": {"digits": 1, "terms": 3, "operators": "+-"},
             "num_examples": 1500, "eval_examples": 1000, "template": "raw", "tokenizer": "char",
             "max_prompt_tokens": 32, "global_batch_prompts": 32, "micro_batch_tokens": 512},
    "rollout": {"group_size": 8, "max_new_tokens": 48, "temperature": 1.0,
                "kv_cpu_tokens": 16384, "cuda_graphs": False},
    "grpo": {"eps_low": 0.2, "eps_high": 0.28, "kl_beta": 0.0, "loss_agg": "token_mean"},
    "rewards": {"spec": {"arithmetic": {"exact_match": 1.0, "format": 0.1}}, "num_workers": 0},
    "checkpoint": {"dir": None},
    "logging": {"run_dir": "runs/demo", "samples_every_steps": 20, "num_samples": 2},
    "train": {"steps": 250, "sft_steps": 250, "sft_lr": 3.0e-3, "sft_decay_style": "constant",
              "sft_batch_examples": 128, "eval_every_steps": 50, "eval_temperature": 0.0,
              "eval_samples": 1},
}


def _log0(rt, *args) -> None:
    if rt.rank == 0:
        print("[r1mega]", *args, flush=True)


def _setup(cfg: Config):
    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.parallel.runtime import init_parallel

    rt = init_parallel(cfg.parallel, cfg.precision)
    validate(cfg, world_size=rt.world_size)
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer ({cfg.data.tokenizer}) has {tok.vocab_size} ids but "
                         f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= "
                         f"{tok.vocab_size}.")
    return rt, tok


def _layout(rt) -> dict:
    return {"tp": rt.tp_size, "pp": rt.pp_size, "dp": rt.dp_size, "vpp": rt.vp_size,
            "world": rt.world_size}


def _build_policy(cfg: Config, rt, *, lr: Optional[float] = None, total_steps: int,
                  decay_style: Optional[str] = None):
    from r1mega.train.roles import Policy

    opt = copy.deepcopy(cfg.optimizer)
    if lr:
        opt.lr = lr
    if decay_style:
        opt.decay_style = decay_style
    policy = Policy.build(cfg.model, cfg.precision, opt, rt,
                          distributed_optimizer=cfg.parallel.distributed_optimizer,
                          micro_batch_tokens=cfg.data.micro_batch_tokens,
                          total_steps=total_steps)
    return policy


def _init_from_hf(cfg: Config, rt, policy) -> None:
    if cfg.model.init_from_hf:
        from r1mega.convert.hf_bridge import load_hf_into_model

        load_hf_into_model(policy.chunks, cfg.model.init_from_hf, cfg.model, rt,
                           optimizer=policy.optim.optimizer)
        _log0(rt, f"initialised the policy from {cfg.model.init_from_hf}")


def _copy_weights(src_policy, dst_policy) -> None:
    for src, dst in zip(src_policy.modules(), dst_policy.modules()):
        dst.load_state_dict(src.state_dict(), strict=True)
    # Under bf16 the optimizer steps fp32 master copies made when it was built; without this the
    # first RL update would write the pre-SFT weights back.
    dst_policy.optim.optimizer.reload_model_params()


def _checkpointer(cfg: Config, rt):
    from r1mega.train.checkpoint import CheckpointManager

    return CheckpointManager(cfg.checkpoint, _layout(rt)) if cfg.checkpoint.dir else None


def _resume_path(cfg: Config, ckpt) -> Optional[str]:
    if ckpt is None and not cfg.checkpoint.load:
        return None
    if cfg.checkpoint.load:
        from r1mega.train.checkpoint import CheckpointError, CheckpointManager

        mgr = ckpt or CheckpointManager(cfg.checkpoint, {})
        path = mgr.find_latest_valid(cfg.checkpoint.load)
        if path is None:
            raise CheckpointError(f"checkpoint.load={cfg.checkpoint.load}: no valid checkpoint "
                                  "there (see the warnings above); give a step_XXXXXXXX directory "
                                  "or the checkpoint.dir of a run that saved one.")
        return path
    return ckpt.find_latest_valid() if cfg.checkpoint.auto_resume else None


def _loop(cfg: Config, rt, logger, ckpt, step_fn, *, start: int, total: int, prefix: str,
          state_fn, policy, on_step=None,
          deadline: Optional[Callable[[dict], float]] = None) -> tuple[int, str]:
    """The step loop shared by SFT and GRPO: log, checkpoint, honour preemption signals and a
    ``deadline``: called after each step with its metrics, it returns the ``time.perf_counter()``
    value no step may end after (:class:`r1mega.train.budget.TimeBudget`).

    Returns (last step, why it ended): "done", "time_budget" or "preempted"."""
    from r1mega.train.failures import NonFiniteGuard, PreemptionHandler, any_rank
    from r1mega.train.reward_errors import check_reward_errors, over_limit

    preempt = PreemptionHandler(enabled=cfg.checkpoint.save_on_signal)
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
    step, reason = start, "done"
    warned_at = -(10 ** 9)
    try:
        for step in range(start + 1, total + 1):
            t_step = time.perf_counter()
            out = step_fn(step)
            metrics = out if isinstance(out, dict) else out.metrics
            guard.record(not metrics.get("update_skipped", 0.0), step)
            failing = over_limit(metrics, cfg.rewards.max_error_rate)
            if step % max(1, cfg.logging.log_every_steps) == 0 or step == total or failing:
                logger.log(step, metrics, prefix=prefix)
                logger.console(step, metrics, total)
            # Too many reward errors stop the run here, after the step's metrics are logged and
            # before its update is checkpointed.
            check_reward_errors(step, metrics, getattr(out, "reward_error", None),
                                cfg.rewards.max_error_rate, rt.rank)
            gap = reward_strict_gap(metrics.get("reward/mean", 0.0),
                                    metrics.get("reward/strict_accuracy", 1.0))
            if gap and step - warned_at >= 25:
                warned_at = step
                _log0(rt, f"WARNING at step {step}: {gap}")
            samples = getattr(out, "samples", None)
            every = cfg.logging.samples_every_steps
            if samples and every and (step % every == 0 or step == start + 1):
                logger.text(step, f"{prefix}samples", "\n\n".join(
                    f"prompt: {p}\ncompletion: {c}\nreward: {r:.3f}" for p, c, r in samples))
            if on_step is not None:
                on_step(step)
            stop = preempt.should_stop()
            if ckpt is not None and (stop or (cfg.checkpoint.save_every_steps and
                                              step % cfg.checkpoint.save_every_steps == 0)):
                ckpt.save(step, policy.chunks, policy.optim.optimizer, state_fn(step))
            if stop:
                _log0(rt, f"preemption signal: {'checkpoint written' if ckpt else 'no checkpoint dir'}"
                          f" at step {step}; exiting.")
                return step, "preempted"
            # The last step's duration predicts the next one's (the first is pessimistic: warm-up).
            now = time.perf_counter()
            if deadline is not None and step < total and any_rank(2 * now - t_step > deadline(metrics)):
                _log0(rt, f"train.time_budget_s={cfg.train.time_budget_s:g}: stopping after step "
                          f"{step} of {total}, as one more step would overrun it.")
                reason = "time_budget"
                break
    finally:
        preempt.restore()
    if ckpt is not None and step > start and not (
            cfg.checkpoint.save_every_steps and step % cfg.checkpoint.save_every_steps == 0):
        ckpt.save(step, policy.chunks, policy.optim.optimizer, state_fn(step))
    return step, reason


class _EveryNConsole:
    """The cold start's console: a line every ``every`` steps (the demo runs 250 SFT steps), and
    no progress bar (the logger's bar counts GRPO steps). Metrics still go to the log each step."""

    def __init__(self, logger, rt, every: int = 25):
        self.logger, self.rt, self.every = logger, rt, every
        self.t0 = time.perf_counter()

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        self.logger.log(step, metrics, prefix=prefix)

    def text(self, step: int, tag: str, text: str) -> None:
        self.logger.text(step, tag, text)

    def console(self, step: int, metrics: dict, total: Optional[int] = None) -> None:
        if step % self.every == 0 or step == total:
            _log0(self.rt, f"sft step {step}/{total} | loss={metrics['loss']:.4f} | "
                           f"{time.perf_counter() - self.t0:.0f} s")


def _cold_start(cfg: Config, rt, tok, logger, path: Optional[str]):
    """SFT on a separate policy object (its own optimizer and lr), checkpointed like GRPO under
    ``<checkpoint.dir>/cold_start`` and continued from ``path`` when given. Returns the trained
    policy, or None when a preemption signal stopped it (its checkpoint is written)."""
    from r1mega.train.checkpoint import CheckpointManager
    from r1mega.train.phases import cold_start_checkpoint_config
    from r1mega.train.sft import SFTStep, build_sft_source

    steps = cfg.train.sft_steps
    ckpt = (CheckpointManager(cold_start_checkpoint_config(cfg.checkpoint), _layout(rt))
            if cfg.checkpoint.dir else None)
    policy = _build_policy(cfg, rt, lr=cfg.train.sft_lr, total_steps=steps,
                           decay_style=cfg.train.sft_decay_style)
    step_fn = SFTStep(cfg, rt, policy, tok, build_sft_source(cfg.train, cfg.data))
    start = 0
    if path is not None:
        # Loaded last, so nothing draws from the restored RNG streams before step start+1.
        start = _resume(cfg, rt, ckpt, path, policy, step_fn.sampler, phase="cold_start")
    else:
        _init_from_hf(cfg, rt, policy)
    _log0(rt, f"SFT cold start: {steps} steps of {cfg.train.sft_batch_examples} examples"
              + (f", continuing after step {start}" if start else ""))

    def state_fn(step: int) -> dict:
        return {"phase": "cold_start", "step": step,
                "scheduler": policy.optim.scheduler.state_dict(),
                "sampler": step_fn.sampler.state_dict()}

    _, reason = _loop(cfg, rt, _EveryNConsole(logger, rt), ckpt, step_fn, start=start,
                      total=steps, prefix="sft/", state_fn=state_fn, policy=policy)
    return None if reason == "preempted" else policy


def run_train(cfg: Config) -> int:
    """GRPO (``r1mega train``): returns the process exit code."""
    from r1mega.data import PromptSampler, build_prompt_source
    from r1mega.data.source import source_kinds
    from r1mega.rewards.scorer import RewardScorer
    from r1mega.train.evaluate import evaluate, heldout_records
    from r1mega.train.grpo import GRPOStep
    from r1mega.train.metrics import MetricsLogger
    from r1mega.train.checkpoint import CheckpointManager, rng_state, set_rng_state
    from r1mega.train.budget import TimeBudget
    from r1mega.train.profiling import StepProfiler
    from r1mega.train.phases import (CONTINUE_COLD_START, FRESH_COLD_START, RESUME_GRPO,
                                     WEIGHTS_THEN_GRPO, cold_start_checkpoint_config, phase_of,
                                     plan_start, trainer_meta)
    from r1mega.train.roles import Reference, Rollout
    from r1mega.config import save_resolved

    if cfg.phases:  # a phase list is a pipeline, whichever command was given it
        from r1mega.pipeline.loop import run_pipeline

        return run_pipeline(cfg)
    if cfg.train.mode == "sft":
        return run_sft(cfg)
    t_start = time.perf_counter()
    rt, tok = _setup(cfg)
    if rt.rank == 0:
        save_resolved(cfg, cfg.logging.run_dir)
    logger = MetricsLogger(cfg.logging, rank=rt.rank, total_steps=cfg.train.steps, desc="grpo")
    ckpt = _checkpointer(cfg, rt)
    policy = _build_policy(cfg, rt, total_steps=cfg.train.steps)
    source = build_prompt_source(cfg.data)
    sampler = PromptSampler(source, rt.dp_rank, rt.dp_size, seed=cfg.data.seed)
    path = _resume_path(cfg, ckpt)
    if path is None and cfg.train.sft_steps > 0 and ckpt is not None and cfg.checkpoint.auto_resume:
        # No GRPO checkpoint (not even the boundary): the run may have stopped in its cold start.
        path = CheckpointManager(cold_start_checkpoint_config(cfg.checkpoint),
                                 _layout(rt)).find_latest_valid()
    plan = plan_start(path, cfg.train.sft_steps)
    start, before, resume_rng = 0, None, None
    if plan == RESUME_GRPO:
        start = _resume(cfg, rt, ckpt, path, policy, sampler, phase="grpo")
        before = trainer_meta(path).get("before_eval")
        # Building the roles below may draw random numbers (the reference's init); the step loop
        # must start from the streams as they were saved, so they are set again just before it.
        resume_rng = rng_state()
    elif plan in (FRESH_COLD_START, CONTINUE_COLD_START):
        sft_policy = _cold_start(cfg, rt, tok, logger, path)
        if sft_policy is None:  # preempted: the cold-start checkpoint is written
            logger.close()
            return 0
        _copy_weights(sft_policy, policy)
        del sft_policy
    elif plan == WEIGHTS_THEN_GRPO:
        # A finished cold start, an `r1mega sft` result or a converted model: weights only, RL
        # starts at step 0 with a fresh optimizer. The cold start is not rerun.
        _resume(cfg, rt, ckpt, path, policy, sampler, phase="grpo")
    else:
        _init_from_hf(cfg, rt, policy)
    # The phase boundary is saved once RL is about to start on cold-start weights.
    boundary_enabled = ckpt is not None and (
        plan in (FRESH_COLD_START, CONTINUE_COLD_START)
        or (plan == WEIGHTS_THEN_GRPO and phase_of(path) == "cold_start"))
    reference = None
    if cfg.grpo.kl_beta:
        # The reference is the policy as RL starts (after the cold start or HF init). With
        # checkpointing it is saved once next to the checkpoints, so a resumed run keeps it.
        ref_dir = os.path.join(cfg.checkpoint.dir, "reference") if ckpt is not None else None
        reference = Reference.from_policy(policy, cfg.model, cfg.precision,
                                          offload_enabled=cfg.grpo.offload_reference)
        if ref_dir and start > 0 and os.path.isdir(ref_dir):
            reference.load(ref_dir)
        elif ref_dir and start > 0:
            _log0(rt, f"WARNING: no saved reference in {ref_dir}; the KL reference restarts "
                      "from the resumed weights.")
        elif ref_dir:
            reference.save(ref_dir)
    from r1mega.precision.policy import resolve_rollout_fp8_policy

    rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                      vocab_size=tok.vocab_size,
                      fp8_policy=resolve_rollout_fp8_policy(cfg.precision, rt.device.type))
    scorer = RewardScorer(cfg.rewards, max_new_tokens=cfg.rollout.max_new_tokens)
    step_fn = GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok, reference=reference)
    eval_records = []
    if cfg.data.eval_source:
        eval_records = heldout_records(build_prompt_source(cfg.data, eval=True), [source])
        if not eval_records:
            _log0(rt, "WARNING: every data.eval_source prompt also occurs in data.source; there "
                      "is nothing held out to evaluate. Lower data.num_examples or use another "
                      "eval_source.")
    # Every reward the run will use must prove it can run (RewardSetupError names the cause)
    # before its first score counts. On a thread: the workers' start-up overlaps the first
    # rollout, and the first scoring waits for the verdict.
    scorer.self_check(source_kinds(source) | source_kinds(eval_records), block=False)

    def show_eval(ev: dict, tag: str, note: str = "") -> None:
        _log0(rt, f"held-out accuracy {tag}: {ev['eval/accuracy']:.3f} strict "
                  f"(training reward {ev['eval/reward_mean']:.3f}, its accuracy "
                  f"{ev.get('eval/reward_accuracy', float('nan')):.3f}; format "
                  f"{ev['eval/format_rate']:.3f}; {len(eval_records)} prompts, "
                  f"{'greedy' if ev['eval/temperature'] <= 0 else 'T=%g' % ev['eval/temperature']})"
                  + note)
        _log0(rt, "  hack detectors: " + ", ".join(
            f"{k[len('eval/hack/'):]} {v:.3f}" for k, v in ev.items() if k.startswith("eval/hack/")))
        gap = reward_strict_gap(ev["eval/reward_mean"], ev["eval/accuracy"])
        if gap:
            _log0(rt, f"WARNING {tag}: {gap}")

    def run_eval(step: int, tag: str) -> dict:
        # One file per DP rank (its slice of the prompts); TP/PP/CP peers hold the same texts.
        first = rt.tp_rank == 0 and rt.pp_rank == 0 and rt.cp_rank == 0
        dump = os.path.join(cfg.logging.run_dir, "eval",
                            f"step_{step:08d}.dp{rt.dp_rank}.jsonl") if first else None
        ev = evaluate(rollout, scorer, eval_records, tok, cfg, rt, seed=cfg.rollout.seed + 7,
                      dump_path=dump)
        logger.log(step, ev)
        show_eval(ev, tag)
        return ev

    def on_step(step: int) -> None:
        if eval_records and cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0 \
                and step != cfg.train.steps:
            run_eval(step, f"at step {step}")

    def state_fn(step: int) -> dict:
        # "before_eval" rides along in every GRPO checkpoint: a resumed run reports the gain
        # against the model RL started from, not against its resumed weights.
        return {"phase": "grpo", "step": step, "scheduler": policy.optim.scheduler.state_dict(),
                "sampler": sampler.state_dict(), "before_eval": before}

    if before is not None and eval_records:
        show_eval(before, "before RL", " [measured when RL started, read from the checkpoint]")
    elif eval_records and start == 0:
        before = run_eval(start, "before RL")
    elif eval_records:
        _log0(rt, f"held-out accuracy before RL: not in {path} (an older checkpoint); the gain "
                  "after RL is not reported.")
    t0 = time.perf_counter()
    deadline = None
    if cfg.train.time_budget_s:
        # Keep room for the final evaluation (budget.py), predicted from the first one; one read
        # from a checkpoint carries its own time.
        deadline = TimeBudget(t_start, cfg.train.time_budget_s,
                              before if eval_records else None).deadline
    if boundary_enabled:
        # SFT done, RL not begun. No optimizer state: RL's Adam starts empty either way.
        ckpt.save(0, policy.chunks, None, state_fn(0))
    if resume_rng is not None:
        set_rng_state(resume_rng)
    profile_step = cfg.logging.profile_step
    if profile_step and not start < profile_step <= cfg.train.steps:
        _log0(rt, f"WARNING: logging.profile_step={profile_step} is not among the GRPO steps this "
                  f"run makes ({start + 1}..{cfg.train.steps}); nothing will be profiled.")
    profiler = StepProfiler(profile_step, cfg.logging.run_dir, rank=rt.rank,
                            log=lambda text: _log0(rt, text))
    try:
        last, reason = _loop(cfg, rt, logger, ckpt, profiler.wrap(step_fn), start=start,
                             total=cfg.train.steps,
                             prefix="", state_fn=state_fn, policy=policy, on_step=on_step,
                             deadline=deadline)
        rl_s = time.perf_counter() - t0
        if eval_records and last > start and reason != "preempted":
            after = run_eval(last, "after RL")
            if before is not None:
                gain = after["eval/accuracy"] - before["eval/accuracy"]
                logger.log(last, {"eval/accuracy_gain": gain})
                _log0(rt, f"RL changed strict held-out accuracy by {100 * gain:+.1f} points "
                          f"({100 * before['eval/accuracy']:.1f}% -> "
                          f"{100 * after['eval/accuracy']:.1f}%) in {rl_s:.0f} s of GRPO")
    finally:
        scorer.close()
        logger.close()
    if rt.rank == 0 and cfg.logging.tensorboard:
        _log0(rt, f"tensorboard logs: {os.path.abspath(logger.tb_dir)}  "
                  f"(tensorboard --logdir {logger.tb_dir})")
    return 0


def _resume(cfg: Config, rt, ckpt, path: str, policy, sampler, *, phase: str) -> int:
    """Load ``path`` into the policy; a checkpoint of the same phase also restores the optimizer,
    schedule and data cursor and gives the step to continue from, any other gives weights only."""
    from r1mega.train.checkpoint import CheckpointManager
    from r1mega.train.phases import phase_of

    same_phase = phase_of(path) == phase
    loaded = (ckpt or CheckpointManager(cfg.checkpoint, _layout(rt))).load(
        path, policy.chunks, policy.optim.optimizer, load_optimizer=same_phase)
    start = 0
    if same_phase:
        policy.optim.scheduler.load_state_dict(loaded.trainer_state["scheduler"])
        sampler.load_state_dict(loaded.trainer_state["sampler"])
        start = loaded.step
    _log0(rt, f"resumed from {path} at {phase.upper()} step {start}")
    return start


def run_sft(cfg: Config) -> int:
    """``r1mega sft``: supervised fine-tuning with checkpoints and exact resume."""
    if cfg.phases:
        from r1mega.pipeline.loop import run_pipeline

        return run_pipeline(cfg)
    from r1mega.train.metrics import MetricsLogger
    from r1mega.train.sft import SFTStep, build_sft_source
    from r1mega.config import save_resolved

    rt, tok = _setup(cfg)
    total = cfg.train.sft_steps or cfg.train.steps
    if rt.rank == 0:
        save_resolved(cfg, cfg.logging.run_dir)
    logger = MetricsLogger(cfg.logging, rank=rt.rank, total_steps=total, desc="sft")
    ckpt = _checkpointer(cfg, rt)
    policy = _build_policy(cfg, rt, lr=cfg.train.sft_lr, total_steps=total,
                           decay_style=cfg.train.sft_decay_style)
    step_fn = SFTStep(cfg, rt, policy, tok, build_sft_source(cfg.train, cfg.data))
    path = _resume_path(cfg, ckpt)
    start = 0
    if path is not None:
        start = _resume(cfg, rt, ckpt, path, policy, step_fn.sampler, phase="sft")
    else:
        _init_from_hf(cfg, rt, policy)

    def state_fn(step: int) -> dict:
        return {"phase": "sft", "step": step, "scheduler": policy.optim.scheduler.state_dict(),
                "sampler": step_fn.sampler.state_dict()}

    try:
        _loop(cfg, rt, logger, ckpt, step_fn, start=start, total=total, prefix="sft/",
              state_fn=state_fn, policy=policy)
    finally:
        logger.close()
    return 0


def demo_config(overrides: Optional[list] = None) -> Config:
    """The embedded demo recipe, with ``key=value`` overrides on top."""
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(DEMO_RECIPE, f)
        path = f.name
    try:
        return load_config(path, overrides or [])
    finally:
        os.unlink(path)


def run_demo(overrides: Optional[list] = None) -> int:
    """SFT cold start then GRPO on a tiny model, on CPU; prints held-out accuracy before and
    after RL and where the tensorboard logs are."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    cfg = demo_config(overrides)
    t0 = time.perf_counter()
    print(f"[r1mega] demo: {cfg.model.num_layers}-layer d={cfg.model.hidden_size} model, "
          f"{cfg.train.sft_steps} SFT steps then {cfg.train.steps} GRPO steps on "
          f"{cfg.data.source} {cfg.data.task_options}", flush=True)
    # CPU kernels round by instruction set: a run compares bit for bit only with one on the same
    # torch build, instruction set and thread count.
    print(f"[r1mega] torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    code = run_train(cfg)
    import resource

    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(f"[r1mega] demo finished in {time.perf_counter() - t0:.0f} s "
          f"({cpu.ru_utime + cpu.ru_stime:.0f} CPU-seconds)", flush=True)
    return code
