"""The phase kinds: ``sft``, ``grpo``, ``generate``, ``filter``, ``distill``; one small class each.

A phase builds what it needs from the session and its own spec, runs, and returns a
:class:`PhaseResult`; the pipeline loop (``pipeline/loop.py``) decides what happens next. Phases
that train run their steps through the trainer's step loop with a checkpoint manager rooted at
the phase's directory: a killed phase continues at its step, from its optimizer, schedule, data
cursor and RNG streams.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from r1mega.pipeline.session import barrier, write_json_atomic


@dataclass
class PhaseResult:
    # "done" | "preempted" | "time_budget"
    status: str
    checkpoint: Optional[str] = None  # final weights of a training phase
    outputs: dict = field(default_factory=dict)  # files the phase wrote ("data": sft rows)
    policy: object = None  # the trained policy, for the table's evaluation
    cfg: object = None  # the config that policy is evaluated under


class _Console:
    """Step lines every ``every`` steps, prefixed with the phase (the loop's logger contract)."""

    def __init__(self, session, spec, every: int = 10):
        self.s, self.spec, self.every, self.t0 = session, spec, every, time.perf_counter()

    def log(self, step, metrics, prefix=""):
        self.s.logger.log(step, metrics, prefix=prefix)

    def text(self, step, tag, text):
        self.s.logger.text(step, tag, text)

    def console(self, step, metrics, total=None):
        if step % self.every == 0 or step == total:
            keys = [k for k in ("loss", "reward/mean", "reward/strict_accuracy") if k in metrics]
            self.s.log(f"{self.spec.name} step {step}/{total} | " + " | ".join(
                f"{k}={float(metrics[k]):.4f}" for k in keys)
                + f" | {time.perf_counter() - self.t0:.0f} s")


class Phase:
    def __init__(self, session, spec, directory: str, deadline: Optional[Callable] = None):
        self.s, self.spec, self.dir, self.deadline = session, spec, directory, deadline
        self.cfg = spec.cfg

    def run(self) -> PhaseResult:
        raise NotImplementedError

    def _ckpt(self):
        from r1mega.train.checkpoint import CheckpointManager

        return CheckpointManager(dataclasses.replace(self.cfg.checkpoint, dir=self.dir),
                                 self.s.layout())

    def _train(self, policy, step_fn, sampler, extra_state=None, on_step=None) -> PhaseResult:
        """Resume from this phase's newest checkpoint if any, else start from ``spec.init``; then
        the step loop. Nothing that draws random numbers runs between the load (which restores
        the RNG streams) and the first step."""
        from r1mega.train.trainer import _loop

        ckpt = self._ckpt()
        path = ckpt.find_latest_valid()
        start = 0
        if path is not None:
            loaded = ckpt.load(path, policy.chunks, policy.optim.optimizer)
            policy.optim.scheduler.load_state_dict(loaded.trainer_state["scheduler"])
            sampler.load_state_dict(loaded.trainer_state["sampler"])
            start = loaded.step
            self.s.log(f"{self.spec.key} '{self.spec.name}': resumed at step {start} from {path}")
        else:
            self.s.seed_phase(self.spec)

        def state_fn(step: int) -> dict:
            return {"phase": f"pipeline:{self.spec.name}", "step": step,
                    "scheduler": policy.optim.scheduler.state_dict(),
                    "sampler": sampler.state_dict(), **(extra_state or {})}

        last, reason = start, "done"
        if start < self.spec.steps:
            last, reason = _loop(self.cfg, self.s.rt, _Console(self.s, self.spec), ckpt, step_fn,
                                 start=start, total=self.spec.steps, prefix=f"{self.spec.name}/",
                                 state_fn=state_fn, policy=policy, on_step=on_step,
                                 deadline=self.deadline)
        final = ckpt.find_latest_valid()
        if reason == "done" and last >= self.spec.steps:
            return PhaseResult("done", checkpoint=final, policy=policy, cfg=self.cfg)
        return PhaseResult(reason, checkpoint=final)


class SFTPhase(Phase):
    """Supervised fine-tuning: on the input (filter) phase's rows, else ``train.sft_source`` /
    the data source's worked solutions (the cold start)."""

    def _source_cfg(self):
        cfg = self.cfg
        if self.spec.input:
            data = self.s.done[self.spec.input]["outputs"]["data"]
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sft_source=data))
        return cfg

    def run(self) -> PhaseResult:
        from r1mega.train.sft import SFTStep, build_sft_source

        cfg = self._source_cfg()
        tok = self.s.tokenizer(cfg)
        policy = self.s.build_policy(cfg, total_steps=self.spec.steps)
        self.s.init_weights(self.spec, policy)
        step_fn = SFTStep(cfg, self.s.rt, policy, tok, build_sft_source(cfg.train, cfg.data))
        return self._train(policy, step_fn, step_fn.sampler)


class DistillPhase(SFTPhase):
    """SFT of a student (its own ``model`` section and, if it likes, its own tokenizer: the
    teacher's samples travel as text) on the teacher's filtered samples."""


class GRPOPhase(Phase):
    def run(self) -> PhaseResult:
        from r1mega.data import PromptSampler, build_prompt_source
        from r1mega.data.source import source_kinds
        from r1mega.train.grpo import GRPOStep
        from r1mega.train.roles import Reference, Rollout

        cfg, rt = self.cfg, self.s.rt
        tok = self.s.tokenizer(cfg)
        policy = self.s.build_policy(cfg, total_steps=self.spec.steps)
        self.s.init_weights(self.spec, policy)
        sampler = PromptSampler(build_prompt_source(cfg.data), rt.dp_rank, rt.dp_size,
                                seed=cfg.data.seed)
        reference = None
        if cfg.grpo.kl_beta:
            # The reference is the policy this phase starts from; saved once beside the phase's
            # checkpoints so that a resumed phase keeps the same one.
            reference = Reference.from_policy(policy, cfg.model, cfg.precision,
                                              offload_enabled=cfg.grpo.offload_reference)
            ref_dir = os.path.join(self.dir, "reference")
            if os.path.isdir(ref_dir):
                reference.load(ref_dir)
            else:
                reference.save(ref_dir)
        rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                          vocab_size=tok.vocab_size)
        scorer = self.s.scorer(cfg)
        # Every reward the phase uses must prove it can run before its first score counts; on a
        # thread, so the workers' start-up overlaps the first rollout.
        scorer.self_check(source_kinds(sampler.source), block=False)
        step_fn = GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok, reference=reference)
        return self._train(policy, step_fn, sampler)


class GeneratePhase(Phase):
    """Rejection sampling's first half: ``samples_per_prompt`` completions of each prompt from
    the colocated engine, scored by the phase's rule rewards and the strict grader, one JSONL
    file per (step, DP rank). A step's files are complete once its marker exists: a resumed
    phase starts after the last marked step and writes the same rows (seeds are per prompt)."""

    def _prompt_ids(self, source) -> list[int]:
        n = self.spec.generate.num_prompts or len(source)
        return list(range(min(n, len(source))))

    def run(self) -> PhaseResult:
        from r1mega.data import build_prompt_source
        from r1mega.data.source import source_kinds
        from r1mega.train.failures import PreemptionHandler, any_rank
        from r1mega.train.roles import Rollout

        cfg, rt, g = self.cfg, self.s.rt, self.spec.generate
        source = build_prompt_source(cfg.data)
        ids = self._prompt_ids(source)
        steps = math.ceil(len(ids) / max(1, g.prompts_per_step))
        out_dir = os.path.join(self.dir, "generated")
        start = 0
        while os.path.exists(os.path.join(out_dir, f"step_{start + 1:06d}.done")):
            start += 1
        outputs = {"rows": os.path.join(out_dir, "step_*.jsonl")}
        if start >= steps:
            return PhaseResult("done", outputs=outputs)
        tok = self.s.tokenizer(cfg)
        policy = self.s.build_policy(cfg, total_steps=1)
        self.s.init_weights(self.spec, policy)
        rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                          vocab_size=tok.vocab_size)
        scorer = self.s.scorer(cfg)
        scorer.self_check(source_kinds(source), block=False)

        preempt = PreemptionHandler(enabled=cfg.checkpoint.save_on_signal)
        try:
            for step in range(start + 1, steps + 1):
                chunk = ids[(step - 1) * g.prompts_per_step: step * g.prompts_per_step]
                t0 = time.perf_counter()
                rows = self._generate(step, chunk, source, rollout, scorer, tok)
                if rt.tp_rank == 0 and rt.pp_rank == 0 and rt.cp_rank == 0:
                    path = os.path.join(out_dir, f"step_{step:06d}.dp{rt.dp_rank:03d}.jsonl")
                    _write_rows(path, rows)
                barrier()
                if rt.rank == 0:
                    write_json_atomic(os.path.join(out_dir, f"step_{step:06d}.done"),
                                      {"prompts": len(chunk)})
                barrier()
                n = max(len(rows), 1)
                self.s.logger.log(step, {"correct_share": sum(r["correct"] for r in rows) / n,
                                         "reward_mean": sum(r["reward"] for r in rows) / n,
                                         "time/step_s": time.perf_counter() - t0},
                                  prefix=f"{self.spec.name}/")
                self.s.log(f"{self.spec.name} step {step}/{steps}: {len(chunk)} prompts x "
                           f"{g.samples_per_prompt}")
                if preempt.should_stop():
                    return PhaseResult("preempted")
                if self.deadline is not None and step < steps and any_rank(
                        time.perf_counter() > self.deadline({})):
                    return PhaseResult("time_budget")
        finally:
            preempt.restore()
        return PhaseResult("done", outputs=outputs)

    def _generate(self, step, chunk, source, rollout, scorer, tok) -> list:
        from r1mega.data.templates import encode_prompt
        from r1mega.rewards.strict import strict_grade
        from r1mega.rollout.types import GenerationRequest
        from r1mega.train.batch_stats import verifier_score
        from r1mega.train.grpo import reward_item, request_seed

        cfg, rt = self.cfg, self.s.rt
        mine = chunk[rt.dp_rank::rt.dp_size]
        if not mine:
            return []
        recs = [source[i] for i in mine]
        # Seeded by the prompt's index in the source, not by rank: any DP size samples the same.
        requests = [GenerationRequest(encode_prompt(r.prompt, cfg.data.template, tok,
                                                    cfg.data.max_prompt_tokens),
                                      n=self.spec.generate.samples_per_prompt,
                                      seed=request_seed(cfg.rollout.seed, 0, 0, i))
                    for r, i in zip(recs, mine)]
        completions = rollout.generate(requests)
        scored = scorer.score([reward_item(recs[c.prompt_index], c) for c in completions])
        rows = []
        for c, s in zip(completions, scored):
            rec = recs[c.prompt_index]
            try:
                correct, _ = strict_grade(c.text or "", rec.reference, verifier_score(s))
            except ValueError:
                correct = False
            rows.append({"phase": self.spec.name, "step": step,
                         "prompt_id": f"{cfg.data.source}#{mine[c.prompt_index]}",
                         "prompt": rec.prompt, "kind": rec.kind, "reference": rec.reference,
                         "completion": c.text or "", "sample_index": c.sample_index,
                         "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids),
                         "reward": s.total, "components": s.components, "correct": bool(correct),
                         "error": s.error})
        return rows


class FilterPhase(Phase):
    """Rejection sampling's second half: the generated rows through ``pipeline/rejection.py``,
    written once (rank 0) as ``sft.jsonl`` with provenance, plus ``filter_stats.json``."""

    def run(self) -> PhaseResult:
        from r1mega.pipeline.rejection import filter_rows

        out = os.path.join(self.dir, "sft.jsonl")
        stats_path = os.path.join(self.dir, "filter_stats.json")
        if self.s.rt.rank == 0:
            pattern = self.s.done[self.spec.input]["outputs"]["rows"]
            rows = [json.loads(line) for path in sorted(glob.glob(pattern))
                    for line in open(path, encoding="utf-8") if line.strip()]
            rows.sort(key=lambda r: (r["step"], r["prompt_id"], r["sample_index"]))
            sft, stats = filter_rows(rows, self.spec.filter, phase=self.spec.name,
                                     phase_index=self.spec.index, mix_pairs=self._mix_pairs())
            if not sft:
                raise RuntimeError(f"{self.spec.key} '{self.spec.name}': no generated sample "
                                   f"passed the filter ({stats}); loosen {self.spec.key}.filter "
                                   "or generate more samples per prompt.")
            _write_rows(out, sft)
            write_json_atomic(stats_path, stats)
            self.s.log(f"{self.spec.name}: kept {stats['kept']} of {stats['generated']} samples "
                       f"({stats['prompts_kept']} of {stats['prompts']} prompts), mixed in "
                       f"{stats['mixed']} non-reasoning rows; {stats}")
            self.s.logger.log(0, {k: float(v) for k, v in stats.items()},
                              prefix=f"{self.spec.name}/")
        barrier()
        return PhaseResult("done", outputs={"data": out, "stats": stats_path})

    def _mix_pairs(self):
        f = self.spec.filter
        if not f.mix_share:
            return []
        from r1mega.train.sft import build_sft_source

        train = dataclasses.replace(self.cfg.train, sft_source=f.mix_source)
        data = self.cfg.data
        if f.mix_source.startswith("builtin:"):
            data = dataclasses.replace(data, source=f.mix_source)
        src = build_sft_source(train, data)
        return [src[i] for i in range(len(src))]


def _write_rows(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


PHASES = {"sft": SFTPhase, "distill": DistillPhase, "grpo": GRPOPhase,
          "generate": GeneratePhase, "filter": FilterPhase}
