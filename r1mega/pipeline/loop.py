"""``r1mega pipeline CONFIG``: run the ``phases:`` list, in order, resumably.

The loop owns what every phase shares: the run directory (``<checkpoint.dir or
logging.run_dir>/phase_<k>/`` per phase), the time budget (``train.time_budget_s``, counted from
the pipeline's start), preemption signals (a phase stops at a step boundary with its checkpoint
written; the next run continues there), metrics (one tensorboard run, each phase's tags under
its name) and the per-phase table.

A phase is finished when its ``done.json`` exists: the next run reads its outputs (final
checkpoint, data files, evaluation) from there and never recomputes them. An unfinished phase
resumes from its own checkpoints (training) or step markers (generation). Either happens only if
the phase's settings are those it was computed under (``pipeline/reuse.py``).
"""
from __future__ import annotations

import copy
import os
import time

from r1mega.config import Config, ConfigError, TrainConfig, save_resolved, validate
from r1mega.pipeline.config import REPLACED_TRAIN_KEYS, legacy_phases, parse_phases
from r1mega.pipeline.phases import PHASES
from r1mega.pipeline.report import format_table, phase_eval
from r1mega.pipeline.reuse import (check_settings, done_for_disk, done_from_disk, eval_set_id,
                                   fingerprint, phase_settings, record_settings)
from r1mega.pipeline.session import (DONE_FILE, Session, barrier, phase_dir, read_done,
                                     write_json_atomic)
from r1mega.train.roles import free_dropped_models


def pipeline_config(cfg: Config) -> Config:
    """``cfg`` with its phases: a config without ``phases:`` is its legacy meaning (SFT, or
    cold start + GRPO: :func:`legacy_phases`)."""
    if cfg.checkpoint.load:
        raise ConfigError("checkpoint.load: a pipeline resumes from its own run directory "
                          "(phase_<k>/); start a phase from weights with its init: hf:DIR or "
                          "init: <phase name> instead.")
    if cfg.phases:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.phases = legacy_phases(cfg)
    # Those phases now carry what these keys said.
    fresh = TrainConfig()
    for key in REPLACED_TRAIN_KEYS:
        setattr(cfg.train, key, getattr(fresh, key))
    return cfg


def _evaluate(session: Session, result) -> dict:
    from r1mega.train.roles import Rollout

    cfg = result.cfg
    tok = session.tokenizer(cfg)
    rollout = Rollout(result.policy, cfg.rollout, session.rt, eos_ids=[tok.eos_id],
                      decode_fn=tok.decode, vocab_size=tok.vocab_size)
    # The table compares phases on the top-level rewards, whatever a phase trained on.
    return phase_eval(rollout, session.scorer(session.cfg), session.eval_records(), tok, cfg,
                      session.rt)


def _eval_set(session: Session) -> str:
    return eval_set_id(session.eval_records(), session.cfg.rewards)


def _reevaluate(session: Session, spec, pdir: str, done: dict, root: str) -> dict:
    """A finished phase evaluated on other held-out prompts (the phase list changed which
    prompts some phase trains on): its final weights on this run's held-out set."""
    from r1mega.pipeline.phases import PhaseResult

    session.log(f"{spec.key} '{spec.name}': evaluated on another held-out set; evaluating "
                f"its final weights ({done['checkpoint']}) on this one")
    policy = session.build_policy(spec.cfg, total_steps=1)
    session.load_weights(spec.cfg, done["checkpoint"], policy)
    ev = _evaluate(session, PhaseResult("done", policy=policy, cfg=spec.cfg))
    done = {**done, "eval": ev, "eval_set": _eval_set(session)}
    if session.rt.rank == 0:
        write_json_atomic(os.path.join(pdir, DONE_FILE), done_for_disk(done, root))
    barrier()
    del policy
    free_dropped_models(session.rt.device)
    return done


def run_pipeline(cfg: Config) -> int:
    from r1mega.parallel.runtime import init_parallel
    from r1mega.train.metrics import MetricsLogger

    t_start = time.perf_counter()
    cfg = pipeline_config(cfg)
    specs = parse_phases(cfg)
    rt = init_parallel(cfg.parallel, cfg.precision)
    validate(cfg, world_size=rt.world_size)
    root = cfg.checkpoint.dir or cfg.logging.run_dir
    if rt.rank == 0:
        save_resolved(cfg, cfg.logging.run_dir)
    logger = MetricsLogger(cfg.logging, rank=rt.rank)
    session = Session(cfg, rt, logger, root)
    session.specs = specs
    budget = cfg.train.time_budget_s
    deadline = (lambda _metrics: t_start + budget) if budget else None
    rows = []
    fingerprints: dict = {}  # phase name -> its settings fingerprint, for the phases after it
    try:
        for spec in specs:
            pdir = phase_dir(root, spec.index)
            done = read_done(pdir)
            if done is not None and (done.get("name"), done.get("kind")) != (spec.name, spec.kind):
                raise ConfigError(f"{pdir}/{DONE_FILE} belongs to phase '{done.get('name')}' "
                                  f"({done.get('kind')}), but {spec.key} is '{spec.name}' "
                                  f"({spec.kind}); use a new run directory for a changed "
                                  "phase list.")
            settings = phase_settings(spec, fingerprints)
            fingerprints[spec.name] = fingerprint(settings)
            warning = check_settings(pdir, spec, settings)
            if warning:
                session.log(warning)
            if done is not None:
                done = done_from_disk(done, root)
                session.log(f"{spec.key} '{spec.name}' ({spec.kind}): finished earlier, "
                            f"reusing {pdir}")
                if done.get("eval") is not None and done.get("eval_set") != _eval_set(session):
                    done = _reevaluate(session, spec, pdir, done, root)
            else:
                if rt.rank == 0 and warning is None:
                    record_settings(pdir, settings)
                session.log(f"{spec.key} '{spec.name}' ({spec.kind}) starts"
                            + (f": {spec.steps} steps" if spec.steps else ""))
                result = PHASES[spec.kind](session, spec, pdir, deadline).run()
                if result.status != "done":
                    session.log(f"{spec.key} '{spec.name}' stopped ({result.status}); run the "
                                "same command again to continue where it stopped.")
                    return 0
                ev = None
                if result.policy is not None and session.eval_records():
                    ev = _evaluate(session, result)
                    logger.log(spec.index, ev, prefix="phases/")  # x axis: the phase index
                    logger.log(spec.steps, ev, prefix=f"{spec.name}/eval/")
                done = {"name": spec.name, "kind": spec.kind, "checkpoint": result.checkpoint,
                        "outputs": result.outputs, "eval": ev,
                        "eval_set": _eval_set(session) if ev is not None else None}
                if rt.rank == 0:
                    write_json_atomic(os.path.join(pdir, DONE_FILE), done_for_disk(done, root))
                barrier()
                del result
                free_dropped_models(rt.device)  # this phase's model, before the next is built
            session.done[spec.name] = done
            rows.append((spec.name, spec.kind, done.get("eval")))
    finally:
        session.close()
    table = format_table(rows)
    if rt.rank == 0:
        print("[r1mega] per-phase held-out results "
              f"({len(session.eval_records())} prompts):\n" + table, flush=True)
        with open(os.path.join(cfg.logging.run_dir, "phases.txt"), "w") as f:
            f.write(table + "\n")
    logger.text(len(specs), "phases/table", table)
    logger.close()
    session.log(f"pipeline finished in {time.perf_counter() - t_start:.0f} s")
    return 0
